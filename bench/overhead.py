"""Per-task overhead of Flask-Executor against a bare concurrent.futures pool, timed with pyperf.

Setup: ``pip install -r bench/requirements.txt``; for the 1.0 columns, a second environment
with ``flask-executor==1.0.0`` too.  From the repository root::

    python bench/overhead.py                         # every scenario, then the table
    python bench/overhead.py --compare-python /tmp/bench10-venv/bin/python   # + 1.0 columns
    python bench/overhead.py --quick                 # CI smoke check: < 60 s, claims nothing
    python bench/overhead.py --profile request       # cProfile of one scenario, every thread

Each scenario is two pyperf benchmarks of one session, ``NAME.bare`` (the standard pool)
and ``NAME.ours``, measured in alternating rounds.  A value is one batch (submit N tasks,
wait for all; for ``collection_add_*``, one add); the table shows medians, and 1.0/bare is
against the bare pool under the 1.0 interpreter ("fails": 1.0 raised).
Results: ``-o`` (default /tmp/bench-results/overhead.json), ``...-1.0.json``,
``...-memory.json``; ``python -m pyperf stats FILE`` shows the spread.  Memory: RSS growth
from task 10,000 to 100,000 (no-op tasks submitted in a request, batches of 1,000 waited
for and dropped), one fresh process per implementation.

A/B of two versions: freeze each (edits during a run must not leak into it), run, compare
(the ``.bare`` rows show how far the machine drifted)::

    git show HEAD~1:flask_executor.py > /tmp/before/flask_executor.py
    git show HEAD:flask_executor.py > /tmp/after/flask_executor.py
    python bench/overhead.py --module-dir /tmp/before -o /tmp/bench-results/before.json
    python bench/overhead.py --module-dir /tmp/after -o /tmp/bench-results/after.json
    python -m pyperf compare_to /tmp/bench-results/before.json /tmp/bench-results/after.json --table

``--module-dir`` (default: the repository) goes first on ``sys.path``; every process checks
that ``flask_executor`` came from there, and its path and SHA-1 are printed and kept in the
JSON metadata.  One benchmark, with any pyperf option::

    python bench/overhead.py run --scenario stored --impl ours --rigorous -o stored.json

To add a scenario: a setup ``(impl, n, flask_executor) -> state``, time functions
``(state, loops) -> seconds`` (pyperf's ``bench_time_func``), an entry in ``SCENARIOS``.
The exit status is non-zero only when a measurement of the ``--module-dir`` module fails.
"""

import argparse
import functools
import gc
import hashlib
import importlib
import itertools
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass
from types import SimpleNamespace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = 4


# Tasks: module level, so that process pools pickle them by reference.
def noop():
    return None


def identity(x):
    return x


def small_task():
    return sum(range(100))


def warm_task():
    time.sleep(0.02)
    return os.getpid()


def import_executor(module_dir):
    """flask_executor from ``module_dir`` (None: the installed one), checked."""
    if module_dir:
        sys.path.insert(0, os.path.abspath(module_dir))
    import flask_executor

    path = os.path.realpath(flask_executor.__file__)
    if module_dir and os.path.dirname(path) != os.path.realpath(module_dir):
        raise SystemExit(f"imported {path}, not the flask_executor.py in {module_dir}")
    return flask_executor


def module_info(fe):
    from importlib.metadata import version

    with open(fe.__file__, "rb") as f:
        sha1 = hashlib.sha1(f.read()).hexdigest()[:12]
    return {
        "flask_executor_file": os.path.realpath(fe.__file__),
        "flask_executor_version": str(getattr(fe, "__version__", "?")),
        "flask_executor_sha1": sha1,
        "flask_version": version("flask"),
    }


# Setups: (impl, n, flask_executor) -> state, run once per worker process, outside the clock.
def pool_setup(executor_type, context, impl, n, fe):
    from flask import Flask

    app = Flask("bench")
    app.config.update(EXECUTOR_TYPE=executor_type, EXECUTOR_MAX_WORKERS=WORKERS)
    app.config["EXECUTOR_FUTURES_MAX_LENGTH"] = 2**31  # never evict (1.0 reads 0 as "keep none")
    app.add_url_rule("/some/path", "some_path", lambda: "ok")  # a real route to match
    if impl == "ours":
        pool = fe.Executor(app)
    else:
        pool = (ProcessPoolExecutor if executor_type == "process" else ThreadPoolExecutor)(WORKERS)
    if context == "request":
        app.test_request_context("/some/path?x=1").push()
    elif context == "app":
        app.app_context().push()
    wait([pool.submit(warm_task) for _ in range(2 * WORKERS)])  # starts all 4 workers
    task, expect = (small_task, 4950) if executor_type == "process" else (noop, None)
    return SimpleNamespace(pool=pool, n=n, task=task, expect=expect, keys=itertools.count(), store={})


def collection_setup(impl, n, fe):
    """A FutureCollection(max_length=n) full of futures that never finish."""
    mod = fe if hasattr(fe, "FutureCollection") else importlib.import_module("flask_executor.futures")
    coll = mod.FutureCollection(max_length=n)
    coll.logger = logging.getLogger("bench.silent")  # eviction warnings: not what is measured
    coll.logger.setLevel(logging.CRITICAL)
    futures = [Future() for _ in range(2 * n)]  # used in turn: each is evicted before its reuse
    for i in range(n):
        coll.add(i, futures[i])
    cycle = itertools.islice(itertools.cycle(futures), n, None)
    return SimpleNamespace(coll=coll, keys=itertools.count(n), futures=cycle, pool=None)


# Time functions: (state, loops) -> seconds taken by ``loops`` repetitions.
def submit_batch(st, loops):
    total = 0.0
    for _ in range(loops):
        t0 = time.perf_counter()
        fs = [st.pool.submit(st.task) for _ in range(st.n)]
        wait(fs)
        total += time.perf_counter() - t0
        if any(f.result() != st.expect for f in fs):  # and re-raises what a task raised
            raise RuntimeError("wrong result")
    return total


def map_batch(st, loops):
    total = 0.0
    for _ in range(loops):
        t0 = time.perf_counter()
        out = list(st.pool.map(identity, range(st.n)))
        total += time.perf_counter() - t0
        if out != list(range(st.n)):
            raise RuntimeError("map returned wrong results")
    return total


def stored_bare(st, loops):
    total = 0.0
    for _ in range(loops):
        keys = [f"task-{next(st.keys)}" for _ in range(st.n)]
        t0 = time.perf_counter()
        fs = []
        for k in keys:
            f = st.store[k] = st.pool.submit(noop)
            fs.append(f)
        wait(fs)
        for k in keys:
            st.store.pop(k)
        total += time.perf_counter() - t0
        [f.result() for f in fs]
    return total


def stored_ours(st, loops):
    total = 0.0
    for _ in range(loops):
        keys = [f"task-{next(st.keys)}" for _ in range(st.n)]
        t0 = time.perf_counter()
        fs = [st.pool.submit_stored(k, noop) for k in keys]
        wait(fs)
        for k in keys:
            st.pool.futures.pop(k)
        total += time.perf_counter() - t0
        [f.result() for f in fs]
        if len(st.pool.futures):
            raise RuntimeError("futures left in the collection after pop")
    return total


def collection_add(st, loops):
    add, keys, futures = st.coll.add, st.keys, st.futures
    t0 = time.perf_counter()
    for _ in range(loops):
        add(next(keys), next(futures))
    return time.perf_counter() - t0


@dataclass
class Scenario:
    name: str
    label: str
    setup: Callable  # (impl, n, flask_executor) -> state
    bare: Callable | None  # (state, loops) -> seconds; None: nothing to compare with
    ours: Callable
    n: int  # tasks per batch (collections: max_length)
    quick_n: int | None = None  # n under --quick (default: n)
    goal: float | None = None  # the README's target for ours/bare
    loops: int = 1  # per value: 1 = a value is one batch; 0 = let pyperf calibrate

    def size(self, opts):
        return opts.n or (self.quick_n or self.n if opts.quick else self.n)


REQ, APP, NOCTX = (functools.partial(pool_setup, "thread", c) for c in ("request", "app", None))
PROC = functools.partial(pool_setup, "process", "app")
ADD = {"setup": collection_setup, "bare": None, "ours": collection_add, "loops": 0}
SCENARIOS = [
    Scenario("request", "submit inside a request", REQ, submit_batch, submit_batch, 10_000, 2_000, 2.5),
    Scenario("app", "submit in an app context only", APP, submit_batch, submit_batch, 10_000, 2_000, 1.5),
    Scenario("map", "map inside a request", REQ, map_batch, map_batch, 10_000, 2_000, 2.5),
    Scenario("stored", "submit_stored + futures.pop", REQ, stored_bare, stored_ours, 10_000, 2_000, 2.7),
    Scenario("process", "process pool, sum(range(100))", PROC, submit_batch, submit_batch, 1_000, 200, 1.1),
    Scenario("nocontext", "submit, no context (info)", NOCTX, submit_batch, submit_batch, 10_000, 2_000),
    Scenario("collection_add_50", "FutureCollection.add, 50 unfinished", n=50, **ADD),
    Scenario("collection_add_10000", "FutureCollection.add, 10,000 unfinished", n=10_000, **ADD),
]
BY_NAME = {s.name: s for s in SCENARIOS}


def child_options(parser):
    parser.add_argument("--scenario", choices=list(BY_NAME), default="request")
    parser.add_argument("--impl", choices=["bare", "ours"], default="ours")
    parser.add_argument("--n", type=int, help="tasks per batch (default: the scenario's)")
    parser.add_argument("--module-dir", default=REPO, help="directory holding flask_executor.py")
    parser.add_argument("--installed", action="store_true", help="import the installed flask_executor")


def pyperf_main(argv):
    """One benchmark: a pyperf manager, which runs this again as its workers."""
    import pyperf

    def pass_on(cmd, args):
        cmd += ["--scenario", args.scenario, "--impl", args.impl, "--n", str(args.n)]
        cmd += ["--installed"] if args.installed else ["--module-dir", args.module_dir]

    runner = pyperf.Runner(program_args=(sys.argv[0], "run"), add_cmdline_args=pass_on)
    child_options(runner.argparser)
    args = runner.parse_args(argv)
    sc = BY_NAME[args.scenario]
    args.n = args.n or sc.n
    fe = import_executor(None if args.installed else args.module_dir)
    runner.metadata.update(module_info(fe), bench_n=args.n)
    time_func, state = sc.bare if args.impl == "bare" else sc.ours, []

    def timed(loops):
        if not state:  # the first call in this process: set up, outside the clock
            state.append(sc.setup(args.impl, args.n, fe))
        return time_func(state[0], loops)

    runner.bench_time_func(f"{sc.name}.{args.impl}", timed)


def rss_bytes():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource  # the peak, not the current size: a fallback

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_main(argv):
    parser = argparse.ArgumentParser()
    child_options(parser)
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--baseline", type=int, default=10_000)
    args = parser.parse_args(argv)
    fe = import_executor(None if args.installed else args.module_dir)
    st = pool_setup("thread", "request", args.impl, 1000, fe)
    for done in range(1000, args.tasks + 1, 1000):
        submit_batch(st, 1)
        if done == args.baseline:
            gc.collect()
            base = rss_bytes()
    gc.collect()
    growth = rss_bytes() - base
    print(json.dumps({"impl": args.impl, "growth": growth, "tasks": args.tasks, **module_info(fe)}))


def profile_main(opts):
    """cProfile over three batches of one scenario (ours), in the submitting thread and every
    thread started after (the pool's); times are summed over threads, idle waits included."""
    import cProfile
    import pstats
    import threading

    sc, profiles = BY_NAME[opts.profile], []

    def start_profiler(*_):
        sys.setprofile(None)
        profiles.append(cProfile.Profile())
        profiles[-1].enable()

    threading.setprofile(start_profiler)
    st = sc.setup("ours", opts.n or sc.n, import_executor(opts.module_dir))
    main = cProfile.Profile()
    main.runcall(sc.ours, st, 3)
    if st.pool is not None:
        st.pool.shutdown(wait=True)  # the threads end: their profiles are complete
    pstats.Stats(main, *profiles).sort_stats(opts.sort).print_stats(30)


def run_benchmarks(opts, python, module, path, env):
    """Every scenario under ``python``, in rounds that alternate bare and ours (so that a drift of
    the machine's load hits both), each round adding runs to ``path``; returns {scenario: error}."""
    if os.path.exists(path):
        os.remove(path)
    perf = ["-q", "-p1", "-n1", "-w0"] if opts.quick else [f"-p{opts.processes}"]
    failed = {}
    for rnd, sc in itertools.product(range(1 if opts.quick else opts.rounds), opts.scenarios):
        impls, loops = ("ours", "bare") if sc.bare else ("ours",), 1 if opts.quick else sc.loops
        for impl in [] if sc.name in failed else impls[:: -1 if rnd % 2 else 1]:
            cmd = [python, __file__, "run", f"--scenario={sc.name}", f"--impl={impl}", f"--n={sc.size(opts)}"]
            cmd += [*module, *perf, f"--loops={loops}", "--timeout=300", "--append", path]
            proc = subprocess.run(cmd, env=env, stderr=subprocess.PIPE, text=True)
            if proc.returncode:  # the worker's exception comes first, then pyperf's "worker failed"
                lines = [x for x in proc.stderr.splitlines() if x[:1].strip() and x[:9] != "Traceback"]
                failed[sc.name] = (lines or [f"exit status {proc.returncode}"])[0][:200]
                print(f"{sc.name}.{impl} failed under {python}: {failed[sc.name]}", file=sys.stderr)
                if env is None:  # the module under --module-dir: the whole traceback
                    sys.stderr.write(proc.stderr)
                break
    return failed


def run_memory(opts, runs):
    sizes = ["--tasks=20000", "--baseline=2000"] if opts.quick else []
    out = {}
    for label, python, module, env, impl in runs:
        cmd = [python, __file__, "memory", "--impl", impl, *module, *sizes]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        out[label] = json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc.stderr[-300:]}
    return out


def report(opts, paths, failures, memory):
    import pyperf

    suites = {label: pyperf.BenchmarkSuite.load(p) for label, p in paths.items() if os.path.exists(p)}

    def median(label, name):
        try:
            bench = suites[label].get_benchmark(name)
        except KeyError:
            return None, "-"
        return bench.median(), bench.format_value(bench.median())

    print()
    for label, suite in suites.items():
        meta = [b.get_metadata() for b in suite.get_benchmarks()]
        m, runs = meta[0], [r.get_metadata() for b in suite.get_benchmarks() for r in b.get_runs()]
        print(
            f"{label}: {m['flask_executor_file']} (version {m['flask_executor_version']}, sha1"
            f" {m['flask_executor_sha1']}), Python {m['python_version']}, Flask {m['flask_version']}"
        )
        load = sorted(r.get("load_avg_1min", 0) for r in runs)
        print(f"  {m.get('cpu_model_name')}, {m['cpu_count']} CPUs; load average {load[0]} to {load[-1]}")
        if len({x["flask_executor_sha1"] for x in meta}) > 1:
            print(f"WARNING: {label}'s flask_executor.py changed during the run: freeze a copy, run again")
    if opts.quick:
        print("--quick is a smoke check, one value per benchmark: the figures below are not measurements")
    cmp = "1.0" in paths
    rows = [["scenario", "n", "bare", "ours", "ours/bare", "goal"] + (["1.0", "1.0/bare"] if cmp else [])]
    for sc in opts.scenarios:
        (bare, bare_s), (ours, ours_s) = median("ours", sc.name + ".bare"), median("ours", sc.name + ".ours")
        ratio = f"{ours / bare:.2f}" if bare and ours else "-"
        goal = f"<= {sc.goal}" if sc.goal else "-"
        row = [sc.label, f"{sc.size(opts):,}", bare_s, ours_s if ours else "fails", ratio, goal]
        if cmp:
            (bare1, _), (v1, v1_s) = median("1.0", sc.name + ".bare"), median("1.0", sc.name + ".ours")
            ratio = f"{v1 / bare1:.2f}" if bare1 and v1 else "-"
            row += ["fails", "-"] if sc.name in failures.get("1.0", {}) else [v1_s, ratio]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    for label in suites:
        (small, _), (big, _) = (median(label, f"collection_add_{n}.ours") for n in (50, 10000))
        if small and big:
            print(f"FutureCollection.add, {label}: add@10000 / add@50 = {big / small:.1f} (constant: ~1)")
    if memory:
        print("RSS growth after the first tenth of the tasks (submit in a request):")
        for k, v in memory.items():
            print(f"  {k:<4} {v['growth'] / 2**20:+.2f} MiB" if "growth" in v else f"  {k:<4} fails")
    for label, errors in failures.items():
        for name, error in errors.items():
            print(f"{label} {name} fails: {error}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:
        return pyperf_main(argv[1:])
    if argv[:1] == ["memory"]:
        return memory_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI smoke check: one value each, < 60 s, no claims")
    p.add_argument("--module-dir", default=REPO, help="holds the flask_executor.py to measure")
    p.add_argument("--compare-python", metavar="PATH", help="a Python with flask-executor==1.0.0")
    p.add_argument("-o", "--output", default="/tmp/bench-results/overhead.json", help="pyperf JSON file")
    p.add_argument("--scenarios", default=",".join(BY_NAME), help="comma-separated subset (default: all)")
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds (%(default)s)")
    p.add_argument("--processes", type=int, default=2, help="pyperf workers per benchmark and round")
    p.add_argument("--n", type=int, help="tasks per batch in every scenario (default: each one's)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory measurement")
    p.add_argument("--profile", metavar="SCENARIO", choices=list(BY_NAME), help="cProfile one scenario")
    p.add_argument("--sort", default="tottime", help="pstats sort key for --profile (%(default)s)")
    opts = p.parse_args(argv)
    if opts.profile:
        return profile_main(opts)
    opts.scenarios = [BY_NAME[s] for s in opts.scenarios.split(",")]
    os.makedirs(os.path.dirname(os.path.abspath(opts.output)), exist_ok=True)
    stem = opts.output.removesuffix(".json")
    ours = ["--module-dir", opts.module_dir]
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # 1.0 is the installed one
    paths, started = {"ours": opts.output}, time.monotonic()
    failures = {"ours": run_benchmarks(opts, sys.executable, ours, opts.output, None)}
    mem_runs = [("bare", sys.executable, ours, None, "bare"), ("ours", sys.executable, ours, None, "ours")]
    if opts.compare_python:
        paths["1.0"] = stem + "-1.0.json"
        failures["1.0"] = run_benchmarks(opts, opts.compare_python, ["--installed"], paths["1.0"], clean)
        mem_runs.append(("1.0", opts.compare_python, ["--installed"], clean, "ours"))
    memory = run_memory(opts, mem_runs) if opts.memory else {}
    if memory:
        with open(stem + "-memory.json", "w") as f:
            json.dump(memory, f, indent=1)
    report(opts, paths, failures, memory)
    print(f"({time.monotonic() - started:.0f} s; results in {', '.join(paths.values())})")
    return 1 if failures["ours"] or "error" in memory.get("ours", {}) else 0


if __name__ == "__main__":
    sys.exit(main())
