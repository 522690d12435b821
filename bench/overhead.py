"""Per-task overhead of Flask-Executor against a bare concurrent.futures pool.

Run from the repository root::

    python bench/overhead.py                 # full run (~5 minutes on 2 cores)
    python bench/overhead.py --quick         # smoke run for CI (< 60 s), prints the table
    python bench/overhead.py --compare-python /path/to/venv-with-1.0/bin/python
    python bench/overhead.py --repo /tmp/a --compare-repo /tmp/b   # A/B of two versions

``--repo``/``--compare-repo`` name directories holding a ``flask_executor.py``: freeze
a version with ``git show REV:flask_executor.py > /tmp/a/flask_executor.py`` so that
edits made while the benchmark runs do not mix versions (the header warns when the
measured module changed during the run).  The table also gives CPU time, and
``paired``: the median of the per-round ratios, steadier than the ratio of medians
when the machine's load drifts.

Every measurement runs in a fresh child process (``python bench/overhead.py
--child ...``), so that import state, thread pools, the allocator and the GC of
one measurement never leak into the next.  The bare pool and the executor are
measured alternately, round after round (the order is reversed every other
round), and the table shows the median of the rounds and the ratio of the
medians.

The children that measure *this* repository's ``flask_executor.py`` get the
repository directory at the front of ``PYTHONPATH`` and check that the module
they imported lives there.  With ``--compare-python PATH`` every scenario is also
run under that interpreter with a clean ``PYTHONPATH`` (it must have
``flask-executor==1.0.0`` installed); its bare pool is measured under the same
interpreter, and "fails" is printed where 1.0 cannot run a scenario.

Scenarios (4 workers everywhere):

request   submit N no-op tasks inside a pushed ``test_request_context`` (a route
          is registered so URL matching is real), then wait for all.
app       the same inside an app context only.
map       ``list(map(fn, range(N)))`` inside a request context.
stored    ``submit_stored(key, fn)`` for N keys inside a request context, wait,
          then ``futures.pop(key)`` for each; bare = ``d[key] = pool.submit(fn)``
          and ``d.pop(key)``.
process   process pool, M tasks of ``sum(range(100))`` inside an app context;
          the pool's worker processes are started before the clock starts.
nocontext (informational, no target) submit N no-op tasks with no context pushed.

Memory: 100,000 no-op tasks submitted inside a request context in batches of
1,000, each batch waited for and dropped; the RSS growth between the first
10,000 tasks and the end is reported (a second line does the same with
submit_stored + pop).

The script never asserts anything about speed: it prints the table and exits 0
unless a measurement of *this* repository's module fails.
"""

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULT_MARK = "BENCH-RESULT "
WORKERS = 4

# scenario name -> (label, target ratio or None)
SCENARIOS = {
    "request": ("submit, request context", 2.5),
    "app": ("submit, app context only", 1.5),
    "map": ("map, request context", 2.5),
    "stored": ("submit_stored + pop, request ctx", 2.7),
    "process": ("process pool", 1.1),
    "nocontext": ("submit, no context (info)", None),
}
ORDER = ["request", "app", "map", "stored", "process", "nocontext"]


# ---------------------------------------------------------------------------
# Task functions (module level so process pools can pickle them by reference)
# ---------------------------------------------------------------------------


def noop():
    return None


def identity(x):
    return x


def small_task():
    return sum(range(100))


def warm_task():
    time.sleep(0.02)
    return os.getpid()


# ---------------------------------------------------------------------------
# Child side
# ---------------------------------------------------------------------------


def _rss_bytes():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # peak, not current: only a fallback

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _flask_version():
    try:
        from importlib.metadata import version

        return version("flask")
    except Exception:
        return "?"


def _make_app(impl, executor_type):
    from flask import Flask

    app = Flask("bench")
    app.config["EXECUTOR_TYPE"] = executor_type
    app.config["EXECUTOR_MAX_WORKERS"] = WORKERS
    # Large enough that nothing is ever evicted (1.0 reads 0 literally as "keep none").
    app.config["EXECUTOR_FUTURES_MAX_LENGTH"] = 2**31

    @app.route("/some/path")
    def some_path():
        return "ok"

    @app.route("/other/<int:item>")
    def other(item):
        return str(item)

    @app.route("/")
    def index():
        return "index"

    return app


def _import_executor(impl, repo):
    import flask_executor

    path = os.path.realpath(flask_executor.__file__)
    try:
        import hashlib

        with open(path, "rb") as f:
            flask_executor._bench_digest = hashlib.sha1(f.read()).hexdigest()[:10]
    except OSError:
        flask_executor._bench_digest = None
    if impl in ("ours", "alt"):
        if not path.startswith(os.path.realpath(repo) + os.sep):
            raise RuntimeError(f"imported {path}, not the repository module under {repo}")
    elif impl == "v1":
        version = getattr(flask_executor, "__version__", "?")
        if not str(version).startswith("1."):
            raise RuntimeError(f"expected Flask-Executor 1.x, imported {version} ({path})")
    return flask_executor, path


class _Pools:
    """Gives the scenario code one interface over the bare pool and the executor."""

    def __init__(self, impl, executor_type, repo):
        import concurrent.futures as cf

        self.impl = impl
        self.module_path = None
        self.module_version = None
        self.module_digest = None
        self.app = _make_app(impl, executor_type)
        if impl == "bare":
            cls = cf.ThreadPoolExecutor if executor_type == "thread" else cf.ProcessPoolExecutor
            self.pool = cls(max_workers=WORKERS)
            self.store = {}
        else:
            mod, self.module_path = _import_executor(impl, repo)
            self.module_version = getattr(mod, "__version__", None)
            self.module_digest = mod._bench_digest
            self.pool = mod.Executor(self.app)
            self.store = None

    def submit(self, fn, *args):
        return self.pool.submit(fn, *args)

    def submit_stored(self, key, fn):
        if self.store is not None:
            fut = self.store[key] = self.pool.submit(fn)
            return fut
        return self.pool.submit_stored(key, fn)

    def pop(self, key):
        if self.store is not None:
            return self.store.pop(key)
        return self.pool.futures.pop(key)

    def map(self, fn, it):
        return self.pool.map(fn, it)

    def shutdown(self):
        self.pool.shutdown(wait=True)


def _context(pools, kind):
    import contextlib

    if kind == "request":
        return pools.app.test_request_context("/some/path?x=1")
    if kind == "app":
        return pools.app.app_context()
    return contextlib.nullcontext()


def _warm_threads(pools):
    from concurrent.futures import wait

    fs = [pools.submit(noop) for _ in range(200)]
    wait(fs)
    for f in fs:
        f.result()


def _run_timed(pools, scenario, n, keys_offset=0):
    """One timed repetition; returns (wall seconds, CPU seconds of this process,
    all its threads; the process pool's workers are not counted)."""
    from concurrent.futures import wait

    def perf():
        return time.perf_counter(), time.process_time()

    if scenario in ("request", "app", "nocontext"):
        submit = pools.submit
        t0 = perf()
        fs = [submit(noop) for _ in range(n)]
        wait(fs)
        t1 = perf()
        for f in fs:
            f.result()  # re-raise anything a task raised (outside the clock)
        return t1[0] - t0[0], t1[1] - t0[1]
    if scenario == "map":
        t0 = perf()
        out = list(pools.map(identity, range(n)))
        t1 = perf()
        if out != list(range(n)):
            raise RuntimeError("map returned wrong results")
        return t1[0] - t0[0], t1[1] - t0[1]
    if scenario == "stored":
        keys = [f"task-{i}" for i in range(keys_offset, keys_offset + n)]
        submit_stored, pop = pools.submit_stored, pools.pop
        t0 = perf()
        fs = [submit_stored(k, noop) for k in keys]
        wait(fs)
        for k in keys:
            pop(k)
        t1 = perf()
        for f in fs:
            f.result()
        if pools.store is None and len(pools.pool.futures):
            raise RuntimeError("futures left in the collection after pop")
        return t1[0] - t0[0], t1[1] - t0[1]
    if scenario == "process":
        submit = pools.submit
        t0 = perf()
        fs = [submit(small_task) for _ in range(n)]
        wait(fs)
        t1 = perf()
        if any(f.result() != 4950 for f in fs):
            raise RuntimeError("wrong result from the process pool")
        return t1[0] - t0[0], t1[1] - t0[1]
    raise ValueError(scenario)


def child_time(args):
    executor_type = "process" if args.scenario == "process" else "thread"
    ctx_kind = {
        "request": "request",
        "map": "request",
        "stored": "request",
        "app": "app",
        "process": "app",
        "nocontext": None,
    }[args.scenario]
    pools = _Pools(args.impl, executor_type, args.repo)
    result = {
        "module": pools.module_path,
        "version": pools.module_version,
        "digest": pools.module_digest,
        "python": platform.python_version(),
        "flask": _flask_version(),
    }
    with _context(pools, ctx_kind):
        if executor_type == "process":
            # Start every worker process (and the executor's lazily made pool)
            # before the clock: 4 concurrent sleeping tasks need 4 workers.
            from concurrent.futures import wait

            fs = [pools.submit(warm_task) for _ in range(WORKERS * 2)]
            wait(fs)
            result["worker_pids"] = len({f.result() for f in fs})
            pools.submit(small_task).result()
        else:
            _warm_threads(pools)
            # A short untimed pass of the scenario itself warms every code path.
            _run_timed(pools, args.scenario, min(args.n, 500), keys_offset=10**8)
        times = []
        cpus = []
        for rep in range(args.reps):
            gc.collect()
            wall, cpu = _run_timed(pools, args.scenario, args.n, keys_offset=rep * args.n)
            times.append(wall)
            cpus.append(cpu)
    pools.shutdown()
    result["times"] = times
    result["time"] = statistics.median(times)
    result["cpus"] = cpus
    result["cpu"] = statistics.median(cpus)
    return result


def child_mem(args):
    from concurrent.futures import wait

    pools = _Pools(args.impl, "thread", args.repo)
    stored = args.scenario == "mem-stored"
    result = {
        "module": pools.module_path,
        "version": pools.module_version,
        "digest": pools.module_digest,
        "python": platform.python_version(),
        "flask": _flask_version(),
    }
    batch = 1000
    done = 0
    rss_base = None
    with _context(pools, "request"):
        _warm_threads(pools)
        while done < args.n:
            if stored:
                keys = [f"k{i}" for i in range(done, done + batch)]
                fs = [pools.submit_stored(k, noop) for k in keys]
                wait(fs)
                for k in keys:
                    pools.pop(k)
                del keys
            else:
                fs = [pools.submit(noop) for _ in range(batch)]
                wait(fs)
            for f in fs:
                f.result()
            del fs
            done += batch
            if done == args.baseline:
                gc.collect()
                rss_base = _rss_bytes()
        gc.collect()
        rss_end = _rss_bytes()
    pools.shutdown()
    result.update(
        rss_base=rss_base, rss_end=rss_end, growth=rss_end - rss_base, tasks=done, baseline=args.baseline
    )
    return result


def child_main(args):
    try:
        if args.scenario.startswith("mem"):
            result = child_mem(args)
        else:
            result = child_time(args)
    except BaseException as exc:  # report, never hang the parent
        import traceback

        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()
    # Worker processes left behind by a failed run would keep stdout open (and the
    # parent waiting): end them, they are this child's own.
    try:
        import multiprocessing

        for proc in multiprocessing.active_children():
            proc.terminate()
    except Exception:
        pass
    # Skip interpreter teardown: a broken pool (1.0 map) must not hang the exit.
    os._exit(0)


# ---------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------


class Runner:
    def __init__(self, opts):
        self.opts = opts
        self.repo = os.path.abspath(opts.repo)
        self.ours_python = opts.python or sys.executable
        self.cmp_python = opts.compare_python
        self.alt_repo = os.path.abspath(opts.compare_repo) if opts.compare_repo else None
        self.log = []
        self.background = []  # CPU busy fraction of the machine seen before each child

    def env_for(self, impl, cmp):
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        env.pop("PYTHONHOME", None)
        env.pop("PYTHONSTARTUP", None)
        if impl == "ours":
            env["PYTHONPATH"] = self.repo
        elif impl == "alt":
            env["PYTHONPATH"] = self.alt_repo
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        return env

    def wait_for_quiet(self):
        """Waits (at most --quiet-wait seconds) until the other processes on the
        machine use less than --quiet-threshold of the CPUs; records what it saw."""
        if not self.opts.quiet_wait:
            return
        deadline = time.monotonic() + self.opts.quiet_wait
        while True:
            busy = _cpu_busy(0.2)
            if busy is None:
                return
            if busy < self.opts.quiet_threshold or time.monotonic() >= deadline:
                self.background.append(busy)
                return
            time.sleep(0.5)

    @staticmethod
    def _kill(proc):
        import signal

        try:
            if os.name == "posix":
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
        except OSError:
            pass

    def run_child(self, scenario, impl, n, reps=1, baseline=0, cmp=False):
        self.wait_for_quiet()
        python = self.cmp_python if cmp else self.ours_python
        cmd = [
            python,
            os.path.abspath(__file__),
            "--child",
            "--scenario",
            scenario,
            "--impl",
            impl,
            "-n",
            str(n),
            "--reps",
            str(reps),
            "--baseline",
            str(baseline),
            "--repo",
            self.alt_repo if impl == "alt" else self.repo,
        ]
        # A session of its own, so that on a timeout the child and whatever it
        # started (pool workers) can be ended together, and nothing else.
        proc = subprocess.Popen(
            cmd,
            env=self.env_for(impl, cmp),
            cwd=HERE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            universal_newlines=True,
            start_new_session=(os.name == "posix"),
        )
        try:
            stdout, stderr = proc.communicate(timeout=self.opts.timeout)
        except subprocess.TimeoutExpired:
            self._kill(proc)
            proc.communicate()
            return {"error": f"timeout after {self.opts.timeout}s"}
        for line in reversed(stdout.splitlines()):
            if line.startswith(RESULT_MARK):
                return json.loads(line[len(RESULT_MARK) :])
        return {
            "error": "child exited {} without a result: {}".format(
                proc.returncode, (stderr or "").strip().splitlines()[-1:] or ""
            )
        }


def _fmt_ms(seconds):
    return "%.1f" % (seconds * 1000.0)


def _median_or_none(values):
    return statistics.median(values) if values else None


def _impls(opts):
    impls = [("bare", False), ("ours", False)]
    if opts.compare_repo:
        impls.append(("alt", False))
    if opts.compare_python:
        impls += [("bare", True), ("v1", True)]
    return impls


def run_benchmarks(opts):
    runner = Runner(opts)
    scenarios = [s for s in ORDER if s in opts.scenarios]
    impls = _impls(opts)
    # results[(scenario, impl, cmp)] = list of per-process medians
    results = {}
    cpu_results = {}
    by_round = {}  # (round, scenario, impl, cmp) -> (wall, cpu)
    errors = {}
    modules = {}
    digests = {}  # impl -> set of module digests seen
    runs = {}  # key -> processes started
    failures = {}  # key -> processes that failed
    load_before = _loadavg()
    for rnd in range(opts.rounds):
        order = impls if rnd % 2 == 0 else list(reversed(impls))
        for scenario in scenarios:
            n = opts.process_tasks if scenario == "process" else opts.tasks
            for impl, cmp in order:
                key = (scenario, impl, cmp)
                runs[key] = runs.get(key, 0) + 1
                # The process pool batch is short and noisy: more repetitions per child.
                reps = opts.reps * 3 if scenario == "process" else opts.reps
                res = runner.run_child(scenario, impl, n, reps=reps, cmp=cmp)
                if "error" in res:
                    errors.setdefault(key, res)
                    failures[key] = failures.get(key, 0) + 1
                    if opts.verbose:
                        sys.stderr.write(
                            "{} {}{}: {}\n".format(scenario, impl, " (cmp)" if cmp else "", res["error"])
                        )
                    continue
                results.setdefault(key, []).append(res["time"])
                cpu_results.setdefault(key, []).append(res["cpu"])
                by_round[(rnd,) + key] = (res["time"], res["cpu"])
                digests.setdefault(impl, set()).add(res.get("digest"))
                if impl not in modules:
                    modules[impl] = (
                        res.get("module"),
                        res.get("version"),
                        res.get("python"),
                        res.get("flask"),
                    )
                if opts.verbose:
                    each = " ".join(f"{t * 1000:.1f}" for t in res["times"])
                    sys.stderr.write(
                        f"round {rnd + 1} {scenario:<9} {impl:<4}{' (cmp)' if cmp else '      '}"
                        f" {res['time'] * 1000:8.2f} ms  {each}\n"
                    )
    mem = {}
    if opts.memory:
        for scenario in ("mem", "mem-stored"):
            for rnd in range(opts.mem_rounds):
                for impl, cmp in impls if rnd % 2 == 0 else list(reversed(impls)):
                    key = (scenario, impl, cmp)
                    res = runner.run_child(
                        scenario, impl, opts.mem_tasks, baseline=opts.mem_baseline, cmp=cmp
                    )
                    if "error" in res:
                        errors.setdefault(key, res)
                        continue
                    mem.setdefault(key, []).append(res["growth"])
                    if opts.verbose:
                        sys.stderr.write(
                            f"mem {scenario:<10} {impl:<4}{' (cmp)' if cmp else '      '} growth"
                            f" {res['growth'] / 2**20:.2f} MiB (base {res['rss_base'] / 2**20:.1f} MiB)\n"
                        )
    load = (load_before, _loadavg())
    extra = {
        "runs": runs,
        "failures": failures,
        "load": load,
        "cpu": cpu_results,
        "by_round": by_round,
        "digests": digests,
        "background": runner.background,
    }
    return scenarios, results, errors, mem, modules, extra


def _cpu_times():
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields[:8]), idle


def _cpu_busy(interval):
    """Fraction of all CPUs busy during ``interval`` seconds (Linux), or None."""
    a = _cpu_times()
    time.sleep(interval)
    b = _cpu_times()
    if a is None or b is None or b[0] == a[0]:
        return None
    return 1.0 - (b[1] - a[1]) / float(b[0] - a[0])


def _loadavg():
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _paired(extra, scenario, a, b, metric):
    """Median over rounds of (a / b) measured in the same round, or None."""
    idx = 0 if metric == "wall" else 1
    ratios = []
    by_round = extra["by_round"]
    for rnd in range(max([k[0] for k in by_round] or [-1]) + 1):
        x, y = by_round.get((rnd, scenario) + a), by_round.get((rnd, scenario) + b)
        if x and y and y[idx] > 0:
            ratios.append(x[idx] / y[idx])
    return statistics.median(ratios) if ratios else None


def _table(opts, scenarios, values, extra, metric, runs, failures):
    cmp = bool(opts.compare_python)
    unit = "ms" if metric == "wall" else "cpu"
    head = ["scenario", "target", "bare " + unit, "ours " + unit, "ours/bare", "paired", "ok"]
    if opts.compare_repo:
        head += ["B " + unit, "B/bare", "paired"]
    if cmp:
        head += ["1.0 " + unit, "1.0/bare", "paired"]
    rows = [head]
    for s in scenarios:
        label, target = SCENARIOS[s]
        bare = _median_or_none(values.get((s, "bare", False), []))
        ours = _median_or_none(values.get((s, "ours", False), []))
        row = [
            label,
            (f"<= {target:.1f}") if target and metric == "wall" else "-",
            _fmt_ms(bare) if bare is not None else "error",
            _fmt_ms(ours) if ours is not None else "fails",
        ]
        if ours is not None and bare is not None:
            ratio = ours / bare
            paired = _paired(extra, s, ("ours", False), ("bare", False), metric)
            ok = "-"
            if target and metric == "wall":
                ok = "yes" if ratio <= target else "NO"
            row += [f"{ratio:.2f}", f"{paired:.2f}" if paired else "-", ok]
        else:
            row += ["-", "-", "NO" if target and metric == "wall" else "-"]
        if opts.compare_repo:
            alt = _median_or_none(values.get((s, "alt", False), []))
            if alt is not None and bare is not None:
                paired = _paired(extra, s, ("alt", False), ("bare", False), metric)
                row += [_fmt_ms(alt), f"{alt / bare:.2f}", f"{paired:.2f}" if paired else "-"]
            else:
                row += ["fails", "-", "-"]
        if cmp:
            cbare = _median_or_none(values.get((s, "bare", True), []))
            v1 = _median_or_none(values.get((s, "v1", True), []))
            nfail = failures.get((s, "v1", True), 0)
            if nfail:
                nrun = runs.get((s, "v1", True), 0)
                row += ["fails" if nfail == nrun else f"fails {nfail}/{nrun}", "-", "-"]
            elif v1 is not None and cbare is not None:
                paired = _paired(extra, s, ("v1", True), ("bare", True), metric)
                row += [_fmt_ms(v1), f"{v1 / cbare:.2f}", f"{paired:.2f}" if paired else "-"]
            else:
                row += ["-", "-", "-"]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = []
    for i, r in enumerate(rows):
        lines.append(
            "  ".join(c.ljust(widths[j]) if j == 0 else c.rjust(widths[j]) for j, c in enumerate(r)).rstrip()
        )
        if i == 0:
            lines.append("  ".join("-" * x for x in widths))
    return "\n".join(lines) + "\n"


def print_report(opts, scenarios, results, errors, mem, modules, extra, out=sys.stdout):
    w = out.write
    runs, failures, load = extra["runs"], extra["failures"], extra["load"]
    cmp = bool(opts.compare_python)
    info = modules.get("ours") or modules.get("bare") or (None, None, platform.python_version(), "?")
    w("\nFlask-Executor overhead benchmark (%s mode)\n" % ("quick" if opts.quick else "full"))
    w(
        f"python {info[2]}, Flask {info[3]}, {WORKERS} workers, {os.cpu_count() or 0} CPUs,"
        f" {opts.rounds} rounds x {opts.reps} rep(s), {opts.tasks} tasks"
        f" (process pool: {opts.process_tasks})\n"
    )
    if "ours" in modules:
        seen = sorted(d for d in extra["digests"].get("ours", ()) if d)
        w("ours: {} (version {}, sha1 {})\n".format(modules["ours"][0], modules["ours"][1], ", ".join(seen)))
        if len(seen) > 1:
            w(
                f"WARNING: flask_executor.py changed during the run ({len(seen)} versions measured): "
                "run again\n"
            )
    if "alt" in modules:
        seen = sorted(d for d in extra["digests"].get("alt", ()) if d)
        w(f"B:    {modules['alt'][0]} (version {modules['alt'][1]}, sha1 {', '.join(seen)})\n")
    if cmp and "v1" in modules:
        w("1.0:  {} (version {}, python {}, Flask {})\n".format(*tuple(modules["v1"])))
    if load[0] is not None:
        w("load average (1 min) before/after: {:.2f} / {:.2f}\n".format(*load))
    bg = extra["background"]
    if bg:
        w(
            f"other processes used {100 * statistics.median(bg):.0f}% of the CPUs before a median"
            f" measurement (max {100 * max(bg):.0f}%; waited up to "
            f"{opts.quiet_wait:g}s each for < {100 * opts.quiet_threshold:.0f}%)\n"
        )
    w(
        "times: medians in ms of the whole batch (submit + wait); ours/bare = ratio of the medians; "
        "paired = median of the per-round ratios\n"
    )
    if cmp:
        w(
            '1.0/bare is against the bare pool timed under the 1.0 interpreter; "fails k/n": '
            "k of n runs raised\n"
        )
    w("\n")

    failed_ours = False
    for s in scenarios:
        if not results.get((s, "ours", False)):
            failed_ours = True
    w(_table(opts, scenarios, results, extra, "wall", runs, failures))
    w("\nCPU time of the measuring process (all its threads; for the process pool only the parent), ms:\n")
    w(_table(opts, scenarios, extra["cpu"], extra, "cpu", runs, failures))

    if opts.memory:
        w(
            f"\nmemory: RSS growth from task {opts.mem_baseline} to task {opts.mem_tasks} (request"
            f" context, batches of 1,000), median of {opts.mem_rounds}; target < 5 MB\n"
        )
        for scenario, label in (("mem", "submit"), ("mem-stored", "submit_stored + pop")):
            parts = []
            for impl, c in _impls(opts):
                name = {"bare": "bare", "ours": "ours", "alt": "B", "v1": "1.0"}[impl]
                if c and impl == "bare":
                    name = "bare (1.0 python)"
                vals = mem.get((scenario, impl, c))
                if vals:
                    parts.append(f"{name} {statistics.median(vals) / 2**20:+.2f} MiB")
                elif (scenario, impl, c) in errors:
                    parts.append(f"{name} fails")
            w(f"  {label + ':':<20} {', '.join(parts)}\n")

    if errors:
        w("\nfailures (first error of each):\n")
        for (s, impl, c), res in sorted(errors.items()):
            name = {"bare": "bare", "ours": "ours", "alt": "B", "v1": "1.0"}[impl] + (
                " (compare python)" if c and impl == "bare" else ""
            )
            w(f"  {s:<10} {name:<22} {res['error'][:200]}\n")
            if impl == "ours" and opts.verbose and res.get("traceback"):
                w(res["traceback"])
    return failed_ours or any(impl in ("bare", "ours") for (_, impl, _c) in errors)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer tasks and rounds (CI smoke check, < 60 s)")
    p.add_argument(
        "--compare-python",
        metavar="PATH",
        help="interpreter with flask-executor==1.0.0 installed; adds a 1.0 column",
    )
    p.add_argument(
        "--python", metavar="PATH", help="interpreter for the bare/ours measurements (default: this one)"
    )
    p.add_argument(
        "--compare-repo",
        metavar="DIR",
        help="another directory holding a flask_executor.py (a version before or after a change):"
        " measured in the same rounds, shown as column B",
    )
    p.add_argument("--repo", default=REPO, help="directory holding flask_executor.py (default: %(default)s)")
    p.add_argument("--rounds", type=int, help="alternating rounds (default 7, quick 3)")
    p.add_argument(
        "--reps",
        type=int,
        help="timed repetitions inside each child; the child reports "
        "their median (default 3, quick 1; x3 for the process pool)",
    )
    p.add_argument("--tasks", type=int, help="tasks per batch (default 10000, quick 2000)")
    p.add_argument("--process-tasks", type=int, help="process pool tasks (default 1000, quick 300)")
    p.add_argument(
        "--scenarios", default=",".join(ORDER), help="comma-separated subset of: {}".format(", ".join(ORDER))
    )
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory line")
    p.add_argument("--mem-tasks", type=int, help="tasks in the memory test (default 100000, quick 20000)")
    p.add_argument(
        "--mem-baseline",
        type=int,
        help="RSS baseline taken after this many tasks (default 10000, quick 2000)",
    )
    p.add_argument("--mem-rounds", type=int, help="memory runs per implementation (default 3, quick 1)")
    p.add_argument("--timeout", type=float, default=300, help="seconds before a child is killed")
    p.add_argument(
        "--quiet-wait",
        type=float,
        help="before each child, wait up to this many seconds "
        "for the machine to be quiet (default 5, quick 0 = do not check)",
    )
    p.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.15,
        help='"quiet": other processes use less than this fraction of all CPUs',
    )
    p.add_argument("--json", metavar="PATH", help="also write the raw numbers to this file")
    p.add_argument("-v", "--verbose", action="store_true", help="print every measurement to stderr")
    # child mode
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--scenario", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("-n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--baseline", type=int, default=0, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.child:
        opts.reps = opts.reps or 1
        return opts
    quick = opts.quick
    defaults = {
        "rounds": (3, 7),
        "reps": (1, 3),
        "tasks": (2000, 10000),
        "process_tasks": (300, 1000),
        "mem_tasks": (20000, 100000),
        "mem_baseline": (2000, 10000),
        "mem_rounds": (1, 3),
        "quiet_wait": (0, 5),
    }
    for name, (q, full) in defaults.items():
        if getattr(opts, name) is None:
            setattr(opts, name, q if quick else full)
    opts.scenarios = [s.strip() for s in opts.scenarios.split(",") if s.strip()]
    unknown = set(opts.scenarios) - set(ORDER)
    if unknown:
        p.error("unknown scenario(s): {}".format(", ".join(sorted(unknown))))
    if opts.mem_baseline >= opts.mem_tasks or opts.mem_baseline % 1000 or opts.mem_tasks % 1000:
        p.error("--mem-baseline and --mem-tasks must be multiples of 1000, baseline < tasks")
    if opts.compare_python and not os.path.exists(opts.compare_python):
        p.error(f"--compare-python {opts.compare_python} does not exist")
    return opts


def main(argv=None):
    opts = parse_args(argv)
    if opts.child:
        child_main(opts)
        return 0
    started = time.time()
    scenarios, results, errors, mem, modules, extra = run_benchmarks(opts)
    bad = print_report(opts, scenarios, results, errors, mem, modules, extra)
    sys.stdout.write("\n(%.0f s)\n" % (time.time() - started))
    if opts.json:
        raw = {
            "times": {"{}/{}{}".format(s, i, "/cmp" if c else ""): v for (s, i, c), v in results.items()},
            "memory": {"{}/{}{}".format(s, i, "/cmp" if c else ""): v for (s, i, c), v in mem.items()},
            "errors": {
                "{}/{}{}".format(s, i, "/cmp" if c else ""): e["error"] for (s, i, c), e in errors.items()
            },
            "modules": modules,
            "argv": sys.argv[1:],
        }
        with open(opts.json, "w") as f:
            json.dump(raw, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
