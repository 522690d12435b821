"""Tests of the periodic maintenance recipe (maintenance.py): once per period, not once per
worker, with APScheduler under a real ``gunicorn -w 2`` and with the CLI command run twice
at once."""

import collections
import configparser
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time

import maintenance
import pytest
from servers import HERE, Gunicorn, recipe_env, wait_until

pytestmark = pytest.mark.timeout(120)

EXPIRED, VALID = 3, 2
SAYINGS = ("cleaned up:", "skipped:")


def settings(tmp_path, period):
    """The app's files in ``tmp_path``; its period, unless ``None``."""
    paths = {
        "DATABASE": str(tmp_path / "app.db"),
        "MAINTENANCE_EXECUTOR_FUTURES_STORE": str(tmp_path / "futures.db"),
    }
    return paths if period is None else {"CLEANUP_PERIOD": period, **paths}


def make_database(tmp_path, period):
    """Creates the app's tables (create_app does) and adds expired and valid sessions."""
    maintenance.create_app(config=settings(tmp_path, period))
    now = time.time()
    with sqlite3.connect(tmp_path / "app.db") as db:
        db.executemany(
            "INSERT INTO sessions VALUES (?, ?)",
            [(f"old-{n}", now - 3600) for n in range(EXPIRED)]
            + [(f"new-{n}", now + 3600) for n in range(VALID)],
        )
    db.close()


def read_runs(tmp_path):
    db = sqlite3.connect(tmp_path / "app.db")
    try:
        return db.execute("SELECT period_start, pid, deleted FROM cleanup_runs ORDER BY rowid").fetchall()
    finally:
        db.close()


def session_ids(tmp_path):
    db = sqlite3.connect(tmp_path / "app.db")
    try:
        return sorted(row[0] for row in db.execute("SELECT id FROM sessions"))
    finally:
        db.close()


def test_submitting_a_period_twice_runs_it_once_and_logs_the_refusal(tmp_path, caplog):
    make_database(tmp_path, 60)
    app = maintenance.create_app(config=settings(tmp_path, 60))
    start = 1_800_000_000  # a period start: a multiple of 60
    with app.app_context(), caplog.at_level("INFO", logger=app.logger.name):
        first = maintenance.submit_cleanup(now=start + 5)
        assert first is not None and first.result(timeout=10) == EXPIRED
        assert maintenance.submit_cleanup(now=start + 59) is None  # the same period: refused
        later = maintenance.submit_cleanup(now=start + 60)  # the next one runs
        assert later is not None and later.result(timeout=10) == 0
    assert [(period, deleted) for period, _pid, deleted in read_runs(tmp_path)] == [
        (start, EXPIRED),
        (start + 60, 0),
    ]
    refusals = [r.getMessage() for r in caplog.records if "already submitted" in r.getMessage()]
    assert refusals == [f"cleanup-{start} was already submitted by another process: skipped here"]


def test_scheduler_in_two_gunicorn_workers_cleans_up_once_per_period(tmp_path):
    period, wanted_periods = 1, 5
    make_database(tmp_path, period)
    server = Gunicorn(
        "maintenance:create_app(scheduler=True)",
        str(tmp_path / "gunicorn.log"),
        workers=2,
        env=recipe_env(**settings(tmp_path, period)),
    )
    try:
        server.wait_ready()
        workers = server.worker_pids()
        both_up = time.time()

        def periods_since_both_up():
            return {p for p, _, _ in read_runs(tmp_path) if p > both_up}

        wait_until(
            lambda: len(periods_since_both_up()) >= wanted_periods,
            30,
            interval=0.2,
            what=f"{wanted_periods} periods of cleanup",
        )
    finally:
        server.stop()
    log = server.log()
    runs = read_runs(tmp_path)
    periods = [p for p, _, _ in runs]

    # Exactly one run per period, and no period missed between the first and the last.
    assert collections.Counter(periods).most_common(1)[0][1] == 1, (runs, log)
    assert sorted(periods) == list(range(min(periods), max(periods) + 1, period)), (runs, log)
    # Run by gunicorn's workers, each scheduling it: the other worker's submits were refused.
    assert {pid for _, pid, _ in runs} <= workers, (runs, workers)
    refused = re.findall(r"cleanup-(\d+) was already submitted by another process", log)
    assert len(refused) >= wanted_periods - 1, log
    assert {int(p) for p in refused} <= set(periods), (refused, periods)
    # The cleanup did its job: the expired sessions are gone, and only they.
    assert sum(deleted for _, _, deleted in runs) == EXPIRED
    assert session_ids(tmp_path) == [f"new-{n}" for n in range(VALID)]


def test_cli_command_run_twice_at_once_cleans_up_once(tmp_path):
    period = 3600
    # Both commands must fall in the same period: keep clear of the end of one.
    wait_until(lambda: time.time() % period < period - 30, 31, interval=0.5, what="a new period")
    make_database(tmp_path, period)
    env = recipe_env(**settings(tmp_path, period))
    command = [sys.executable, "-m", "flask", "--app", "maintenance", "cleanup"]

    def run_at_once(count):
        procs = [
            subprocess.Popen(
                command, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            for _ in range(count)
        ]
        outputs = []
        for proc in procs:
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0, out
            outputs.append(out)
        return outputs

    def said(outputs):  # what the commands printed, without the log lines
        return sorted(line for out in outputs for line in out.splitlines() if line.startswith(SAYINGS))

    outputs = run_at_once(2)
    assert said(outputs) == [
        f"cleaned up: {EXPIRED} expired sessions deleted",
        "skipped: this period's cleanup was already submitted",
    ], outputs
    # A later run in the same period (cron firing again, another machine's timer) is skipped too.
    again = run_at_once(1)
    assert said(again) == ["skipped: this period's cleanup was already submitted"], again
    this_period = int(time.time() // period * period)
    assert [(p, deleted) for p, _, deleted in read_runs(tmp_path)] == [(this_period, EXPIRED)]
    assert session_ids(tmp_path) == [f"new-{n}" for n in range(VALID)]


def deploy_file(name):
    with open(os.path.join(HERE, "deploy", name)) as file:
        return file.read()


def systemd_unit(name):
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # systemd's keys are case-sensitive
    unit.read_string(deploy_file(name))
    return unit


def test_cron_line_and_systemd_units_run_the_cleanup_command_every_period(tmp_path):
    default_period = maintenance.create_app(config=settings(tmp_path, None)).config["CLEANUP_PERIOD"]
    (cron_line,) = [line for line in deploy_file("crontab").splitlines() if line and not line.startswith("#")]
    minute, *every, cron_command = cron_line.split(None, 5)
    assert (minute, every) == (f"*/{default_period // 60}", ["*", "*", "*", "*"])
    cron_args = shlex.split(cron_command.split("&&")[-1].split(">>")[0])

    service = systemd_unit("cleanup.service")["Service"]
    service_args = shlex.split(service["ExecStart"])
    assert service["Type"] == "oneshot"
    # The same command, from the same directory.
    assert cron_args[1:] == service_args[1:] == ["--app", "maintenance", "cleanup"]
    assert os.path.basename(cron_args[0]) == os.path.basename(service_args[0]) == "flask"
    assert cron_command.startswith(f"cd {service['WorkingDirectory']} &&")

    on_calendar = systemd_unit("cleanup.timer")["Timer"]["OnCalendar"]
    if shutil.which("systemd-analyze"):
        shown = subprocess.run(
            ["systemd-analyze", "calendar", "--iterations=3", on_calendar],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        times = re.findall(r"(?:Next elapse|Iter\. #\d+): \w+ ([\d-]+ [\d:]+)", shown)
        stamps = [time.mktime(time.strptime(t, "%Y-%m-%d %H:%M:%S")) for t in times]
        assert [b - a for a, b in zip(stamps, stamps[1:])] == [default_period] * 2, shown

    # What they run does the cleanup (here with this checkout's Python).
    make_database(tmp_path, default_period)
    done = subprocess.run(
        [sys.executable, "-m", "flask", *service_args[1:]],
        cwd=HERE,
        env=recipe_env(**settings(tmp_path, default_period)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"cleaned up: {EXPIRED} expired sessions deleted" in done.stdout
