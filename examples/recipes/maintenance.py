"""Recipe: periodic maintenance that runs once per period, however many processes serve the app.

The maintenance here deletes expired sessions from a SQLite database and notes each run in
a ``cleanup_runs`` table. Two ways to trigger it share one function, ``submit_cleanup()``:

* APScheduler inside the app. Every worker process schedules the job, and the first one to
  submit it in a period wins::

      gunicorn -w 2 "maintenance:create_app(scheduler=True)"

* cron or a systemd timer calling a Flask CLI command::

      flask --app maintenance cleanup

Either way, the task is submitted under a key made from the period it belongs to
(``cleanup-1767225600``), and the executor keeps its futures in a store that every process
shares (``MAINTENANCE_EXECUTOR_FUTURES_STORE``). The store takes each key once, so a second
process submitting for the same period gets ``ValueError`` and nothing runs twice.

Settings (also from the environment with a ``FLASK_`` prefix, e.g. ``FLASK_CLEANUP_PERIOD=60``):
``CLEANUP_PERIOD`` (seconds, 300), ``DATABASE`` (a SQLite file) and
``MAINTENANCE_EXECUTOR_FUTURES_STORE`` (the shared store, a SQLite file), both in
``instance/`` by default; ``SECRET_KEY`` signs what the store holds.
"""

import atexit
import contextlib
import os
import sqlite3
import time
from datetime import datetime, timezone

import click
from flask import Flask, current_app

from flask_executor import Executor

HERE = os.path.dirname(os.path.abspath(__file__))

# An executor of its own: its stored futures have a namespace (and a length limit) of their
# own in the store, so the tasks of the rest of the app never push a period's key out.
maintenance = Executor(name="maintenance")


# ---- the app ----------------------------------------------------------------------------


def create_app(scheduler=False, config=None):
    app = Flask(__name__, instance_path=os.path.join(HERE, "instance"))
    app.config.update(
        SECRET_KEY="change-me",  # the same in every process: it signs what the store holds
        CLEANUP_PERIOD=300,
        DATABASE=os.path.join(app.instance_path, "maintenance.db"),
        MAINTENANCE_EXECUTOR_FUTURES_STORE=os.path.join(app.instance_path, "futures.db"),
        MAINTENANCE_EXECUTOR_FUTURES_TTL=86_400,  # forget a period's key a day after its run
        MAINTENANCE_EXECUTOR_MAX_WORKERS=1,
    )
    app.config.from_prefixed_env()  # FLASK_SECRET_KEY, FLASK_CLEANUP_PERIOD, ...
    app.config.update(config or {})
    app.logger.setLevel("INFO")  # show which process skipped a period, and why
    os.makedirs(os.path.dirname(app.config["DATABASE"]), exist_ok=True)  # instance/, by default
    with app.app_context():
        create_tables()
    maintenance.init_app(app)
    app.cli.add_command(cleanup_command)

    @app.get("/")
    def overview():
        with database() as db:
            sessions = db.execute("SELECT count(*) FROM sessions").fetchone()[0]
            runs = db.execute("SELECT period_start, pid, deleted FROM cleanup_runs ORDER BY period_start")
            return {
                "sessions": sessions,
                "runs": [dict(zip(("period_start", "pid", "deleted"), row)) for row in runs],
            }

    if scheduler:
        start_scheduler(app)
    return app


@contextlib.contextmanager
def database():
    """A connection to the app's database, committed and closed at the end of the block."""
    db = sqlite3.connect(current_app.config["DATABASE"], timeout=10)
    try:
        with db:  # commits, or rolls back on an exception
            yield db
    finally:
        db.close()


def create_tables():
    with database() as db:
        db.execute("CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, expires REAL NOT NULL)")
        db.execute(
            "CREATE TABLE IF NOT EXISTS cleanup_runs (period_start INTEGER NOT NULL,"
            " pid INTEGER NOT NULL, deleted INTEGER NOT NULL, ran_at REAL NOT NULL)"
        )


# ---- the maintenance task -----------------------------------------------------------------


def purge_expired_sessions(period_start):
    """The maintenance itself. It runs in a worker thread, inside the app context."""
    with database() as db:
        deleted = db.execute("DELETE FROM sessions WHERE expires < ?", (time.time(),)).rowcount
        db.execute(
            "INSERT INTO cleanup_runs (period_start, pid, deleted, ran_at) VALUES (?, ?, ?, ?)",
            (period_start, os.getpid(), deleted, time.time()),
        )
    return deleted


def submit_cleanup(now=None):
    """Submits this period's cleanup, unless some process already has.

    Returns the task's future, or ``None`` when the period's key was taken: by another worker
    process, by another run of the cron job, or by an earlier call in this process.
    """
    period = current_app.config["CLEANUP_PERIOD"]
    period_start = int((time.time() if now is None else now) // period * period)
    key = f"cleanup-{period_start}"
    try:
        return maintenance.submit_stored(key, purge_expired_sessions, period_start)
    except ValueError:
        current_app.logger.info("%s was already submitted by another process: skipped here", key)
        return None


# ---- trigger 1: APScheduler in every worker process ------------------------------------------


def start_scheduler(app):
    """Schedules submit_cleanup() every CLEANUP_PERIOD seconds in this process.

    Call it in each worker process (gunicorn without --preload runs create_app() in each); a
    thread started before a fork does not exist in the forked worker.
    """
    from apscheduler.schedulers.background import BackgroundScheduler

    period = app.config["CLEANUP_PERIOD"]

    def tick():
        with app.app_context():
            submit_cleanup()

    scheduler = BackgroundScheduler(timezone=timezone.utc)
    scheduler.add_job(
        tick,
        "interval",
        seconds=period,
        # Every process fires a tenth of a period after each period starts, so that a late
        # firing still counts for its own period rather than the next.
        start_date=datetime.fromtimestamp(period / 10, timezone.utc),
        misfire_grace_time=max(1, period // 2),
        coalesce=True,
        max_instances=1,
    )
    scheduler.start()
    atexit.register(scheduler.shutdown, wait=False)
    return scheduler


# ---- trigger 2: a CLI command for cron or a systemd timer -------------------------------------


@click.command("cleanup")
def cleanup_command():
    """Run this period's cleanup, unless another process already has."""
    future = submit_cleanup()
    if future is None:
        click.echo("skipped: this period's cleanup was already submitted")
        return
    deleted = future.result()  # waits; a failed task fails the command, for cron or systemd to see
    click.echo(f"cleaned up: {deleted} expired sessions deleted")
