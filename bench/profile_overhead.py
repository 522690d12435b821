"""Where the per-task time of Flask-Executor goes (a companion of overhead.py).

Run from the repository root, with Flask (and pyinstrument for that mode)::

    python bench/profile_overhead.py split          # submit-side vs worker-side cost per task
    python bench/profile_overhead.py cprofile       # cProfile of the submitting thread and the workers
    python bench/profile_overhead.py pyinstrument   # pyinstrument call trees
    python bench/profile_overhead.py micro          # timeit of the Flask building blocks
    python bench/profile_overhead.py instructions   # instructions per task under valgrind

``--scenario request|app|nocontext`` picks the context the tasks are submitted
from (default: request and app).  The repository directory is put first on
``sys.path``, so the repository's ``flask_executor.py`` is the one profiled.
"""

import argparse
import concurrent.futures as cf
import cProfile
import io
import os
import pstats
import sys
import threading
import time
import timeit

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORKERS = 4


def noop():
    return None


def make_app(executor_type="thread"):
    from flask import Flask

    app = Flask("bench")
    app.config["EXECUTOR_TYPE"] = executor_type
    app.config["EXECUTOR_MAX_WORKERS"] = WORKERS
    app.config["EXECUTOR_FUTURES_MAX_LENGTH"] = 2**31

    @app.route("/some/path")
    def some_path():
        return "ok"

    return app


def context_for(app, scenario):
    import contextlib

    if scenario == "request":
        return app.test_request_context("/some/path?x=1")
    if scenario == "app":
        return app.app_context()
    return contextlib.nullcontext()


def make_pools(executor_type="thread"):
    import flask_executor

    app = make_app(executor_type)
    ours = flask_executor.Executor(app)
    bare = cf.ThreadPoolExecutor(WORKERS)
    return app, bare, ours, flask_executor


def warm(pool):
    cf.wait([pool.submit(noop) for _ in range(500)])


def _block_workers(pool):
    """Occupies every worker with a task waiting on an event; returns the event."""
    release = threading.Event()
    started = threading.Semaphore(0)

    def blocker():
        started.release()
        release.wait()

    blockers = [pool.submit(blocker) for _ in range(WORKERS)]
    for _ in range(WORKERS):
        started.acquire()
    return release, blockers


def split(opts):
    """CPU per task: the submitting thread's with the workers blocked (so it runs
    alone), then the whole process's while the workers drain the queue (the
    submitter idle in wait())."""
    app, bare, ours, mod = make_pools()
    print(f"module: {mod.__file__}")
    print(f"CPU microseconds per task, median of {opts.rounds} alternating rounds of {opts.tasks} tasks")
    print(f"{'scenario':<10} {'impl':<5} {'submit us':>12} {'run us':>12} {'sum us':>12}")
    for scenario in opts.scenarios:
        with context_for(app, scenario):
            warm(bare)
            warm(ours)
            rows = {}
            for rnd in range(opts.rounds):
                for name, pool in (
                    (("bare", bare), ("ours", ours)) if rnd % 2 == 0 else (("ours", ours), ("bare", bare))
                ):
                    release, blockers = _block_workers(pool)
                    n = opts.tasks
                    # CPU clocks: robust when other processes load the machine.
                    t0 = time.thread_time()
                    fs = [pool.submit(noop) for _ in range(n)]
                    t1 = time.thread_time()
                    p1 = time.process_time()
                    release.set()
                    cf.wait(fs)
                    p2 = time.process_time()
                    cf.wait(blockers)
                    rows.setdefault(name, []).append(((t1 - t0) / n * 1e6, (p2 - p1) / n * 1e6))
            for name in ("bare", "ours"):
                sub = sorted(r[0] for r in rows[name])[len(rows[name]) // 2]
                drain = sorted(r[1] for r in rows[name])[len(rows[name]) // 2]
                print(f"{scenario:<10} {name:<5} {sub:12.2f} {drain:12.2f} {sub + drain:12.2f}")
    ours.shutdown()
    bare.shutdown()


def _profile_workers(pool, barrier_parties=WORKERS):
    """Enables a cProfile.Profile in every worker thread of ``pool``.  Returns a
    function that disables them and gives back the list of profilers."""
    profilers = []
    lock = threading.Lock()
    barrier = threading.Barrier(barrier_parties)

    def start():
        prof = cProfile.Profile()
        with lock:
            profilers.append(prof)
        barrier.wait()  # one per worker thread
        prof.enable()

    cf.wait([pool.submit(start) for _ in range(barrier_parties)])

    def stop():
        barrier2 = threading.Barrier(barrier_parties)

        def end():
            barrier2.wait()
            sys.setprofile(None)

        cf.wait([pool.submit(end) for _ in range(barrier_parties)])
        return profilers

    return stop


def _print_stats(title, profilers, sort, limit, out_path=None):
    stream = io.StringIO()
    stats = None
    for prof in profilers:
        if stats is None:
            stats = pstats.Stats(prof, stream=stream)
        else:
            stats.add(prof)
    if stats is None:
        return
    if out_path:
        stats.dump_stats(out_path)
    stats.strip_dirs().sort_stats(sort).print_stats(limit)
    print(f"==== {title} (sorted by {sort}) ====")
    text = stream.getvalue()
    # Drop pstats' header lines up to the table.
    print(text[text.find("   ncalls") :] if "   ncalls" in text else text)


def cprofile_mode(opts):
    """(a) EXECUTOR_TYPE='sync': submit and the whole task run inline, one thread,
    exact.  (b) the real thread pool: on Python >= 3.12 cProfile hooks every thread
    at once (sys.monitoring), so one profiler sees the submitter and the workers
    (call counts exact, times approximate where threads interleave); before 3.12
    each worker thread gets a profiler of its own."""
    app, bare, ours, mod = make_pools()
    print(f"module: {mod.__file__}")
    os.makedirs(opts.out, exist_ok=True)
    sync_app = make_app("sync")
    sync = mod.Executor(sync_app)
    for scenario in opts.scenarios:
        with context_for(sync_app, scenario):
            for _ in range(200):
                sync.submit(noop)
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(opts.tasks):
                sync.submit(noop)
            prof.disable()
        _print_stats(
            f"{scenario} / EXECUTOR_TYPE=sync (submit + run inline), {opts.tasks} tasks",
            [prof],
            opts.sort,
            opts.limit,
            os.path.join(opts.out, f"{scenario}-sync.prof"),
        )
    global_hooks = sys.version_info >= (3, 12)
    for scenario in opts.scenarios:
        for name, pool in (("bare", bare), ("ours", ours)):
            if name == "bare" and not opts.with_bare:
                continue
            with context_for(app, scenario):
                warm(pool)
                stop = None if global_hooks else _profile_workers(pool)
                main = cProfile.Profile()
                main.enable()
                fs = [pool.submit(noop) for _ in range(opts.tasks)]
                cf.wait(fs)
                main.disable()
                workers = stop() if stop else []
            which = "all threads" if global_hooks else "submitting thread"
            _print_stats(
                f"{scenario} / {name} thread pool: {which}, {opts.tasks} tasks",
                [main],
                opts.sort,
                opts.limit,
                os.path.join(opts.out, f"{scenario}-{name}-main.prof"),
            )
            if workers:
                _print_stats(
                    f"{scenario} / {name}: worker threads, {opts.tasks} tasks",
                    workers,
                    opts.sort,
                    opts.limit,
                    os.path.join(opts.out, f"{scenario}-{name}-workers.prof"),
                )
    ours.shutdown()
    bare.shutdown()


def pyinstrument_mode(opts):
    from pyinstrument import Profiler

    # 1) the submitting thread of the real thread pool.
    app, bare, ours, mod = make_pools()
    print(f"module: {mod.__file__}")
    for scenario in opts.scenarios:
        with context_for(app, scenario):
            warm(ours)
            prof = Profiler(interval=opts.interval)
            prof.start()
            fs = [ours.submit(noop) for _ in range(opts.tasks)]
            cf.wait(fs)
            prof.stop()
        print(f"==== pyinstrument, {scenario}, thread pool, submitting thread, {opts.tasks} tasks ====")
        print(prof.output_text(unicode=False, color=False, show_all=False))
    ours.shutdown()
    bare.shutdown()
    # 2) 'sync' mode runs the whole task (submit, context push, call, teardown)
    #    in the profiled thread: the worker side becomes visible too.
    sync_app = make_app("sync")
    sync = mod.Executor(sync_app)
    for scenario in opts.scenarios:
        with context_for(sync_app, scenario):
            for _ in range(200):
                sync.submit(noop)
            prof = Profiler(interval=opts.interval)
            prof.start()
            for _ in range(opts.tasks):
                sync.submit(noop)
            prof.stop()
        print(
            f"==== pyinstrument, {scenario}, EXECUTOR_TYPE=sync (submit + run inline),"
            f" {opts.tasks} tasks ===="
        )
        print(prof.output_text(unicode=False, color=False, show_all=False))


def micro(opts):
    """timeit of the pieces a task is made of, in microseconds per call."""
    import flask
    from flask import g

    app = make_app()
    n = opts.micro_n
    rows = []

    def t(label, stmt, setup=None):
        timer = timeit.Timer(stmt, setup=setup or (lambda: None))
        best = min(timer.repeat(repeat=5, number=n)) / n * 1e6
        rows.append((label, best))

    q = __import__("queue").SimpleQueue()
    t("concurrent.futures.Future()", cf.Future)
    t("SimpleQueue put+get", lambda: (q.put(1), q.get()))
    lock = threading.Lock()
    t("threading.Lock acquire/release", lambda: (lock.acquire(), lock.release()))
    t("threading.Condition()", threading.Condition)
    with app.test_request_context("/some/path?x=1") as rctx:
        g.user = "someone"
        t("flask.has_app_context()", flask.has_app_context)
        t("flask.has_request_context()", flask.has_request_context)
        t("dict(vars(g))", lambda: dict(vars(g._get_current_object())))
        t("app.app_context()", app.app_context)
        t("app.app_context() push+pop", lambda: _push_pop(app.app_context()))
        req = rctx.request
        sess = rctx.session
        from flask.ctx import RequestContext

        t(
            "RequestContext(app, environ, request, session)",
            lambda: RequestContext(app, req.environ, req, sess),
        )
        t(
            "RequestContext(...) push+pop (app ctx already pushed by it)",
            lambda: _push_pop(RequestContext(app, req.environ, req, sess)),
        )
        t(
            "app ctx + RequestContext push/pop (as a task does)",
            lambda: _push_pop_pair(app.app_context(), RequestContext(app, req.environ, req, sess)),
        )
        t("rctx.copy()", rctx.copy)
        try:
            import flask_executor as fe

            t("flask_executor.TaskFuture()", fe.TaskFuture)
            if hasattr(fe, "_CapturedContexts"):
                t("_CapturedContexts(app) in a request", lambda: fe._CapturedContexts(app))
                cap = fe._CapturedContexts(app)
                for meth in ("make", "app_context", "take_request_context"):
                    if hasattr(cap, meth):
                        t(f"_CapturedContexts.{meth}() in a request", getattr(cap, meth))
                if hasattr(fe, "_TaskRequestContext"):
                    t(
                        "_TaskRequestContext(...) push+pop with app ctx",
                        lambda: _push_pop_pair(
                            app.app_context(), fe._TaskRequestContext(app, req.environ, req, sess)
                        ),
                    )
        except ImportError as exc:
            print(f"flask_executor not importable: {exc}")
    with app.app_context():
        try:
            import flask_executor as fe

            if hasattr(fe, "_CapturedContexts"):
                t("_CapturedContexts(app) in an app context", lambda: fe._CapturedContexts(app))
                cap = fe._CapturedContexts(app)
                for meth in ("make", "app_context"):
                    if hasattr(cap, meth):
                        t(f"_CapturedContexts.{meth}() in an app context", getattr(cap, meth))
        except ImportError:
            pass
    width = max(len(r[0]) for r in rows)
    print("{}  {}".format("operation".ljust(width), "us/call (best of 5)"))
    for label, us in rows:
        print(f"{label.ljust(width)}  {us:8.2f}")


def _push_pop(ctx):
    ctx.push()
    ctx.pop()


def _push_pop_pair(app_ctx, req_ctx):
    app_ctx.push()
    req_ctx.push()
    req_ctx.pop()
    app_ctx.pop()


def _callgrind_ir(python, scenario, impl, n, repo, env_repo):
    """Instructions executed by one overhead.py child under callgrind."""
    import re
    import subprocess

    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if env_repo:
        env["PYTHONPATH"] = repo
    cmd = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        python,
        os.path.join(HERE, "overhead.py"),
        "--child",
        "--scenario",
        scenario,
        "--impl",
        impl,
        "-n",
        str(n),
        "--reps",
        "1",
        "--repo",
        repo,
    ]
    proc = subprocess.run(cmd, env=env, cwd=HERE, capture_output=True, text=True, timeout=900)
    if '"error"' in proc.stdout:
        return None
    match = re.search(r"Collected : (\d+)", proc.stderr)
    return int(match.group(1)) if match else None


def instructions(opts):
    """Instructions per task under valgrind (callgrind), bare vs ours: a figure that
    does not move with the load other processes put on the machine.  Each figure is
    (Ir(n2) - Ir(n1)) / (n2 - n1) of two overhead.py children, so start-up, imports
    and warm-up cancel out.  Valgrind runs one thread at a time, so this counts work,
    not waiting."""
    n1, n2 = opts.ir_tasks
    python = opts.python or sys.executable
    scenarios = opts.ir_scenarios.split(",")
    impls = [("bare", python, False), ("ours", python, True)]
    if opts.compare_python:
        impls += [("v1", opts.compare_python, False)]
    print(f"instructions per task (callgrind, n={n1} vs n={n2})")
    print(f"{'scenario':<10} {'bare Ir':>12} {'ours Ir':>12} {'ratio':>8} {'1.0 Ir':>12} {'ratio':>8}")
    for scenario in scenarios:
        per = {}
        for impl, py, env_repo in impls:
            a = _callgrind_ir(py, scenario, impl, n1, os.path.abspath(opts.repo), env_repo)
            b = _callgrind_ir(py, scenario, impl, n2, os.path.abspath(opts.repo), env_repo)
            per[impl] = (b - a) / float(n2 - n1) if a and b else None
        bare = per.get("bare")
        cells = []
        for impl in ("ours", "v1"):
            v = per.get(impl)
            if impl == "v1" and not opts.compare_python:
                continue
            cells.append((f"{v:12.0f} {v / bare:8.2f}") if v and bare else f"{'fails':>12} {'-':>8}")
        print(f"{scenario:<10} {f'{bare:.0f}' if bare else '-':>12} {' '.join(cells)}")
        sys.stdout.flush()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["split", "cprofile", "pyinstrument", "micro", "instructions"])
    p.add_argument(
        "--ir-tasks",
        type=lambda v: tuple(int(x) for x in v.split(",")),
        default=(1000, 3000),
        help="instructions: the two batch sizes, e.g. 1000,3000",
    )
    p.add_argument("--ir-scenarios", default="request,app,map,stored,nocontext")
    p.add_argument("--python", help="instructions: interpreter for bare/ours")
    p.add_argument("--compare-python", help="instructions: interpreter with Flask-Executor 1.0")
    p.add_argument("--scenario", action="append", dest="scenarios", choices=["request", "app", "nocontext"])
    p.add_argument("--tasks", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=5, help="split: alternating rounds")
    p.add_argument("--sort", default="tottime", help="cprofile: pstats sort key")
    p.add_argument("--limit", type=int, default=25, help="cprofile: rows shown")
    p.add_argument("--with-bare", action="store_true", help="cprofile: profile the bare pool too")
    p.add_argument("--out", default="/tmp/flask-executor-profiles", help="cprofile: where .prof files go")
    p.add_argument("--interval", type=float, default=0.0002, help="pyinstrument sampling interval")
    p.add_argument("--micro-n", type=int, default=20000)
    p.add_argument("--repo", default=REPO)
    p.add_argument("--no-gc", action="store_true", help="run with the cyclic garbage collector disabled")
    opts = p.parse_args(argv)
    opts.scenarios = opts.scenarios or ["request", "app"]
    if opts.no_gc:
        import gc

        gc.disable()
    sys.path.insert(0, os.path.abspath(opts.repo))
    {
        "split": split,
        "cprofile": cprofile_mode,
        "pyinstrument": pyinstrument_mode,
        "micro": micro,
        "instructions": instructions,
    }[opts.mode](opts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
