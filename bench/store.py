"""Shared stores of stored futures (EXECUTOR_FUTURES_STORE), timed with pyperf: SQLite and Redis
against the in-process store, and the Redis store beside RQ, Celery and Huey on one redis-server.

Setup: ``pip install -r bench/requirements.txt rq celery redis huey hiredis``, and Debian's redis-server
(without it, or without redis-py, the Redis rows are skipped with a note).  From the repository root::

    python bench/store.py                            # every benchmark, then the table
    python bench/store.py --quick                    # smoke check: < 2 min, claims nothing
    python bench/store.py --profile submit.sqlite.call   # cProfile of one benchmark, every thread

The script starts its own redis-server on a free loopback port (databases: 0 Flask-Executor,
1 RQ, 2 and 3 Celery's broker and results, 4 Huey) and stops it at the end; SQLite files go
to a private temporary directory.  Benchmarks, each one pyperf benchmark in one JSON file:

- ``submit.STORE.CLOCK`` (STORE: memory, sqlite, redis): batches of ``submit_stored(key, noop)``
  inside a request on a 4-thread pool; wait for all; ``pop`` all.  A value is per task:
  ``call`` clocks the submit_stored calls alone, ``batch`` the whole batch, and ``held`` the
  calls alone while the pool's workers wait for the last submit (a task that waits on an
  event): the store's writes for running tasks then do not compete with the calls, as no
  worker competes with the peers' enqueue.  EXECUTOR_FUTURES_MAX_LENGTH is 2**31, so nothing
  is evicted (as in overhead.py).
- ``enqueue.PEER`` (rq, celery, huey): one enqueue of a no-op job; no worker runs.
- ``query.STORE``, ``query.PEER``: a status query, per query, made by the benchmark process
  about jobs that a second process (``store.py writer``, run in the setup) stored and exited:
  ``executor.futures.done(key)`` (tasks finished); RQ ``Job.fetch(id).is_finished`` and
  ``Job(id).get_status()``; Celery ``AsyncResult(id).state``; Huey ``result(id, preserve=True)``
  (jobs queued).  ``query.memory`` is the in-process store asked in its own process (reference).
- ``redis.ping``: one round trip with redis-py's client (``Redis.ping()``, through its pool);
  ``redis.ping.connection``: one PING on a redis-py connection held by the benchmark, the
  round trip without the pool's work (the Redis store sends its commands that way).
- ``collection_add_50.ours`` / ``collection_add_10000.ours``: overhead.py's scenarios, in the
  same run, for the add@10000/add@50 ratio.

Rounds alternate the order of the benchmarks, so that a drift of the machine's load is spread
over all.  ``-o`` (default /tmp/bench-results/store.json); ``python -m pyperf stats FILE`` shows
the spread.  One benchmark with any pyperf option (the URL and directory must exist)::

    python bench/store.py run --bench query.sqlite --store-dir /tmp/s --rigorous -o q.json
"""

import argparse
import contextlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import wait
from dataclasses import dataclass
from functools import partial
from importlib.metadata import PackageNotFoundError, version

import overhead  # bench/overhead.py, beside this file: its helpers and no-op task

WORKERS, QUERY_KEYS, SECRET = overhead.WORKERS, 1000, "bench-secret"
DB = {"flask_executor": 0, "rq": 1, "celery_broker": 2, "celery_results": 3, "huey": 4}
PEERS = ("rq", "celery", "huey")


def db_url(args, name):
    return f"{args.redis_url}/{DB[name]}"


def redis_client(args, name, flush=False):
    """A redis-py client on ``name``'s database, emptied first if ``flush``."""
    import redis

    client = redis.Redis.from_url(db_url(args, name))
    if flush:
        client.flushdb()
    return client


def store_target(args, store, role):
    if store == "sqlite":  # one file per benchmark process (and its writer)
        return os.path.join(args.store_dir, f"{role}-{os.getpid()}.db")
    return db_url(args, "flask_executor") if store == "redis" else None


def make_executor(fe, target):
    from flask import Flask

    app = Flask("bench")
    app.config.update(EXECUTOR_TYPE="thread", EXECUTOR_MAX_WORKERS=WORKERS, SECRET_KEY=SECRET)
    app.config["EXECUTOR_FUTURES_MAX_LENGTH"] = 2**31  # never evict
    if target is not None:
        app.config["EXECUTOR_FUTURES_STORE"] = target
    app.add_url_rule("/some/path", "some_path", lambda: "ok")
    return app, fe.Executor(app)


# Setups: (args, flask_executor) -> state, once per benchmark process, outside the clock.
def submit_setup(store, args, fe):
    if store == "redis":
        redis_client(args, "flask_executor", flush=True)
    app, executor = make_executor(fe, store_target(args, store, "submit"))
    app.test_request_context("/some/path?x=1").push()
    wait([executor.submit(overhead.warm_task) for _ in range(2 * WORKERS)])  # starts all 4 workers
    keys, gate = itertools.count(), threading.Event()
    return {"executor": executor, "n": args.n, "keys": keys, "prefix": f"t{os.getpid()}-", "gate": gate}


def writer_ids(args, kind, fe_target=None):
    """Runs ``store.py writer``, a second process, which stores QUERY_KEYS jobs and exits."""
    cmd = [sys.executable, __file__, "writer", f"--kind={kind}", f"--redis-url={args.redis_url}"]
    cmd += [f"--module-dir={args.module_dir}", f"--target={fe_target or ''}"]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def query_setup(kind, args, fe):
    if kind == "memory":  # the reference: asked in the process that stored them
        _, executor = make_executor(fe, None)
        keys = [f"k{i}" for i in range(QUERY_KEYS)]
        wait([executor.submit_stored(k, overhead.noop) for k in keys])
        return {"ask": executor.futures.done, "ids": itertools.cycle(keys), "expect": True}
    if kind in ("sqlite", "redis"):
        target = store_target(args, kind, "query")
        if kind == "redis":
            redis_client(args, "flask_executor", flush=True)
        keys = writer_ids(args, kind, target)
        _, executor = make_executor(fe, target)
        return {"ask": executor.futures.done, "ids": itertools.cycle(keys), "expect": True}
    if kind == "ping":
        client = redis_client(args, "flask_executor")
        return {"ask": lambda _: client.ping(), "ids": itertools.repeat(None), "expect": True}
    if kind == "ping.connection":
        connection = redis_client(args, "flask_executor").connection_pool.make_connection()

        def ping(_):
            connection.send_command("PING")
            return connection.read_response()

        return {"ask": ping, "ids": itertools.repeat(None), "expect": b"PONG"}
    ids = itertools.cycle(writer_ids(args, kind.partition(".")[0]))
    if kind.startswith("rq"):
        from rq.job import Job, JobStatus

        conn = redis_client(args, "rq")
        if kind == "rq.get_status":
            return {
                "ask": lambda i: Job(i, connection=conn).get_status(),
                "ids": ids,
                "expect": JobStatus.QUEUED,
            }
        return {"ask": lambda i: Job.fetch(i, connection=conn).is_finished, "ids": ids, "expect": False}
    if kind == "celery":
        result = celery_app(args)[0].AsyncResult
        return {"ask": lambda i: result(i).state, "ids": ids, "expect": "PENDING"}
    huey = huey_app(args)[0]
    return {"ask": lambda i: huey.result(i, preserve=True), "ids": ids, "expect": None}


def celery_app(args):
    from celery import Celery

    app = Celery("bench", broker=db_url(args, "celery_broker"), backend=db_url(args, "celery_results"))
    return app, app.task(name="bench.noop")(overhead.noop)


def huey_app(args):
    from huey import RedisHuey

    huey = RedisHuey("bench", url=db_url(args, "huey"))
    return huey, huey.task(name="bench.noop")(overhead.noop)


def enqueue_setup(peer, args, fe):
    if peer == "rq":
        from rq import Queue

        queue = Queue("bench", connection=redis_client(args, "rq", flush=True))
        return {"enqueue": lambda: queue.enqueue(overhead.noop)}
    if peer == "celery":
        redis_client(args, "celery_broker", flush=True)
        redis_client(args, "celery_results", flush=True)
        task = celery_app(args)[1]
        return {"enqueue": task.delay}
    redis_client(args, "huey", flush=True)
    return {"enqueue": huey_app(args)[1]}  # calling a huey task enqueues it


# Time functions: (state, loops) -> seconds.
def submit_time(clock, st, loops):
    """``loops`` batches; seconds of the submit_stored calls alone (clocks "call" and "held")
    or of the whole batch, waiting and popping included (clock "batch")."""
    executor, n, gate, total = st["executor"], st["n"], st["gate"], 0.0
    submit, pop = executor.submit_stored, executor.futures.pop
    task, expect = (gate.wait, True) if clock == "held" else (overhead.noop, None)
    for _ in range(loops):
        keys = [st["prefix"] + str(next(st["keys"])) for _ in range(n)]
        gate.clear()
        t0 = time.perf_counter()
        futures = [submit(k, task) for k in keys]
        t1 = time.perf_counter()
        gate.set()
        wait(futures)
        for k in keys:
            pop(k)
        total += (time.perf_counter() if clock == "batch" else t1) - t0
        if any(f.result() is not expect for f in futures) or len(executor.futures):
            raise RuntimeError("wrong result, or futures left in the store after pop")
    return total


def query_time(st, loops):
    ask, ids, expect = st["ask"], st["ids"], st["expect"]
    t0 = time.perf_counter()
    for _ in range(loops):
        status = ask(next(ids))
        if status != expect:  # a missing key would be a cheaper, and wrong, measurement
            raise RuntimeError(f"unexpected status {status!r}, not {expect!r}")
    return time.perf_counter() - t0


def enqueue_time(st, loops):
    enqueue = st["enqueue"]
    t0 = time.perf_counter()
    for _ in range(loops):
        enqueue()
    return time.perf_counter() - t0


@dataclass
class Bench:
    name: str
    setup: Callable  # (args, flask_executor) -> state
    time_func: Callable  # (state, loops) -> seconds
    batch: bool = False  # a loop is a batch of n tasks, and a value is per task
    needs: tuple = ()  # "redis-server", and the packages it imports


REDIS = ("redis-server", "redis")
BENCHES = [
    Bench(f"submit.{store}.{clock}", partial(submit_setup, store), partial(submit_time, clock), True, needs)
    for store, needs in [("memory", ()), ("sqlite", ()), ("redis", REDIS)]
    for clock in ("held", "call", "batch")
]
BENCHES += [Bench(f"enqueue.{p}", partial(enqueue_setup, p), enqueue_time, needs=(*REDIS, p)) for p in PEERS]
QUERIES = {
    "query.memory": (),
    "query.sqlite": (),
    "query.redis": REDIS,
    "query.rq.fetch": (*REDIS, "rq"),
    "query.rq.get_status": (*REDIS, "rq"),
    "query.celery": (*REDIS, "celery"),
    "query.huey": (*REDIS, "huey"),
    "redis.ping": REDIS,
    "redis.ping.connection": REDIS,
}
BENCHES += [
    Bench(name, partial(query_setup, name.partition(".")[2]), query_time, needs=needs)
    for name, needs in QUERIES.items()
]
BY_NAME = {b.name: b for b in BENCHES}
ADD_SCENARIOS = ("collection_add_50", "collection_add_10000")  # run from overhead.py


def common_options(parser):
    parser.add_argument("--module-dir", default=overhead.REPO, help="directory holding flask_executor.py")
    parser.add_argument("--redis-url", default="", help="redis://127.0.0.1:PORT (no database)")
    parser.add_argument("--store-dir", default=tempfile.gettempdir(), help="where SQLite files go")


def pyperf_main(argv):
    import pyperf

    def pass_on(cmd, args):
        cmd += ["--bench", args.bench, "--n", str(args.n), "--module-dir", args.module_dir]
        cmd += ["--redis-url", args.redis_url, "--store-dir", args.store_dir]

    runner = pyperf.Runner(program_args=(sys.argv[0], "run"), add_cmdline_args=pass_on)
    runner.argparser.add_argument("--bench", choices=list(BY_NAME), default="query.sqlite")
    runner.argparser.add_argument("--n", type=int, default=1000, help="tasks per batch (submit.*)")
    common_options(runner.argparser)
    args = runner.parse_args(argv)
    bench, fe = BY_NAME[args.bench], overhead.import_executor(args.module_dir)
    runner.metadata.update(overhead.module_info(fe), bench_n=args.n, **versions())
    state = []

    def timed(loops):
        if not state:
            state.append(bench.setup(args, fe))
        return bench.time_func(state[0], loops)

    runner.bench_time_func(bench.name, timed, inner_loops=args.n if bench.batch else None)


def writer_main(argv):
    """The second process of the query benchmarks: stores QUERY_KEYS jobs, prints their keys
    or ids as JSON, and exits (Flask-Executor's tasks have finished; the peers' are queued)."""
    p = argparse.ArgumentParser()
    p.add_argument("--kind", required=True)
    p.add_argument("--target", default="")
    common_options(p)
    args = p.parse_args(argv)
    if args.kind in ("sqlite", "redis"):
        _, executor = make_executor(overhead.import_executor(args.module_dir), args.target)
        keys = [f"q{os.getpid()}-{i}" for i in range(QUERY_KEYS)]
        wait([executor.submit_stored(k, overhead.noop) for k in keys])
        executor.shutdown(wait=True)
        ids = keys
    else:  # enqueue_setup empties the peer's databases first
        enqueue = enqueue_setup(args.kind, args, None)["enqueue"]
        ids = [enqueue().id for _ in range(QUERY_KEYS)]
    print(json.dumps(ids))


def versions():
    out = {}
    for package in ("rq", "celery", "redis", "huey", "hiredis"):
        try:
            out[f"{package}_version"] = version(package)
        except PackageNotFoundError:
            pass
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        server = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
        out["redis_server"] = server.split()[2].removeprefix("v=")
    import sqlite3

    out["sqlite_version"] = sqlite3.sqlite_version
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def redis_server(log_dir):
    """A private redis-server on a free loopback port, stopped on leaving; None when absent."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(binary):
        yield None
        return
    port = free_port()
    cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    with open(os.path.join(log_dir, "redis-server.log"), "w") as log:
        server = subprocess.Popen(cmd + ["--dir", log_dir], stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    break
            time.sleep(0.05)
        else:
            raise RuntimeError(f"redis-server did not answer on port {port}")
        yield f"redis://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(10)


def runnable(opts, have_server):
    """The benchmarks this machine can run, and a note for each one skipped."""
    chosen, notes = [], []
    for bench in BENCHES:
        if opts.benches and bench.name not in opts.benches:
            continue
        missing = [n for n in bench.needs if n != "redis-server" and not importable(n)]
        if "redis-server" in bench.needs and not have_server:
            missing.insert(0, "redis-server")
        if missing:
            notes.append(f"{bench.name}: skipped, no {' or '.join(missing)}")
        else:
            chosen.append(bench)
    return chosen, notes


def importable(package):
    import importlib.util

    return importlib.util.find_spec(package) is not None


def run_all(opts, benches, redis_url, store_dir):
    if os.path.exists(opts.output):
        os.remove(opts.output)
    perf = ["-q", "-p1", "-n1", "-w0"] if opts.quick else [f"-p{opts.processes}"]
    n = opts.n or (200 if opts.quick else 1000)
    common = [f"--module-dir={opts.module_dir}", "--timeout=300", "--append", opts.output]
    failed = {}
    names = [b.name for b in benches] + ([] if opts.benches else list(ADD_SCENARIOS))
    for rnd in range(1 if opts.quick else opts.rounds):
        for name in names[:: -1 if rnd % 2 else 1]:
            if name in failed:
                continue
            if name in ADD_SCENARIOS:
                cmd = [sys.executable, overhead.__file__, "run", f"--scenario={name}", "--impl=ours"]
                cmd += [f"--n={50 if name.endswith('_50') else 10_000}"]
            else:
                cmd = [sys.executable, __file__, "run", f"--bench={name}", f"--n={n}"]
                cmd += [f"--redis-url={redis_url or ''}", f"--store-dir={store_dir}"]
            batch = name in BY_NAME and BY_NAME[name].batch  # a value is one batch: no calibration
            loops = "--loops=1" if opts.quick or batch else "--loops=0"
            proc = subprocess.run(cmd + common + perf + [loops], stderr=subprocess.PIPE, text=True)
            if proc.returncode:  # the worker's exception comes first, then pyperf's "worker failed"
                lines = [x for x in proc.stderr.splitlines() if x[:1].strip() and x[:9] != "Traceback"]
                failed[name] = (lines or [f"exit status {proc.returncode}"])[0][:200]
                print(f"{name} failed:\n{proc.stderr}", file=sys.stderr)
    return failed


def report(opts, notes, failed):
    import pyperf

    suite = pyperf.BenchmarkSuite.load(opts.output) if os.path.exists(opts.output) else None
    benches = suite.get_benchmarks() if suite else []
    med = {b.get_name(): b.median() * 1e6 for b in benches}  # µs
    print("\ncommand: python bench/store.py " + " ".join(opts.argv))
    if benches:
        m = benches[0].get_metadata()
        load = sorted(r.get_metadata().get("load_avg_1min", 0) for b in benches for r in b.get_runs())
        clients = (*PEERS, "redis", "hiredis")
        peers = ", ".join(f"{p} {m[p + '_version']}" for p in clients if p + "_version" in m)
        peers += "" if "hiredis_version" in m else " (no hiredis: redis-py parses replies in Python)"
        print(f"{m['flask_executor_file']} (sha1 {m['flask_executor_sha1']}), Python {m['python_version']}")
        server, cpu = m.get("redis_server", "-"), f"{m.get('cpu_model_name')}, {m['cpu_count']} CPUs"
        print(f"  Flask {m['flask_version']}, SQLite {m['sqlite_version']}, redis-server {server}")
        print(f"  {peers}; {cpu}; load average {load[0]} to {load[-1]}")
    if opts.quick:
        print("--quick is a smoke check, one value per benchmark: the figures below are not measurements")

    def cell(name):
        return f"{med[name]:.1f}" if name in med else "-"

    stores, rq = ("memory", "sqlite", "redis"), f"{cell('query.rq.fetch')} / {cell('query.rq.get_status')}"
    rows = [
        ["µs per task or query (median)", "in-process", "SQLite", "Redis", "RQ", "Celery", "Huey"],
        ["enqueue, no worker running", *(cell(f"submit.{s}.held") for s in stores)]
        + [cell(f"enqueue.{p}") for p in PEERS],
        ["submit_stored, no-ops running", *(cell(f"submit.{s}.call") for s in stores), "", "", ""],
        ["submit_stored + wait + pop", *(cell(f"submit.{s}.batch") for s in stores), "", "", ""],
        ["status query, another process", cell("query.memory") + "*", cell("query.sqlite")]
        + [cell("query.redis"), rq, cell("query.celery"), cell("query.huey")],
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("* asked in the process that stored it: no other process can.  RQ: Job.fetch(id).is_finished")
    print(f"  / Job(id).get_status().  One Redis round trip (redis-py ping): {cell('redis.ping')} µs;")
    print(f"  on a connection of its own, without redis-py's pool: {cell('redis.ping.connection')} µs")
    if "collection_add_50.ours" in med and "collection_add_10000.ours" in med:
        small, big = med["collection_add_50.ours"], med["collection_add_10000.ours"]
        print(f"FutureCollection.add, all unfinished: {small:.2f} µs at 50, {big:.2f} µs at 10,000:")
        print(f"  add@10000 / add@50 = {big / small:.2f} (constant: ~1)")
    targets = [
        ("submit_stored, SQLite store <= 100 µs (no-ops running)", "submit.sqlite.call", 100),
        ("submit_stored, SQLite store <= 100 µs (no worker running)", "submit.sqlite.held", 100),
        ("status query from another process, SQLite <= 20 µs", "query.sqlite", 20),
        ("status query, Redis <= one round trip (ping)", "query.redis", med.get("redis.ping")),
    ]
    if any(f"enqueue.{p}" in med for p in PEERS):
        limit, peer = min((med[f"enqueue.{p}"], p) for p in PEERS if f"enqueue.{p}" in med)
        for clock, label in [("held", "no worker running"), ("call", "no-ops running")]:
            targets.insert(
                2,
                (
                    f"submit_stored, Redis <= the fastest peer, {peer} ({label})",
                    f"submit.redis.{clock}",
                    limit,
                ),
            )
    print("Targets:" if not opts.quick else "Targets: not judged in --quick mode")
    for label, name, limit in targets if not opts.quick else ():
        if name in med and limit:
            verdict = "met" if med[name] <= limit else f"missed, {med[name] / limit:.2f}x"
            print(f"  {label}: {med[name]:.1f} µs against {limit:.1f} µs: {verdict}")
        else:
            print(f"  {label}: not measured")
    for note in notes:
        print(f"note: {note}")
    for name, error in failed.items():
        print(f"{name} fails: {error}")


def profile_main(opts, redis_url, store_dir):
    """cProfile over a few loops of one benchmark, in this thread and every thread started after."""
    import cProfile
    import pstats

    bench, profiles = BY_NAME[opts.profile], []

    def start_profiler(*_):
        sys.setprofile(None)
        profiles.append(cProfile.Profile())
        profiles[-1].enable()

    threading.setprofile(start_profiler)
    args = argparse.Namespace(
        module_dir=opts.module_dir, redis_url=redis_url, store_dir=store_dir, n=opts.n or 1000
    )
    state = bench.setup(args, overhead.import_executor(opts.module_dir))
    main = cProfile.Profile()
    main.runcall(bench.time_func, state, 3 if bench.batch else 20_000)
    if "executor" in state:
        state["executor"].shutdown(wait=True)
    pstats.Stats(main, *profiles).sort_stats(opts.sort).print_stats(30)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:
        return pyperf_main(argv[1:])
    if argv[:1] == ["writer"]:
        return writer_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke check: one value each, no claims")
    p.add_argument("--module-dir", default=overhead.REPO, help="holds the flask_executor.py to measure")
    p.add_argument("-o", "--output", default="/tmp/bench-results/store.json", help="pyperf JSON file")
    p.add_argument("--benches", help="comma-separated subset (default: all, with the collection_add pair)")
    p.add_argument("--rounds", type=int, default=4, help="rounds, alternating the order (%(default)s)")
    p.add_argument("--processes", type=int, default=2, help="pyperf workers per benchmark and round")
    p.add_argument("--n", type=int, help="tasks per batch in submit.* (default 1000)")
    p.add_argument("--profile", metavar="BENCH", choices=list(BY_NAME), help="cProfile one benchmark")
    p.add_argument("--sort", default="tottime", help="pstats sort key for --profile (%(default)s)")
    opts = p.parse_args(argv)
    opts.argv = argv
    opts.benches = opts.benches.split(",") if opts.benches else []
    os.makedirs(os.path.dirname(os.path.abspath(opts.output)), exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-store-") as store_dir, redis_server(store_dir) as url:
        if opts.profile:
            return profile_main(opts, url, store_dir)
        benches, notes = runnable(opts, url is not None)
        if url is None:
            print("note: no redis-server: the Redis rows are skipped", file=sys.stderr)
        failed = run_all(opts, benches, url, store_dir)
    report(opts, notes, failed)
    print(f"({time.monotonic() - started:.0f} s; results in {opts.output})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
