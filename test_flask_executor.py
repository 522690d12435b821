"""Tests for flask_executor.

The file has four parts, each with its own section banners:

* the core: the Executor API, contexts in thread pools, what Flask-Executor 1.0 got wrong,
  stored futures, jobs, done callbacks, process pools and the module's public names;
* test mode, coroutine functions, pluggable executors and Dask, process pools with an app
  context, process pool options and types for users of the wheel (helpers prefixed ``eco_``);
* reliability: forks, dead workers, floods, shutdown, configuration, isolation under load
  (helpers prefixed ``rel_``);
* progress reports, and the README as the PyPI page.

Everything here uses real parts: real thread and process pools, real Flask apps with
their test clients, request contexts and CLI runner. No timing assertions: tests wait
(with generous bounds) for things to happen, never measure how long they took.
"""

import asyncio
import collections
import concurrent.futures
import contextlib
import gc
import hashlib
import http.client
import http.cookies
import importlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import multiprocessing
import os
import pathlib
import pickle
import queue
import random
import re
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
import urllib.parse
import urllib.request
import uuid
import warnings
import zipfile
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import click
import pytest
from flask import (
    Flask,
    current_app,
    g,
    has_app_context,
    has_request_context,
    jsonify,
    request,
    session,
    url_for,
)
from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.test import EnvironBuilder, run_wsgi_app

import flask_executor
from flask_executor import (
    Executor,
    FutureCollection,
    Progress,
    QueueFull,
    StoreError,
    TaskFuture,
    TaskLost,
    report_progress,
)

pytestmark = pytest.mark.timeout(60)

# Generous bound used whenever a test waits for something to happen.
WAIT_SECONDS = 30


# ---------------------------------------------------------------------------
# Module-level helpers (module level so that process pools can pickle them)
# ---------------------------------------------------------------------------


def square_number(number):
    return number * number


def add_two_numbers(first, second):
    return first + second


def app_marker_in_current_context():
    """The APP_MARKER of the current app, or None when the task runs with no app context."""
    if not has_app_context():
        return None
    return current_app.config.get("APP_MARKER")


def write_marker_file(path, text="ran"):
    pathlib.Path(path).write_text(text)
    return text


def raise_value_error_with_message(message):
    raise ValueError(message)


def divide_one_by_zero():
    return 1 / 0


def wait_for_event_then_return(event, value):
    """Block (thread pools only) until event is set, then return value."""
    event.wait(WAIT_SECONDS)
    return value


def wait_for_condition(predicate, timeout=WAIT_SECONDS, interval=0.01):
    """Poll predicate until it is true or timeout passes; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def wait_for_port(port, process=None, timeout=WAIT_SECONDS):
    """Whether something listens on the loopback port within timeout (False at once when
    process, the one that should listen, has exited)."""
    listening = wait_for_condition(
        lambda: (process is not None and process.poll() is not None) or port_open(port), timeout, 0.05
    )
    return bool(listening) and (process is None or process.poll() is None)


def error_records_from_logger(caplog, logger_name, level=logging.ERROR):
    return [r for r in caplog.records if r.name == logger_name and r.levelno == level]


def app_error_records_mentioning(caplog, app, text):
    """ERROR records on app.logger whose message or exception mentions text."""
    return [
        r
        for r in error_records_from_logger(caplog, app.logger.name)
        if text in r.getMessage() + repr(r.exc_info)
    ]


def g_scratch_stays_own():
    """Write a value of this task's own to g, pause so other tasks run, and tell whether g
    still holds it: a g shared with any other task would show that task's value."""
    own_scratch = uuid.uuid4().hex
    g.scratch = own_scratch
    time.sleep(0.0005)
    return g.scratch == own_scratch


def run_concurrently(target, count):
    """Run target(index) in count threads at once; return the errors they raised."""
    errors = []

    def guarded(index):
        try:
            target(index)
        except BaseException as exc:  # reported to the caller
            errors.append((index, repr(exc)))

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_SECONDS)
    return errors


# A module-level executor with a module-level job, so the job can be pickled by
# reference and submitted to a process pool.
process_jobs_executor = Executor(name="processjobs")


@process_jobs_executor.job
def cube_number_job(number):
    """Return the cube of number."""
    return number**3


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------


def build_flask_app():
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="core-test-secret",
        TESTING=True,
        APP_MARKER=uuid.uuid4().hex,
    )
    return app


@pytest.fixture
def app():
    return build_flask_app()


@pytest.fixture
def make_executor(app):
    """Factory: make_executor(name='', target_app=None, **config) -> Executor bound to the app.

    Config keys are given unprefixed (EXECUTOR_TYPE=...) and get the NAME_ prefix for a
    named executor. Every executor made is shut down after the test.
    """
    created = []

    def build(name="", target_app=None, **config):
        target = app if target_app is None else target_app
        prefix = name.upper() + "_" if name else ""
        for key, value in config.items():
            target.config[prefix + key] = value
        executor = Executor(target, name=name)
        created.append(executor)
        return executor

    yield build
    for executor in created:
        executor.shutdown(wait=True, cancel_futures=True)


@pytest.fixture
def executor(make_executor):
    return make_executor()


# ---------------------------------------------------------------------------
# The Executor API: registration, configuration, submit, map, shutdown
# ---------------------------------------------------------------------------


def test_executor_with_app_is_registered_in_extensions(app):
    executor = Executor(app)
    try:
        assert app.extensions["executor"] is executor
        assert executor.name == ""
        assert isinstance(executor, concurrent.futures.Executor)
    finally:
        executor.shutdown()


def test_executor_init_app_registers_and_runs_tasks(app):
    executor = Executor()
    executor.init_app(app)
    try:
        assert app.extensions["executor"] is executor
        assert executor.submit(square_number, 7).result(timeout=WAIT_SECONDS) == 49
    finally:
        executor.shutdown()


@pytest.mark.parametrize("bad_name", ["bad-name", "a b", "dot.name", "slash/name"])
def test_executor_name_with_invalid_characters_raises_value_error(app, bad_name):
    with pytest.raises(ValueError):
        Executor(app, name=bad_name)


def test_named_executors_register_under_their_names(app):
    default_executor = Executor(app)
    custom_executor = Executor(app, name="custom")
    other_executor = Executor(app, name="Other_2")
    try:
        assert app.extensions["executor"] is default_executor
        assert app.extensions["customexecutor"] is custom_executor
        assert app.extensions["Other_2executor"] is other_executor
        assert custom_executor.name == "custom"
    finally:
        for executor in (default_executor, custom_executor, other_executor):
            executor.shutdown()


def test_named_executor_reads_prefixed_config_keys(make_executor, app):
    # The unprefixed key says 'process' (a lambda would be rejected there); the named
    # executor must use its own CUSTOM_EXECUTOR_TYPE='sync' and run inline.
    app.config["EXECUTOR_TYPE"] = "process"
    custom = make_executor(name="custom", EXECUTOR_TYPE="sync")
    assert app.config["CUSTOM_EXECUTOR_TYPE"] == "sync"
    caller_thread = threading.get_ident()
    future = custom.submit(lambda: threading.get_ident())
    assert future.done()
    assert future.result() == caller_thread


def test_named_executor_prefixed_max_workers_validation_names_the_key(app):
    app.config["CUSTOM_EXECUTOR_MAX_WORKERS"] = "0"
    with pytest.raises(ValueError, match="CUSTOM_EXECUTOR_MAX_WORKERS"):
        Executor(app, name="custom")


@pytest.mark.parametrize(
    "key,bad_value",
    [
        ("EXECUTOR_MAX_WORKERS", "lots"),
        ("EXECUTOR_MAX_WORKERS", "0"),
        ("EXECUTOR_TYPE", "carrier-pigeon"),
        ("EXECUTOR_PROPAGATE_EXCEPTIONS", "maybe"),
        ("EXECUTOR_PUSH_APP_CONTEXT", "sometimes"),
        ("EXECUTOR_FUTURES_MAX_LENGTH", "-1"),
    ],
)
def test_invalid_config_value_raises_value_error_naming_key(app, key, bad_value):
    app.config[key] = bad_value
    with pytest.raises(ValueError, match=key):
        Executor(app)


def test_string_max_workers_is_honoured(make_executor):
    executor = make_executor(EXECUTOR_MAX_WORKERS="5")
    all_five_running = threading.Barrier(5, timeout=WAIT_SECONDS)
    release = threading.Event()
    sixth_started = threading.Event()

    def wait_for_all_five():
        all_five_running.wait()  # raises BrokenBarrierError if fewer than 5 run at once
        release.wait(WAIT_SECONDS)
        return True

    try:
        five = [executor.submit(wait_for_all_five) for _ in range(5)]
        sixth = executor.submit(sixth_started.set)
        # All five workers are busy, so the sixth task cannot start.
        assert wait_for_condition(lambda: all(f.running() for f in five))
        assert not sixth_started.wait(0.3)
        assert not sixth.done()
    finally:
        release.set()
    assert [f.result(timeout=WAIT_SECONDS) for f in five] == [True] * 5
    sixth.result(timeout=WAIT_SECONDS)
    assert sixth_started.is_set()


def test_string_type_process_gives_process_pool(make_executor):
    executor = make_executor(EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS="2")
    worker_pid = executor.submit(os.getpid).result(timeout=WAIT_SECONDS)
    assert worker_pid != os.getpid()


def test_string_push_app_context_false_runs_tasks_without_any_context(make_executor):
    executor = make_executor(EXECUTOR_PUSH_APP_CONTEXT="false")
    future = executor.submit(lambda: (has_app_context(), has_request_context()))
    assert future.result(timeout=WAIT_SECONDS) == (False, False)


def test_submit_returns_concurrent_futures_future(executor):
    future = executor.submit(add_two_numbers, 2, second=3)
    assert isinstance(future, concurrent.futures.Future)
    assert future.result(timeout=WAIT_SECONDS) == 5
    assert future.done()


@pytest.mark.parametrize("executor_type", ["thread", "process", "sync"])
def test_submitted_futures_work_with_wait_and_as_completed(make_executor, executor_type):
    executor = make_executor(EXECUTOR_TYPE=executor_type, EXECUTOR_MAX_WORKERS=2)
    futures = [executor.submit(square_number, n) for n in range(10)]
    done, not_done = concurrent.futures.wait(futures, timeout=WAIT_SECONDS)
    assert set(done) == set(futures)
    assert not not_done
    completed = list(
        concurrent.futures.as_completed(
            [executor.submit(square_number, n) for n in range(10)], timeout=WAIT_SECONDS
        )
    )
    assert sorted(f.result() for f in completed) == [n * n for n in range(10)]


def test_submitted_future_is_hashable(executor):
    first = executor.submit(square_number, 2)
    second = executor.submit(square_number, 3)
    by_future = {first: "first", second: "second"}
    assert by_future[first] == "first"
    assert by_future[second] == "second"
    assert len({first, second, first}) == 2
    assert isinstance(hash(first), int)


def test_map_returns_results_in_input_order(executor):
    def sleep_then_return(number):
        time.sleep((10 - number) * 0.005)  # later items finish first
        return number

    assert list(executor.map(sleep_then_return, range(10))) == list(range(10))
    assert list(executor.map(add_two_numbers, [1, 2, 3], [10, 20, 30])) == [11, 22, 33]


def test_map_timeout_raises_timeout_error(executor):
    release = threading.Event()
    try:
        results = executor.map(wait_for_event_then_return, [release, release], [1, 2], timeout=0.2)
        with pytest.raises(concurrent.futures.TimeoutError):
            list(results)
    finally:
        release.set()


def test_task_waiting_on_a_task_of_its_own_full_pool_waits_for_ever(make_executor):
    # A limit shared with the standard pools, and documented: the inner task needs the worker
    # that the outer one holds while it waits, so only a timeout ends the wait.
    executor = make_executor(EXECUTOR_MAX_WORKERS=1)

    def outer():
        return executor.submit(square_number, 3).result(timeout=1)

    with pytest.raises(concurrent.futures.TimeoutError):
        executor.submit(outer).result(timeout=WAIT_SECONDS)


@pytest.mark.parametrize("executor_type", ["thread", "process", "sync"])
def test_submit_after_shutdown_raises_runtime_error(make_executor, executor_type):
    executor = make_executor(EXECUTOR_TYPE=executor_type, EXECUTOR_MAX_WORKERS=2)
    assert executor.submit(square_number, 2).result(timeout=WAIT_SECONDS) == 4
    executor.shutdown()
    with pytest.raises(RuntimeError):
        executor.submit(square_number, 3)
    with pytest.raises(RuntimeError):
        executor.submit_stored("after-shutdown", square_number, 3)
    assert executor.futures.done("after-shutdown") is None


def test_shutdown_wait_true_waits_for_running_tasks(executor):
    finished = []

    def slow_append():
        time.sleep(0.2)
        finished.append("done")
        return "slow"

    future = executor.submit(slow_append)
    executor.shutdown(wait=True)
    assert finished == ["done"]
    assert future.done()
    assert future.result() == "slow"


def test_shutdown_cancel_futures_cancels_queued_tasks(make_executor):
    executor = make_executor(EXECUTOR_MAX_WORKERS=1)
    release = threading.Event()
    started = threading.Event()
    ran = []

    def block():
        started.set()
        release.wait(WAIT_SECONDS)
        return "blocker"

    blocker = executor.submit(block)
    assert started.wait(WAIT_SECONDS)
    queued = [executor.submit(ran.append, n) for n in range(5)]
    try:
        executor.shutdown(wait=False, cancel_futures=True)
    finally:
        release.set()
    assert blocker.result(timeout=WAIT_SECONDS) == "blocker"
    assert wait_for_condition(lambda: all(f.cancelled() for f in queued))
    time.sleep(0.2)
    assert ran == []


def test_init_app_after_shutdown_makes_executor_usable_again(executor, app):
    executor.shutdown()
    with pytest.raises(RuntimeError):
        executor.submit(square_number, 2)
    executor.init_app(app)
    assert executor.submit(square_number, 4).result(timeout=WAIT_SECONDS) == 16


def test_init_app_with_another_app_rebinds_executor(executor, app):
    other_app = build_flask_app()
    assert (
        executor.submit(app_marker_in_current_context).result(timeout=WAIT_SECONDS)
        == app.config["APP_MARKER"]
    )
    executor.init_app(other_app)
    assert other_app.extensions["executor"] is executor
    assert (
        executor.submit(app_marker_in_current_context).result(timeout=WAIT_SECONDS)
        == other_app.config["APP_MARKER"]
    )


def test_jobs_decorated_before_init_app_work(app):
    executor = Executor()

    @executor.job
    def triple(number):
        return number * 3

    executor.init_app(app)
    try:
        assert triple.submit(4).result(timeout=WAIT_SECONDS) == 12
        assert list(triple.map([1, 2])) == [3, 6]
    finally:
        executor.shutdown()


def test_sync_executor_runs_inline_and_returns_finished_future(make_executor, app):
    executor = make_executor(EXECUTOR_TYPE="sync")
    caller = threading.get_ident()
    future = executor.submit(lambda: (threading.get_ident(), current_app.config["APP_MARKER"]))
    assert future.done()
    assert isinstance(future, concurrent.futures.Future)
    thread_id, marker = future.result()
    assert thread_id == caller
    assert marker == app.config["APP_MARKER"]


# ---------------------------------------------------------------------------
# Contexts in thread pools: what a task sees of the app, g, request and session
# ---------------------------------------------------------------------------


def test_task_sees_current_app(executor, app):
    future = executor.submit(lambda: (current_app.name, current_app.config is app.config))
    assert future.result(timeout=WAIT_SECONDS) == (app.name, True)


@pytest.mark.parametrize("executor_type", ["thread", "sync"])
def test_task_gets_a_copy_of_g(make_executor, app, executor_type):
    executor = make_executor(EXECUTOR_TYPE=executor_type)

    def read_and_overwrite_g():
        seen = (g.get("user"), g.get("leaked"))
        g.user = "bob"
        g.leaked = "from-task"
        return seen

    with app.app_context():
        g.user = "alice"
        assert executor.submit(read_and_overwrite_g).result(timeout=WAIT_SECONDS) == ("alice", None)
        # The task's writes do not leak back to the submitter...
        assert g.user == "alice"
        assert "leaked" not in g
        # ...nor to the next task, which gets a fresh copy.
        assert executor.submit(read_and_overwrite_g).result(timeout=WAIT_SECONDS) == ("alice", None)


def test_task_gets_a_copy_of_g_in_request(executor, app):
    def read_and_overwrite_g():
        seen = g.get("request_user")
        g.request_user = "changed-in-task"
        return seen

    with app.test_request_context("/"):
        g.request_user = "carol"
        assert executor.submit(read_and_overwrite_g).result(timeout=WAIT_SECONDS) == "carol"
        assert g.request_user == "carol"


def test_task_sees_request_path_args_and_form(executor, app):
    def read_request():
        return (
            has_request_context(),
            request.path,
            request.args.get("page"),
            request.form.get("title"),
            request.method,
        )

    with app.test_request_context("/submit?page=2", method="POST", data={"title": "hello"}):
        result = executor.submit(read_request).result(timeout=WAIT_SECONDS)
    assert result == (True, "/submit", "2", "hello", "POST")


def test_task_sees_request_through_test_client(executor, app):
    @app.route("/echo/<word>")
    def echo_view(word):
        future = executor.submit(lambda: f"{request.path}|{request.args['suffix']}|{word}")
        return future.result(timeout=WAIT_SECONDS)

    response = app.test_client().get("/echo/hi?suffix=there")
    assert response.status_code == 200
    assert response.get_data(as_text=True) == "/echo/hi|there|hi"


def test_task_sees_session(executor, app):
    with app.test_request_context("/"):
        session["user"] = "dora"
        assert executor.submit(lambda: session.get("user")).result(timeout=WAIT_SECONDS) == "dora"


def test_task_sees_session_from_cookie_through_test_client(executor, app):
    @app.route("/login/<user>")
    def login_view(user):
        session["user"] = user
        return "ok"

    @app.route("/whoami")
    def whoami_view():
        return executor.submit(lambda: session.get("user", "nobody")).result(timeout=WAIT_SECONDS)

    client = app.test_client()
    assert client.get("/whoami").get_data(as_text=True) == "nobody"
    assert client.get("/login/erin").status_code == 200
    assert client.get("/whoami").get_data(as_text=True) == "erin"


def test_url_for_works_inside_task(executor, app):
    @app.route("/items/<int:item_id>")
    def item_detail(item_id):
        return str(item_id)

    def build_urls():
        return url_for("item_detail", item_id=7), url_for("item_detail", item_id=8, _external=True)

    with app.test_request_context("/", base_url="http://example.test"):
        relative, external = executor.submit(build_urls).result(timeout=WAIT_SECONDS)
    assert relative == "/items/7"
    assert external == "http://example.test/items/8"


def test_task_reading_uploaded_file_does_not_close_it_for_the_view(executor, app):
    task_request_torn_down = threading.Event()

    @app.teardown_request
    def note_task_teardown(exc):
        # While the view below waits, only the task's request context can be torn down.
        task_request_torn_down.set()

    @app.post("/upload")
    def upload_view():
        filename = executor.submit(lambda: request.files["document"].filename).result(timeout=WAIT_SECONDS)
        assert task_request_torn_down.wait(WAIT_SECONDS)
        # The task's copy of the request context is gone; the view's upload is still open.
        return filename + ":" + request.files["document"].read().decode()

    response = app.test_client().post(
        "/upload", data={"document": (io.BytesIO(b"file-content"), "notes.txt")}
    )
    assert response.get_data(as_text=True) == "notes.txt:file-content"
    assert response.status_code == 200


def test_teardown_functions_run_after_each_task(executor, app):
    appcontext_teardowns = []
    request_teardowns = []
    task_threads = set()

    @app.teardown_appcontext
    def count_appcontext_teardown(exc):
        appcontext_teardowns.append(threading.get_ident())

    @app.teardown_request
    def count_request_teardown(exc):
        request_teardowns.append(threading.get_ident())

    def record_thread():
        task_threads.add(threading.get_ident())
        return "ok"

    task_count = 5
    with app.test_request_context("/"):
        main_thread = threading.get_ident()
        futures = [executor.submit(record_thread) for _ in range(task_count)]
        assert [f.result(timeout=WAIT_SECONDS) for f in futures] == ["ok"] * task_count
        assert wait_for_condition(lambda: len(appcontext_teardowns) >= task_count)
        assert wait_for_condition(lambda: len(request_teardowns) >= task_count)
        time.sleep(0.1)
        # Once per task; the submitter's own context has not been torn down yet.
        assert len(appcontext_teardowns) == task_count
        assert len(request_teardowns) == task_count
        assert main_thread not in appcontext_teardowns
        assert set(appcontext_teardowns) <= task_threads
        assert set(request_teardowns) <= task_threads


def test_teardown_appcontext_runs_after_task_submitted_without_request(executor, app):
    appcontext_teardowns = []

    @app.teardown_appcontext
    def count_appcontext_teardown(exc):
        appcontext_teardowns.append(exc)

    futures = [executor.submit(square_number, n) for n in range(3)]
    assert [f.result(timeout=WAIT_SECONDS) for f in futures] == [0, 1, 4]
    assert wait_for_condition(lambda: len(appcontext_teardowns) == 3)


# Outside a request: in an app context only, a CLI command, start-up code, another task.
# Flask-Executor 1.0 wrapped every thread-pool task in flask.copy_current_request_context,
# which raises RuntimeError when no request is active, so all of these failed at submit.


def test_submit_and_map_in_an_app_context_only_give_tasks_the_app_and_a_copy_of_g(executor, app):
    def context_report(number=0):
        return (
            number,
            has_app_context(),
            has_request_context(),
            current_app.config["APP_MARKER"],
            g.get("cli_user"),
        )

    marker = app.config["APP_MARKER"]
    with app.app_context():
        g.cli_user = "frank"
        assert executor.submit(context_report).result(timeout=WAIT_SECONDS) == (
            0,
            True,
            False,
            marker,
            "frank",
        )
        assert list(executor.map(context_report, [1, 2, 3])) == [
            (n, True, False, marker, "frank") for n in [1, 2, 3]
        ]


def test_submit_and_map_work_in_a_cli_command(executor, app):
    marker = app.config["APP_MARKER"]

    @app.cli.command("crunch-numbers")
    def crunch_numbers_command():
        future = executor.submit(lambda: current_app.config["APP_MARKER"])
        squares = list(executor.map(lambda n: (n * n, current_app.config["APP_MARKER"]), [1, 2, 3]))
        click.echo(f"{future.result(timeout=WAIT_SECONDS)} {squares!r}")

    result = app.test_cli_runner().invoke(args=["crunch-numbers"])
    assert result.exception is None, result.output
    assert result.exit_code == 0
    assert result.output.strip() == f"{marker} {[(1, marker), (4, marker), (9, marker)]!r}"


def test_submit_and_map_in_a_cli_command_without_app_context_use_the_bound_app(executor, app):
    marker = app.config["APP_MARKER"]

    @app.cli.command("crunch-bare", with_appcontext=False)
    def crunch_bare_command():
        assert not has_app_context()
        future = executor.submit(app_marker_in_current_context)
        markers = list(executor.map(lambda n: app_marker_in_current_context(), [1, 2]))
        click.echo(f"{future.result(timeout=WAIT_SECONDS)} {markers!r}")

    result = app.test_cli_runner().invoke(args=["crunch-bare"])
    assert result.exception is None, result.output
    assert result.output.strip() == f"{marker} {[marker, marker]!r}"


def test_submit_and_map_with_no_context_at_all_use_the_bound_app(app):
    # Start-up code: an executor bound to the app, used with no context pushed.
    executor = Executor(app)
    try:
        assert not has_app_context()
        marker = app.config["APP_MARKER"]
        assert executor.submit(app_marker_in_current_context).result(timeout=WAIT_SECONDS) == marker
        assert list(executor.map(lambda n: (n, app_marker_in_current_context()), [1, 2])) == [
            (1, marker),
            (2, marker),
        ]
        assert not has_app_context()
    finally:
        executor.shutdown()


def test_task_can_submit_and_map_with_the_context_it_was_given(make_executor, app):
    executor = make_executor(EXECUTOR_MAX_WORKERS=4)

    def inner_task():
        return (current_app.config["APP_MARKER"], request.path, g.get("outer_value"))

    def outer_task():
        g.outer_value = "set-by-outer"
        own_executor = current_app.extensions["executor"]
        inner = own_executor.submit(inner_task).result(timeout=WAIT_SECONDS)
        mapped = list(own_executor.map(square_number, [2, 3]))
        return inner, mapped

    with app.test_request_context("/outer"):
        inner, mapped = executor.submit(outer_task).result(timeout=WAIT_SECONDS)
    assert inner == (app.config["APP_MARKER"], "/outer", "set-by-outer")
    assert mapped == [4, 9]

    # And from a task submitted with no request.
    def outer_without_request():
        return (
            current_app.extensions["executor"]
            .submit(app_marker_in_current_context)
            .result(timeout=WAIT_SECONDS)
        )

    assert executor.submit(outer_without_request).result(timeout=WAIT_SECONDS) == app.config["APP_MARKER"]


# ---------------------------------------------------------------------------
# What Flask-Executor 1.0 got wrong
# ---------------------------------------------------------------------------
# In 1.0:
# - map wrapped the function once, so all its calls shared one copy of the request context
#   and one g; on Flask 2.2 and later, pushing that one copy from several worker threads
#   raises ValueError ("<Token ...> was created in a different Context").
# - a job (ExecutorJob) had no __call__, so a job calling itself, such as a recursive fib,
#   raised TypeError.
# - submit_stored handed the task to the pool before adding its key, so with a key in use
#   it raised ValueError only after the second function had been submitted, and it ran.
# - the module read Flask's private context variables (flask.globals._cv_app, or
#   _app_ctx_stack on Flask versions before 2.2).
# The tests of concurrent requests check that every task sees its own submitter's request,
# g and session, never another one's. Submitting outside a request is tested above.


def test_map_inside_a_request_with_several_workers_gives_every_call_its_own_context(make_executor, app):
    executor = make_executor(EXECUTOR_MAX_WORKERS=4)

    def per_item(number):
        # If tasks shared one context copy, concurrent pushes would fail, and the
        # counter in g would be seen by other tasks.
        g.counter = g.get("counter", 0) + 1
        time.sleep(0.001)
        return number * int(request.args["mult"]), g.counter, session.get("who")

    with app.test_request_context("/map?mult=3"):
        session["who"] = "mapper"
        results = list(executor.map(per_item, range(200)))
    assert results == [(n * 3, 1, "mapper") for n in range(200)]


def test_map_in_a_view_with_several_workers_gives_every_call_its_own_g(make_executor, app):
    executor = make_executor(EXECUTOR_MAX_WORKERS=4)

    @app.route("/total")
    def total_view():
        offset = int(request.args["offset"])

        def add_offset(number):
            g.seen_by = number  # would clash if tasks shared one g
            time.sleep(0.001)
            assert g.seen_by == number
            return number + int(request.args["offset"])

        values = list(executor.map(add_offset, range(100)))
        return {"total": sum(values), "expected": sum(range(100)) + 100 * offset}

    response = app.test_client().get("/total?offset=5")
    assert response.status_code == 200
    body = response.get_json()
    assert body["total"] == body["expected"] == sum(range(100)) + 500


def test_calling_a_job_runs_it_in_the_caller_so_recursive_jobs_work(executor):
    calling_threads = []

    @executor.job
    def fib(n):
        calling_threads.append(threading.get_ident())
        if n < 2:
            return n
        return fib(n - 1) + fib(n - 2)

    assert fib(5) == 5
    # Called directly, in this thread.
    assert set(calling_threads) == {threading.get_ident()}
    assert fib.submit(10).result(timeout=WAIT_SECONDS) == 55


def test_submit_stored_with_the_key_of_a_running_task_raises_before_running_anything(executor, app):
    release = threading.Event()
    first_started = threading.Event()
    second_ran = threading.Event()

    def first_task():
        first_started.set()
        release.wait(WAIT_SECONDS)
        return "first"

    # Inside a request, as a view would do it (1.0 could only submit there).
    try:
        with app.test_request_context("/reports"):
            first = executor.submit_stored("report", first_task)
            assert first_started.wait(WAIT_SECONDS)
            with pytest.raises(ValueError):
                executor.submit_stored("report", second_ran.set)
            assert not second_ran.wait(0.5)
    finally:
        release.set()
    assert first.result(timeout=WAIT_SECONDS) == "first"
    assert executor.futures.result("report", timeout=WAIT_SECONDS) == "first"
    assert not second_ran.wait(0.3)


@pytest.mark.parametrize("executor_type", ["thread", "process", "sync"])
def test_submit_stored_with_a_key_in_use_never_runs_the_second_function(
    make_executor, app, tmp_path, executor_type
):
    executor = make_executor(EXECUTOR_TYPE=executor_type, EXECUTOR_MAX_WORKERS=2)
    first_marker = tmp_path / "first"
    second_marker = tmp_path / "second"
    with app.test_request_context("/jobs"):
        first = executor.submit_stored("job-key", write_marker_file, str(first_marker), "one")
        assert first.result(timeout=WAIT_SECONDS) == "one"
        with pytest.raises(ValueError):
            executor.submit_stored("job-key", write_marker_file, str(second_marker), "two")
    time.sleep(0.5)
    assert first_marker.read_text() == "one"
    assert not second_marker.exists()
    assert executor.futures.result("job-key") == "one"


def test_concurrent_request_contexts_never_see_each_others_request_g_or_session(make_executor, app):
    executor = make_executor(EXECUTOR_MAX_WORKERS=8)
    thread_count = 16
    tasks_per_thread = 50
    start_together = threading.Barrier(thread_count, timeout=WAIT_SECONDS)
    results = {}

    def read_everything(item=None):
        return (
            request.path,
            request.args.get("who"),
            g.get("who"),
            session.get("who"),
            current_app.config["APP_MARKER"],
            g_scratch_stays_own(),
        )

    def submitter(index):
        with app.test_request_context(f"/user/{index}?who=args-{index}"):
            g.who = f"g-{index}"
            session["who"] = f"session-{index}"
            start_together.wait()
            futures = [executor.submit(read_everything) for _ in range(tasks_per_thread)]
            mapped = list(executor.map(read_everything, range(tasks_per_thread)))
            results[index] = [f.result(timeout=WAIT_SECONDS) for f in futures] + mapped
            # The tasks' writes to g never reach the submitter.
            assert "scratch" not in g

    assert run_concurrently(submitter, thread_count) == []
    assert sorted(results) == list(range(thread_count))
    marker = app.config["APP_MARKER"]
    for index, seen in results.items():
        expected = (f"/user/{index}", f"args-{index}", f"g-{index}", f"session-{index}", marker, True)
        assert seen == [expected] * (2 * tasks_per_thread), f"submitter {index} saw another context"


def test_concurrent_client_requests_never_see_each_others_request_or_g(make_executor, app):
    executor = make_executor(EXECUTOR_MAX_WORKERS=8)
    thread_count = 16
    start_together = threading.Barrier(thread_count, timeout=WAIT_SECONDS)
    responses = {}

    def read_request_and_g(item=None):
        return [request.view_args["index"], int(request.args["i"]), g.index, g_scratch_stays_own()]

    @app.route("/isolated/<int:index>")
    def isolated_view(index):
        g.index = index
        start_together.wait()
        futures = [executor.submit(read_request_and_g) for _ in range(20)]
        mapped = list(executor.map(read_request_and_g, range(20)))
        return {"seen": [f.result(timeout=WAIT_SECONDS) for f in futures] + mapped}

    def make_request(index):
        response = app.test_client().get(f"/isolated/{index}?i={index}")
        responses[index] = response.get_json()["seen"]

    assert run_concurrently(make_request, thread_count) == []
    for index in range(thread_count):
        assert responses[index] == [[index, index, index, True]] * 40


def test_module_uses_only_flasks_public_api():
    source = pathlib.Path(flask_executor.__file__).read_text()
    for private_name in ("_cv_app", "_cv_request", "_app_ctx_stack", "_request_ctx_stack"):
        assert private_name not in source, private_name


def test_using_the_executor_in_a_request_emits_no_deprecation_warning(make_executor, app):
    executor = make_executor(EXECUTOR_MAX_WORKERS=4)
    callback_markers = []
    executor.add_default_done_callback(
        lambda future: callback_markers.append(current_app.config["APP_MARKER"])
    )

    @executor.job
    def job_reading_request(number):
        return number, request.path, g.get("tag"), session.get("tag")

    @app.route("/warn-check")
    def warn_check_view():
        g.tag = "g-tag"
        session["tag"] = "session-tag"
        first = executor.submit(lambda: (request.args["q"], url_for("warn_check_view")))
        stored = executor.submit_stored("warn-key", job_reading_request, 0)
        mapped = list(executor.map(job_reading_request, [1, 2, 3]))
        jobbed = job_reading_request.submit(4).result(timeout=WAIT_SECONDS)
        return {
            "first": list(first.result(timeout=WAIT_SECONDS)),
            "stored": list(stored.result(timeout=WAIT_SECONDS)),
            "mapped": [list(m) for m in mapped],
            "jobbed": list(jobbed),
        }

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        response = app.test_client().get("/warn-check?q=x")
        with app.app_context():
            executor.submit(square_number, 2).result(timeout=WAIT_SECONDS)
        executor.submit(square_number, 3).result(timeout=WAIT_SECONDS)
        assert wait_for_condition(lambda: len(callback_markers) >= 8)
    assert response.status_code == 200
    body = response.get_json()
    assert body["first"] == ["x", "/warn-check"]
    assert body["stored"] == [0, "/warn-check", "g-tag", "session-tag"]
    assert body["mapped"] == [[n, "/warn-check", "g-tag", "session-tag"] for n in [1, 2, 3]]
    assert body["jobbed"] == [4, "/warn-check", "g-tag", "session-tag"]
    deprecations = [
        w for w in caught if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))
    ]
    assert deprecations == [], [str(w.message) for w in deprecations]


def test_importing_module_emits_no_deprecation_warning():
    module_dir = str(pathlib.Path(flask_executor.__file__).parent)
    completed = subprocess.run(
        [
            sys.executable,
            "-W",
            "error::DeprecationWarning",
            "-W",
            "error::PendingDeprecationWarning",
            "-c",
            "import flask_executor",
        ],
        cwd=module_dir,
        capture_output=True,
        text=True,
        timeout=WAIT_SECONDS,
    )
    assert completed.returncode == 0, completed.stderr


# ---------------------------------------------------------------------------
# Stored futures: FutureCollection and executor.futures
# ---------------------------------------------------------------------------


def make_finished_future(value):
    future = concurrent.futures.Future()
    future.set_running_or_notify_cancel()
    future.set_result(value)
    return future


def test_future_collection_answers_state_result_and_cancel_by_key():
    collection = FutureCollection(max_length=10)
    pending = concurrent.futures.Future()
    running = concurrent.futures.Future()
    running.set_running_or_notify_cancel()
    finished = make_finished_future("value")
    failed = concurrent.futures.Future()
    failed.set_running_or_notify_cancel()
    failed.set_exception(KeyError("missing"))
    for key, future in [
        ("pending", pending),
        ("running", running),
        ("finished", finished),
        ("failed", failed),
    ]:
        collection.add(key, future)

    assert collection.max_length == 10
    assert len(collection) == 4
    assert set(collection.keys()) == {"pending", "running", "finished", "failed"}

    assert collection.done("finished") is True
    assert collection.done("pending") is False
    assert collection.running("running") is True
    assert collection.running("pending") is False
    assert collection.result("finished") == "value"
    assert collection.result("finished", timeout=1) == "value"
    with pytest.raises(concurrent.futures.TimeoutError):
        collection.result("running", timeout=0.05)
    assert isinstance(collection.exception("failed"), KeyError)
    assert collection.exception("finished") is None
    assert collection._state("pending") == "PENDING"
    assert collection._state("running") == "RUNNING"
    assert collection._state("finished") == "FINISHED"
    assert collection.cancelled("pending") is False
    assert collection.cancel("pending") is True
    assert collection.cancelled("pending") is True
    assert pending.cancelled()
    assert collection.cancel("running") is False

    running.set_result("late")
    assert collection.result("running", timeout=1) == "late"


def test_future_collection_unknown_key_gives_none():
    collection = FutureCollection()
    collection.add("known", make_finished_future(1))
    for method_name in ("done", "running", "cancelled", "cancel", "exception", "_state"):
        assert getattr(collection, method_name)("unknown") is None, method_name
    assert collection.result("unknown") is None
    assert collection.result("unknown", timeout=0.1) is None
    assert collection.pop("unknown") is None
    assert len(collection) == 1


def test_future_collection_refuses_a_key_in_use_until_popped_and_in_finds_keys_and_futures():
    collection = FutureCollection()
    first = make_finished_future("first")
    other = make_finished_future("other")
    collection.add("key", first)
    with pytest.raises(ValueError):
        collection.add("key", other)
    assert collection.result("key") == "first"
    assert first in collection
    assert other not in collection
    assert "key" in collection  # a key in use counts too
    assert "other-key" not in collection
    assert ["unhashable"] not in collection
    assert collection.pop("key") is first
    assert first not in collection
    assert "key" not in collection
    assert len(collection) == 0
    assert collection.pop("key") is None
    collection.add("key", other)  # the key is free again
    assert collection.result("key") == "other"


def test_future_collection_default_max_length_is_50():
    assert FutureCollection().max_length == 50


def test_future_collection_evicts_finished_oldest_first():
    collection = FutureCollection(max_length=3)
    old_done = make_finished_future("a")
    unfinished_b = concurrent.futures.Future()
    newer_done = make_finished_future("c")
    unfinished_d = concurrent.futures.Future()
    collection.add("a", old_done)
    collection.add("b", unfinished_b)
    collection.add("c", newer_done)
    collection.add("d", unfinished_d)
    # Over max_length: the oldest finished one goes.
    assert len(collection) == 3
    assert collection.done("a") is None
    assert set(collection.keys()) == {"b", "c", "d"}

    collection.add("e", concurrent.futures.Future())
    # The remaining finished one goes before any unfinished one, although it is newer.
    assert set(collection.keys()) == {"b", "d", "e"}

    collection.add("f", concurrent.futures.Future())
    # All stored are unfinished: the oldest unfinished goes.
    assert set(collection.keys()) == {"d", "e", "f"}
    assert unfinished_b not in collection


def test_future_collection_max_length_zero_means_no_limit():
    collection = FutureCollection(max_length=0)
    for index in range(120):
        collection.add(index, make_finished_future(index))
    assert len(collection) == 120
    assert collection.result(0) == 0


def test_future_collection_is_thread_safe():
    collection = FutureCollection(max_length=0)
    start_together = threading.Barrier(8, timeout=WAIT_SECONDS)

    def add_and_pop_many(thread_index):
        start_together.wait()
        for item in range(200):
            collection.add((thread_index, item), make_finished_future(item))
        for item in range(0, 200, 2):
            assert collection.pop((thread_index, item)).result() == item

    assert run_concurrently(add_and_pop_many, 8) == []
    assert len(collection) == 800
    assert set(collection.keys()) == {(t, i) for t in range(8) for i in range(1, 200, 2)}


def test_submit_stored_future_can_be_queried_and_popped_by_key(executor):
    release = threading.Event()
    try:
        future = executor.submit_stored("stored-key", wait_for_event_then_return, release, "stored-value")
        assert isinstance(executor.futures, FutureCollection)
        assert future in executor.futures
        assert len(executor.futures) == 1
        assert wait_for_condition(lambda: executor.futures.running("stored-key"))
        assert executor.futures.done("stored-key") is False
        assert executor.futures._state("stored-key") == "RUNNING"
        with pytest.raises(concurrent.futures.TimeoutError):
            executor.futures.result("stored-key", timeout=0.05)
    finally:
        release.set()
    assert executor.futures.result("stored-key", timeout=WAIT_SECONDS) == "stored-value"
    assert executor.futures.done("stored-key") is True
    assert executor.futures._state("stored-key") == "FINISHED"
    assert executor.futures.exception("stored-key") is None
    assert executor.futures.pop("stored-key") is future
    assert executor.futures.done("stored-key") is None
    assert len(executor.futures) == 0


def test_futures_cancel_by_key_stops_a_queued_task_from_running(make_executor):
    executor = make_executor(EXECUTOR_MAX_WORKERS=1)
    release = threading.Event()
    started = threading.Event()
    queued_ran = threading.Event()

    def block():
        started.set()
        release.wait(WAIT_SECONDS)

    try:
        executor.submit_stored("blocker", block)
        assert started.wait(WAIT_SECONDS)
        executor.submit_stored("queued", queued_ran.set)
        assert executor.futures.cancel("queued") is True
        assert executor.futures.cancelled("queued") is True
    finally:
        release.set()
    executor.futures.result("blocker", timeout=WAIT_SECONDS)
    assert not queued_ran.wait(0.3)


def test_futures_max_length_config_evicts_finished_first_and_warns_on_dropping_unfinished(
    make_executor, app, caplog
):
    caplog.set_level(logging.WARNING)
    executor = make_executor(EXECUTOR_FUTURES_MAX_LENGTH="2", EXECUTOR_MAX_WORKERS=4)
    assert executor.futures.max_length == 2
    release = threading.Event()
    try:
        executor.submit_stored("done-one", square_number, 2).result(timeout=WAIT_SECONDS)
        executor.submit_stored("unfinished-one", wait_for_event_then_return, release, "u1")
        executor.submit_stored("unfinished-two", wait_for_event_then_return, release, "u2")
        # The finished one is evicted, without a warning.
        assert set(executor.futures.keys()) == {"unfinished-one", "unfinished-two"}
        assert [r for r in caplog.records if r.name == app.logger.name and r.levelno >= logging.WARNING] == []
        executor.submit_stored("unfinished-three", wait_for_event_then_return, release, "u3")
        # All unfinished: the oldest unfinished goes, with a warning on the app's logger.
        assert set(executor.futures.keys()) == {"unfinished-two", "unfinished-three"}
        assert [r for r in caplog.records if r.name == app.logger.name and r.levelno == logging.WARNING]
    finally:
        release.set()
    assert executor.futures.result("unfinished-three", timeout=WAIT_SECONDS) == "u3"


# ---------------------------------------------------------------------------
# Jobs (@executor.job)
# ---------------------------------------------------------------------------


def test_job_submit_submit_stored_and_map_run_with_the_app_context(executor, app):
    @executor.job
    def multiply(first, second=2):
        return first * second, current_app.config["APP_MARKER"]

    marker = app.config["APP_MARKER"]
    future = multiply.submit(3, second=4)
    assert isinstance(future, concurrent.futures.Future)
    assert future.result(timeout=WAIT_SECONDS) == (12, marker)
    stored = multiply.submit_stored("multiply-key", 5)
    assert stored.result(timeout=WAIT_SECONDS) == (10, marker)
    assert executor.futures.result("multiply-key") == (10, marker)
    with pytest.raises(ValueError):
        multiply.submit_stored("multiply-key", 6)
    assert list(multiply.map([1, 2, 3], [10, 20, 30])) == [(10, marker), (40, marker), (90, marker)]
    with app.app_context():
        assert multiply(7) == (14, marker)  # a direct call, in the caller's context


def test_job_of_an_unbound_executor_called_directly_calls_the_function():
    executor = Executor()

    @executor.job
    def plain_addition(first, second):
        return first + second

    assert plain_addition(2, 3) == 5


def test_job_map_timeout_raises_timeout_error(executor):
    release = threading.Event()

    @executor.job
    def wait_for_release(number):
        release.wait(WAIT_SECONDS)
        return number

    try:
        with pytest.raises(concurrent.futures.TimeoutError):
            list(wait_for_release.map([1, 2], timeout=0.2))
    finally:
        release.set()


def test_job_preserves_name_doc_and_wrapped(executor):
    def documented_task(number):
        """Doubles the number."""
        return number * 2

    job = executor.job(documented_task)
    assert job.__name__ == "documented_task"
    assert job.__doc__ == "Doubles the number."
    assert job.__wrapped__ is documented_task
    assert isinstance(job, flask_executor.ExecutorJob)


def test_module_level_job_runs_in_process_pool(app):
    app.config["PROCESSJOBS_EXECUTOR_TYPE"] = "process"
    app.config["PROCESSJOBS_EXECUTOR_MAX_WORKERS"] = 2
    process_jobs_executor.init_app(app)
    try:
        assert cube_number_job(2) == 8
        assert cube_number_job.__name__ == "cube_number_job"
        assert cube_number_job.__doc__ == "Return the cube of number."
        assert cube_number_job.submit(3).result(timeout=WAIT_SECONDS) == 27
        assert cube_number_job.submit_stored("cube-key", 4).result(timeout=WAIT_SECONDS) == 64
        assert list(cube_number_job.map([1, 2, 3])) == [1, 8, 27]
    finally:
        process_jobs_executor.shutdown(wait=True)
        process_jobs_executor.futures.pop("cube-key")


# ---------------------------------------------------------------------------
# Done callbacks, logging of failed tasks and EXECUTOR_PROPAGATE_EXCEPTIONS
# ---------------------------------------------------------------------------


def test_default_done_callback_called_for_every_future(executor, app):
    seen = []
    lock = threading.Lock()

    def record_future(future):
        with lock:
            seen.append((future, has_app_context() and current_app.config["APP_MARKER"]))

    executor.add_default_done_callback(record_future)

    @executor.job
    def add_ten(number):
        return number + 10

    futures = [executor.submit(square_number, n) for n in range(3)]
    futures.append(executor.submit_stored("callback-key", square_number, 9))
    futures.append(add_ten.submit(1))
    futures.append(add_ten.submit_stored("callback-job-key", 2))
    mapped = list(executor.map(square_number, [4, 5]))
    mapped += list(add_ten.map([6]))
    assert mapped == [16, 25, 16]
    for future in futures:
        future.result(timeout=WAIT_SECONDS)

    expected_calls = len(futures) + 3
    assert wait_for_condition(lambda: len(seen) >= expected_calls)
    time.sleep(0.1)
    assert len(seen) == expected_calls
    seen_futures = [future for future, _ in seen]
    for future in futures:
        assert seen_futures.count(future) == 1
    # Every callback ran inside an app context of the executor's app.
    assert {marker for _, marker in seen} == {app.config["APP_MARKER"]}


def test_done_callbacks_run_in_app_context_even_when_added_after_completion(executor, app):
    markers = []
    default_markers = []
    executor.add_default_done_callback(lambda future: default_markers.append(app_marker_in_current_context()))
    future = executor.submit(square_number, 6)
    assert future.result(timeout=WAIT_SECONDS) == 36
    assert wait_for_condition(lambda: len(default_markers) == 1)

    # Added after completion, from a thread with no context: runs at once, in a context.
    assert not has_app_context()
    future.add_done_callback(lambda done: markers.append((app_marker_in_current_context(), done.result())))
    assert wait_for_condition(lambda: len(markers) == 1)
    assert not has_app_context()

    # Added before completion.
    release = threading.Event()
    pending = executor.submit(lambda: release.wait(WAIT_SECONDS) and "late")
    pending.add_done_callback(lambda done: markers.append((app_marker_in_current_context(), done.result())))
    release.set()
    assert pending.result(timeout=WAIT_SECONDS) == "late"
    assert wait_for_condition(lambda: len(markers) == 2)

    marker = app.config["APP_MARKER"]
    assert wait_for_condition(lambda: len(default_markers) == 2)  # one per future
    assert default_markers == [marker, marker]
    assert markers == [(marker, 36), (marker, "late")]


def test_raising_callback_is_logged_and_others_still_run(executor, app, caplog):
    caplog.set_level(logging.WARNING)
    later_ran = threading.Event()

    def failing_callback(future):
        raise RuntimeError("callback-failure-marker")

    executor.add_default_done_callback(failing_callback)
    future = executor.submit(square_number, 2)
    future.add_done_callback(lambda done: later_ran.set())
    assert future.result(timeout=WAIT_SECONDS) == 4
    assert later_ran.wait(WAIT_SECONDS)
    assert wait_for_condition(lambda: app_error_records_mentioning(caplog, app, "callback-failure-marker"))


TASK_EXCEPTION_LOGGING_CASES = [
    # (executor type, EXECUTOR_PROPAGATE_EXCEPTIONS, EXECUTOR_LOG_EXCEPTIONS, ERROR records)
    (executor_type, propagate, log_exceptions, expected_records)
    for executor_type in ("thread", "process")
    for propagate, log_exceptions, expected_records in [
        (False, True, 1),  # the default: the task's failure is logged once
        (True, False, 1),  # logged because the propagate callback re-raises it
        (True, True, 1),  # both on: still logged once, not twice
        (False, False, 0),  # neither: kept in the future only
    ]
] + [("sync", False, True, 1), ("sync", False, False, 0)]


@pytest.mark.parametrize(
    "executor_type,propagate,log_exceptions,expected_records",
    TASK_EXCEPTION_LOGGING_CASES,
    ids=[f"{case[0]}-propagate={case[1]}-log={case[2]}" for case in TASK_EXCEPTION_LOGGING_CASES],
)
def test_failed_task_is_logged_once_unless_both_logging_and_propagation_are_off(
    make_executor, app, caplog, executor_type, propagate, log_exceptions, expected_records
):
    caplog.set_level(logging.WARNING)
    if executor_type == "thread":
        # Config read from the environment comes as strings: the thread rows use words.
        words = {True: "True", False: "off"}
        propagate, log_exceptions = words[propagate], words[log_exceptions]
    executor = make_executor(
        EXECUTOR_TYPE=executor_type,
        EXECUTOR_MAX_WORKERS=2,
        EXECUTOR_PROPAGATE_EXCEPTIONS=propagate,
        EXECUTOR_LOG_EXCEPTIONS=log_exceptions,
    )
    marker = f"failure-marker-{uuid.uuid4().hex}"
    callbacks_done = threading.Event()
    future = executor.submit(raise_value_error_with_message, marker)
    future.add_done_callback(lambda done: callbacks_done.set())
    with pytest.raises(ValueError, match=marker):
        future.result(timeout=WAIT_SECONDS)
    assert callbacks_done.wait(WAIT_SECONDS)
    if expected_records:
        assert wait_for_condition(lambda: app_error_records_mentioning(caplog, app, marker))
    time.sleep(0.2)  # room for a second (wrong) record to appear
    records = app_error_records_mentioning(caplog, app, marker)
    assert len(records) == expected_records
    assert all(record.exc_info is not None for record in records)  # with traceback
    if not expected_records:
        assert error_records_from_logger(caplog, app.logger.name) == []


def test_propagate_exceptions_in_sync_mode_raises_from_submit(make_executor):
    executor = make_executor(EXECUTOR_TYPE="sync", EXECUTOR_PROPAGATE_EXCEPTIONS="yes")
    with pytest.raises(ZeroDivisionError):
        executor.submit(divide_one_by_zero)


def test_propagate_exceptions_callback_is_importable_and_reraises():
    from flask_executor import propagate_exceptions_callback

    failed = concurrent.futures.Future()
    failed.set_exception(KeyError("reraised"))
    with pytest.raises(KeyError):
        propagate_exceptions_callback(failed)
    assert propagate_exceptions_callback(make_finished_future("fine")) is None


# ---------------------------------------------------------------------------
# Process pools
# ---------------------------------------------------------------------------


def test_process_pool_runs_module_level_function(make_executor):
    executor = make_executor(EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=2)
    future = executor.submit(add_two_numbers, 20, second=22)
    assert isinstance(future, concurrent.futures.Future)
    assert future.result(timeout=WAIT_SECONDS) == 42
    assert executor.submit(os.getpid).result(timeout=WAIT_SECONDS) != os.getpid()


def test_process_pool_map_returns_results_in_input_order(make_executor):
    executor = make_executor(EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=2)
    assert list(executor.map(square_number, range(20))) == [n * n for n in range(20)]
    assert list(executor.map(square_number, range(20), chunksize=5)) == [n * n for n in range(20)]
    assert list(executor.map(add_two_numbers, [1, 2], [3, 4])) == [4, 6]


def test_process_pool_stored_results_and_task_exceptions_reach_the_parent(make_executor):
    executor = make_executor(EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=2)
    executor.submit_stored("process-key", square_number, 12)
    assert executor.futures.result("process-key", timeout=WAIT_SECONDS) == 144
    failing = executor.submit(raise_value_error_with_message, "process-failure")
    error = failing.exception(timeout=WAIT_SECONDS)
    assert isinstance(error, ValueError)
    assert "process-failure" in str(error)


def test_process_pool_rejects_lambdas_and_closures_at_submit_with_type_error(make_executor):
    executor = make_executor(EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=2)
    with pytest.raises(TypeError, match="(?i)pickl"):
        executor.submit(lambda: 1)

    def local_closure():
        return executor

    with pytest.raises(TypeError, match="(?i)pickl"):
        executor.submit(local_closure)
    # The executor still works afterwards.
    assert executor.submit(square_number, 3).result(timeout=WAIT_SECONDS) == 9


def record_app_marker_of_callback(markers, future):
    markers.append((app_marker_in_current_context(), future.result()))


def test_process_pool_done_callbacks_run_in_app_context(make_executor, app):
    executor = make_executor(EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=2)
    default_markers = []
    later_markers = []
    executor.add_default_done_callback(lambda future: record_app_marker_of_callback(default_markers, future))
    futures = [executor.submit(square_number, n) for n in range(3)]
    futures.append(executor.submit_stored("process-callback-key", square_number, 5))
    assert list(executor.map(square_number, [6, 7])) == [36, 49]
    assert [f.result(timeout=WAIT_SECONDS) for f in futures] == [0, 1, 4, 25]
    assert wait_for_condition(lambda: len(default_markers) == 6)
    # Added after completion, from this thread with no context.
    futures[2].add_done_callback(lambda future: record_app_marker_of_callback(later_markers, future))
    assert wait_for_condition(lambda: len(later_markers) == 1)
    marker = app.config["APP_MARKER"]
    assert sorted(default_markers) == sorted([(marker, value) for value in (0, 1, 4, 25, 36, 49)])
    assert later_markers == [(marker, 4)]


def test_process_pool_fork_task_runs_in_app_context(make_executor, app):
    executor = make_executor(EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=1, EXECUTOR_MP_CONTEXT="fork")
    assert (
        executor.submit(app_marker_in_current_context).result(timeout=WAIT_SECONDS)
        == app.config["APP_MARKER"]
    )


# ---------------------------------------------------------------------------
# The module's public names
# ---------------------------------------------------------------------------


def test_module_exports_its_public_names():
    assert isinstance(flask_executor.__version__, str)
    assert flask_executor.__version__
    assert flask_executor.Executor is Executor
    assert flask_executor.FutureCollection is FutureCollection
    for public_name in (
        "Executor",
        "ExecutorJob",
        "FutureCollection",
        "TaskFuture",
        "Progress",
        "report_progress",
        "QueueFull",
        "propagate_exceptions_callback",
        "__version__",
    ):
        assert hasattr(flask_executor, public_name), public_name
    assert issubclass(flask_executor.TaskFuture, concurrent.futures.Future)


# ================================================================================================
# Test mode, coroutine functions, pluggable executors and Dask, process pools with an app
# context, process pool options, types for users of the wheel
# ================================================================================================
# Module-level helpers and fixtures of this part start with ``eco_`` (classes with ``Eco``).
# Functions that process pools, spawned workers or Dask workers run are module-level, so they
# pickle by reference; spawned workers import this module by its name, from sys.path.


ECO_REPO = Path(__file__).resolve().parent
ECO_WORKER_APP_MODULE = "eco_worker_app"
ECO_WORKER_APP_SOURCE = '''\
"""The app that spawned and forkserver workers load through EXECUTOR_PROCESS_APP."""
from flask import Flask

CREATED = 0


def create_app():
    global CREATED
    CREATED += 1
    app = Flask("eco_worker_app")
    app.config["ECO_X"] = "from-create-app"
    return app


app = Flask("eco_worker_app")
app.config["ECO_X"] = "from-module-app"
'''
# Set by a test before a pool starts: forked workers see the new value, spawned ones the import-time one.
eco_parent_marker = {"value": "import-time"}
# Keyword arguments the executor factories below were called with.
eco_factory_calls = []
# The Dask client of the running test cluster (set by the eco_dask_client fixture).
eco_dask_state = {"client": None}


# ---------------------------------------------------------------------------------------------
# Tasks (module-level so that every kind of pool can run them)


def eco_add(a, b):
    return a + b


def eco_divide(a, b):
    return a / b


def eco_thread_ident():
    return threading.get_ident()


def eco_new_uuid():
    return uuid.uuid4().hex


def eco_echo_kwargs(**kwargs):
    return kwargs


def eco_nap_then_return(value, seconds=0.5):
    time.sleep(seconds)
    return value


def eco_snapshot():
    """What a task can see of its process, thread and Flask contexts."""
    snap = {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "marker": eco_parent_marker["value"],
        "thread": threading.get_ident(),
        "thread_name": threading.current_thread().name,
        "has_app": has_app_context(),
        "has_request": has_request_context(),
        "app_name": None,
        "x": None,
        "g_user": None,
        "path": None,
        "args": None,
    }
    if has_app_context():
        snap["app_name"] = current_app.name
        snap["x"] = current_app.config.get("ECO_X")
        snap["g_user"] = g.get("eco_user")
    if has_request_context():
        snap["path"] = request.path
        snap["args"] = request.args.to_dict()
    return snap


def eco_snapshot_and_mark_g():
    """Like eco_snapshot, then writes to g (which must not reach the submitter's g)."""
    snap = eco_snapshot()
    g.eco_written_by_task = True
    return snap


def eco_worker_app_creations():
    return sys.modules[ECO_WORKER_APP_MODULE].CREATED


async def eco_async_add(a, b):
    await asyncio.sleep(0)
    return a + b


async def eco_async_app_name():
    await asyncio.sleep(0)
    return current_app.name


async def eco_async_divide(a, b):
    await asyncio.sleep(0)
    return a / b


async def eco_async_snapshot():
    await asyncio.sleep(0)
    return eco_snapshot()


# ---------------------------------------------------------------------------------------------
# Executors and factories for the pluggable-executor tests


class EcoThreadPool(concurrent.futures.ThreadPoolExecutor):
    """A user's ThreadPoolExecutor subclass: thread-like, so contexts are pushed."""

    def __init__(self, max_workers=None):
        super().__init__(max_workers=max_workers, thread_name_prefix="eco-pool")


def eco_thread_pool_factory(**kwargs):
    eco_factory_calls.append(kwargs)
    return EcoThreadPool(**kwargs)


def eco_fork_pool_factory(**kwargs):
    eco_factory_calls.append(kwargs)
    return concurrent.futures.ProcessPoolExecutor(mp_context=multiprocessing.get_context("fork"), **kwargs)


def eco_not_an_executor_factory(**kwargs):
    return object()


class EcoPicklingExecutor(concurrent.futures.Executor):
    """A process-like executor that is no stdlib pool: each call travels through pickle and
    runs in a new thread (which starts with no Flask context)."""

    def __init__(self, max_workers=None):
        self.submitted = 0

    def submit(self, fn, /, *args, **kwargs):
        fn, args, kwargs = pickle.loads(pickle.dumps((fn, args, kwargs)))
        self.submitted += 1
        future = concurrent.futures.Future()

        def run():
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:
                    future.set_exception(exc)

        threading.Thread(target=run, name="eco-pickling").start()
        return future


def eco_dask_executor_factory():
    return eco_dask_state["client"].get_executor()


# A module-level job: process pools pickle it by reference (1.0 raised TypeError here).
eco_job_executor = Executor(name="ecojob")


@eco_job_executor.job
def eco_job_square(x):
    return x * x, os.getpid()


# ---------------------------------------------------------------------------------------------
# Fixtures


def eco_new_app(**config):
    app = Flask(__name__)
    app.config["TESTING"] = True
    app.config["ECO_X"] = uuid.uuid4().hex
    app.config.update(config)
    return app


@pytest.fixture
def eco_make_executor(make_executor):
    """make_executor, with the app first and a fresh one (eco_new_app) by default."""

    def make(app=None, name="", **config):
        return make_executor(name, target_app=app if app is not None else eco_new_app(), **config)

    return make


@pytest.fixture
def eco_job_executor_bound():
    """Binds the module-level eco_job_executor to a fresh app with the given config."""

    def bind(**config):
        app = eco_new_app(**{f"ECOJOB_{key}": value for key, value in config.items()})
        eco_job_executor.init_app(app)
        return app

    yield bind
    eco_job_executor.shutdown(wait=True)


@pytest.fixture(scope="session")
def eco_worker_app(tmp_path_factory):
    """Writes the worker app module, puts its folder on sys.path (spawned workers, forkserver
    workers and Dask workers get the parent's sys.path) and returns the imported module."""
    folder = tmp_path_factory.mktemp("eco_worker_app")
    (folder / f"{ECO_WORKER_APP_MODULE}.py").write_text(ECO_WORKER_APP_SOURCE)
    sys.path.insert(0, str(folder))
    importlib.invalidate_caches()
    module = importlib.import_module(ECO_WORKER_APP_MODULE)
    yield module
    sys.path.remove(str(folder))
    sys.modules.pop(ECO_WORKER_APP_MODULE, None)


@pytest.fixture(scope="class")
def eco_dask_client(eco_worker_app):
    # Imported here, not at the top: spawned workers import this module, and they need no Dask.
    import distributed

    cluster = distributed.LocalCluster(
        n_workers=1,
        threads_per_worker=2,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
    )
    client = distributed.Client(cluster)
    eco_dask_state["client"] = client
    yield client
    eco_dask_state["client"] = None
    client.close()
    cluster.close()


# ---------------------------------------------------------------------------------------------
# Test mode: EXECUTOR_TYPE='sync'


def test_sync_runs_inline_in_the_caller_and_returns_a_finished_future(eco_make_executor):
    executor = eco_make_executor(EXECUTOR_TYPE="sync")
    ran = []
    future = executor.submit(ran.append, "ran")
    assert ran == ["ran"]
    assert future.done()
    assert isinstance(future, TaskFuture)
    assert isinstance(future, concurrent.futures.Future)

    future = executor.submit(eco_thread_ident)
    assert future.done()
    assert future.result(timeout=0) == threading.get_ident()


def test_sync_task_gets_a_fresh_app_context_with_a_copy_of_g(eco_make_executor):
    app = eco_new_app()
    torn_down = []
    app.teardown_appcontext(lambda exc: torn_down.append("app"))
    executor = eco_make_executor(app, EXECUTOR_TYPE="sync")
    with app.app_context():
        g.eco_user = "alice"
        snap = executor.submit(eco_snapshot_and_mark_g).result(timeout=0)
        assert snap["app_name"] == app.name
        assert snap["x"] == app.config["ECO_X"]
        assert snap["g_user"] == "alice"
        assert snap["thread"] == threading.get_ident()
        # The task's g was a copy; the caller's context is back in place and untouched.
        assert torn_down == ["app"]
        assert "eco_written_by_task" not in g
        assert g.eco_user == "alice"
        assert current_app._get_current_object() is app
    assert torn_down == ["app", "app"]


def test_sync_task_gets_a_copy_of_the_request_and_teardowns_run(eco_make_executor):
    app = eco_new_app()
    torn_down = []
    app.teardown_appcontext(lambda exc: torn_down.append("app"))
    app.teardown_request(lambda exc: torn_down.append("request"))
    executor = eco_make_executor(app, EXECUTOR_TYPE="sync")
    with app.test_request_context("/eco/sync?q=1"):
        g.eco_user = "bob"
        snap = executor.submit(eco_snapshot_and_mark_g).result(timeout=0)
        assert snap["has_request"]
        assert snap["path"] == "/eco/sync"
        assert snap["args"] == {"q": "1"}
        assert snap["g_user"] == "bob"
        assert sorted(torn_down) == ["app", "request"]
        assert request.path == "/eco/sync"
        assert "eco_written_by_task" not in g


def test_sync_without_any_context_uses_the_bound_app(eco_make_executor):
    app = eco_new_app()
    executor = eco_make_executor(app, EXECUTOR_TYPE="sync")
    assert not has_app_context()
    snap = executor.submit(eco_snapshot).result(timeout=0)
    assert snap["has_app"]
    assert snap["app_name"] == app.name
    assert not snap["has_request"]
    assert not has_app_context()


def test_sync_stored_futures_jobs_map_and_default_callbacks_all_complete_inline(eco_make_executor):
    app = eco_new_app()
    executor = eco_make_executor(app, EXECUTOR_TYPE="sync")
    seen = []
    executor.add_default_done_callback(lambda future: seen.append((future.result(), current_app.name)))

    future = executor.submit_stored("eco-sum", eco_add, 1, 2)
    assert future.done()
    assert seen == [(3, app.name)]
    assert "eco-sum" in executor.futures
    assert executor.futures.done("eco-sum") is True
    assert executor.futures.result("eco-sum") == 3
    with pytest.raises(ValueError):
        executor.submit_stored("eco-sum", eco_add, 5, 5)
    assert executor.futures.pop("eco-sum") is future

    @executor.job
    def eco_local_job(a, b):
        return a * b

    assert eco_local_job(2, 3) == 6
    job_future = eco_local_job.submit(4, 5)
    assert job_future.done()
    assert job_future.result(timeout=0) == 20
    assert seen[-1] == (20, app.name)
    assert eco_local_job.submit_stored("eco-job", 2, 2).result(timeout=0) == 4
    assert executor.futures.result("eco-job") == 4
    assert list(eco_local_job.map([1, 2], [3, 4])) == [3, 8]
    assert list(executor.map(eco_add, [1, 2, 3], [10, 20, 30])) == [11, 22, 33]

    # Closures are fine in test mode: nothing is pickled. A task may submit another one.
    assert (
        executor.submit(lambda: executor.submit(eco_add, 2, 3).result(timeout=0) + 1).result(timeout=0) == 6
    )


def test_sync_exception_is_kept_on_the_future_by_default(eco_make_executor):
    executor = eco_make_executor(EXECUTOR_TYPE="sync", EXECUTOR_LOG_EXCEPTIONS=False)
    future = executor.submit(eco_divide, 1, 0)
    assert future.done()
    assert isinstance(future.exception(timeout=0), ZeroDivisionError)


@pytest.mark.parametrize("propagate", [True, "true", "yes"])
def test_sync_propagate_exceptions_raises_from_submit_and_later_tasks_still_run(eco_make_executor, propagate):
    executor = eco_make_executor(
        EXECUTOR_TYPE="sync", EXECUTOR_PROPAGATE_EXCEPTIONS=propagate, EXECUTOR_LOG_EXCEPTIONS=False
    )
    with pytest.raises(ZeroDivisionError):
        executor.submit(eco_divide, 1, 0)
    assert executor.submit(eco_divide, 1, 4).result(timeout=0) == 0.25


# ---------------------------------------------------------------------------------------------
# Coroutine functions


@pytest.mark.parametrize("executor_type", ["thread", "sync"])
def test_coroutine_functions_give_their_awaited_result(eco_make_executor, executor_type):
    app = eco_new_app()
    executor = eco_make_executor(app, EXECUTOR_TYPE=executor_type)
    assert executor.submit(eco_async_add, 2, 3).result(timeout=30) == 5
    assert executor.submit(eco_async_app_name).result(timeout=30) == app.name
    assert executor.submit_stored("eco-async", eco_async_add, 1, 1).result(timeout=30) == 2
    assert list(executor.map(eco_async_add, [1, 2], [10, 20], timeout=30)) == [11, 22]

    failing = executor.submit(eco_async_divide, 1, 0)
    assert isinstance(failing.exception(timeout=30), ZeroDivisionError)

    job = executor.job(eco_async_add)
    assert job.submit(4, 5).result(timeout=30) == 9
    assert list(job.map([1, 2], [1, 1], timeout=30)) == [2, 3]

    async def eco_local_coroutine():
        await asyncio.sleep(0)
        return g.get("eco_user"), current_app.name

    with app.app_context():
        g.eco_user = "carol"
        assert executor.submit(eco_local_coroutine).result(timeout=30) == ("carol", app.name)


def test_coroutine_in_sync_mode_runs_inside_a_running_event_loop(eco_make_executor):
    executor = eco_make_executor(EXECUTOR_TYPE="sync")

    async def caller():
        future = executor.submit(eco_async_add, 1, 2)
        assert future.done()
        return future.result(timeout=0)

    assert asyncio.run(caller()) == 3


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_coroutine_runs_in_a_process_pool(eco_make_executor, start_method):
    app = eco_new_app()
    executor = eco_make_executor(
        app, EXECUTOR_TYPE="process", EXECUTOR_MP_CONTEXT=start_method, EXECUTOR_MAX_WORKERS=1
    )
    assert executor.submit(eco_async_add, 20, 22).result(timeout=60) == 42
    assert list(executor.map(eco_async_add, [1, 2], [1, 1], timeout=60)) == [2, 3]
    snap = executor.submit(eco_async_snapshot).result(timeout=60)
    assert snap["pid"] != os.getpid()
    if start_method == "fork":
        assert snap["app_name"] == app.name


# ---------------------------------------------------------------------------------------------
# Pluggable executors: EXECUTOR_TYPE as an import string, a factory or a class


@pytest.mark.timeout(60)
def test_pluggable_import_string_of_a_thread_pool_class_pushes_contexts(eco_make_executor):
    app = eco_new_app()
    executor = eco_make_executor(app, EXECUTOR_TYPE="concurrent.futures:ThreadPoolExecutor")
    with app.test_request_context("/eco/plug?q=2"):
        g.eco_user = "dave"
        snap = executor.submit(eco_snapshot).result(timeout=30)
    assert snap["thread"] != threading.get_ident()
    assert snap["app_name"] == app.name
    assert snap["g_user"] == "dave"
    assert snap["path"] == "/eco/plug"
    assert snap["args"] == {"q": "2"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("max_workers", [3, "3"], ids=["int", "str"])
def test_pluggable_factory_import_string_gets_max_workers_as_an_int(eco_make_executor, max_workers):
    eco_factory_calls.clear()
    executor = eco_make_executor(
        EXECUTOR_TYPE=f"{__name__}:eco_thread_pool_factory", EXECUTOR_MAX_WORKERS=max_workers
    )
    assert executor.submit(eco_add, 1, 2).result(timeout=30) == 3
    assert eco_factory_calls
    assert all(call == {"max_workers": 3} for call in eco_factory_calls)


@pytest.mark.timeout(60)
def test_pluggable_factory_without_max_workers_is_called_without_it(eco_make_executor):
    eco_factory_calls.clear()
    executor = eco_make_executor(EXECUTOR_TYPE=f"{__name__}:eco_thread_pool_factory")
    assert executor.submit(eco_add, 1, 2).result(timeout=30) == 3
    assert eco_factory_calls
    assert all(call == {} for call in eco_factory_calls)


@pytest.mark.timeout(60)
def test_pluggable_callable_as_executor_type_builds_the_pool(eco_make_executor):
    eco_factory_calls.clear()
    executor = eco_make_executor(EXECUTOR_TYPE=eco_thread_pool_factory, EXECUTOR_MAX_WORKERS=2)
    assert executor.submit(eco_snapshot).result(timeout=30)["thread_name"].startswith("eco-pool")
    assert eco_factory_calls
    assert all(call == {"max_workers": 2} for call in eco_factory_calls)

    executor = eco_make_executor(EXECUTOR_TYPE=concurrent.futures.ThreadPoolExecutor)
    assert executor.submit(eco_add, 2, 2).result(timeout=30) == 4


@pytest.mark.parametrize(
    "executor_type", [f"{__name__}:eco_not_an_executor_factory", eco_not_an_executor_factory]
)
@pytest.mark.parametrize("name", ["", "ecobad"])
def test_pluggable_factory_returning_no_executor_fails_at_init_app(executor_type, name):
    key = f"{name.upper()}_EXECUTOR_TYPE" if name else "EXECUTOR_TYPE"
    app = eco_new_app(**{key: executor_type})
    executor = Executor(name=name)
    with pytest.raises(ValueError, match=key):
        executor.init_app(app)


@pytest.mark.parametrize(
    "executor_type",
    [
        "eco_no_such_module_anywhere:Pool",
        "concurrent.futures:NoSuchPool",
        "concurrent.futures:",
        ":ThreadPoolExecutor",
        "not an import string",
    ],
)
def test_pluggable_bad_import_string_fails_at_init_app(executor_type):
    app = eco_new_app(EXECUTOR_TYPE=executor_type)
    with pytest.raises(ValueError, match="EXECUTOR_TYPE"):
        Executor(app)


@pytest.mark.timeout(60)
def test_pluggable_thread_pool_subclass_gets_contexts_and_accepts_lambdas(eco_make_executor):
    app = eco_new_app()
    torn_down = []
    app.teardown_appcontext(lambda exc: torn_down.append("app"))
    app.teardown_request(lambda exc: torn_down.append("request"))
    executor = eco_make_executor(app, EXECUTOR_TYPE=eco_thread_pool_factory)
    with app.test_request_context("/eco/subclass"):
        g.eco_user = "erin"
        future = executor.submit(eco_snapshot)
        snap = future.result(timeout=30)
    assert snap["thread_name"].startswith("eco-pool")
    assert snap["app_name"] == app.name
    assert snap["g_user"] == "erin"
    assert snap["path"] == "/eco/subclass"
    # A lambda is fine: thread-like executors pickle nothing.
    assert executor.submit(lambda: current_app.name).result(timeout=30) == app.name
    executor.shutdown(wait=True)
    assert "app" in torn_down and "request" in torn_down


@pytest.mark.timeout(60)
def test_pluggable_non_thread_pool_executor_is_treated_like_a_process_pool(eco_make_executor):
    app = eco_new_app()
    executor = eco_make_executor(app, EXECUTOR_TYPE=f"{__name__}:EcoPicklingExecutor")
    # A configured executor serializes as it chooses (Dask and loky can send a lambda), so
    # its own error comes out of submit, and nothing is kept.
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError), match="(?i)pickl|local object"):
        executor.submit_stored("eco-unpicklable", lambda: 1)
    assert "eco-unpicklable" not in executor.futures
    with app.test_request_context("/eco/other"):
        g.eco_user = "frank"
        snap = executor.submit(eco_snapshot).result(timeout=30)
    assert snap["thread_name"] == "eco-pickling"
    # Process-like: g and the request do not travel with the task.
    assert not snap["has_request"]
    assert snap["g_user"] is None
    assert executor.submit(eco_add, 1, 2).result(timeout=30) == 3


@pytest.mark.timeout(120)
def test_pluggable_process_pool_factory_gets_the_forked_app(eco_make_executor):
    eco_factory_calls.clear()
    app = eco_new_app()
    executor = eco_make_executor(app, EXECUTOR_TYPE=eco_fork_pool_factory, EXECUTOR_MAX_WORKERS=1)
    with app.test_request_context("/eco/forkpool"):
        g.eco_user = "gina"
        snap = executor.submit(eco_snapshot).result(timeout=60)
    assert eco_factory_calls and all(call == {"max_workers": 1} for call in eco_factory_calls)
    assert snap["pid"] != os.getpid()
    assert snap["app_name"] == app.name
    assert snap["x"] == app.config["ECO_X"]
    assert not snap["has_request"]
    assert snap["g_user"] is None
    with pytest.raises(TypeError, match="(?i)pickl"):
        executor.submit(lambda: 1)


# ---------------------------------------------------------------------------------------------
# Process pools with an app context


@pytest.mark.timeout(120)
def test_forked_process_worker_gets_the_parent_app_but_not_its_request_or_g(eco_make_executor):
    app = eco_new_app()
    app.config["ECO_X"] = f"set-at-runtime-{uuid.uuid4().hex}"
    executor = eco_make_executor(
        app, EXECUTOR_TYPE="process", EXECUTOR_MP_CONTEXT="fork", EXECUTOR_MAX_WORKERS=1
    )
    with app.test_request_context("/eco/fork"):
        g.eco_user = "hank"
        snap = executor.submit(eco_snapshot).result(timeout=60)
    assert snap["pid"] != os.getpid()
    assert snap["has_app"]
    assert snap["app_name"] == app.name
    assert snap["x"] == app.config["ECO_X"]
    # g and the request do not travel to another process, not even through the fork.
    assert snap["path"] is None
    assert not snap["has_request"]
    assert snap["g_user"] is None
    # Nor does a later task see the request that was active when the worker was forked.
    snap = executor.submit(eco_snapshot).result(timeout=60)
    assert snap["pid"] != os.getpid()
    assert snap["path"] is None


@pytest.mark.timeout(120)
def test_forked_process_worker_without_push_app_context_runs_without_context(eco_make_executor):
    app = eco_new_app()
    executor = eco_make_executor(
        app,
        EXECUTOR_TYPE="process",
        EXECUTOR_MP_CONTEXT="fork",
        EXECUTOR_MAX_WORKERS=1,
        EXECUTOR_PUSH_APP_CONTEXT=False,
    )
    with app.test_request_context("/eco/bare"):
        g.eco_user = "ivan"
        snap = executor.submit(eco_snapshot).result(timeout=60)
    assert snap["pid"] != os.getpid()
    assert not snap["has_app"]
    assert not snap["has_request"]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
@pytest.mark.parametrize(
    ("process_app", "expected_x"),
    [
        (f"{ECO_WORKER_APP_MODULE}:app", "from-module-app"),
        (f"{ECO_WORKER_APP_MODULE}:create_app()", "from-create-app"),
    ],
)
def test_process_app_is_loaded_once_in_spawned_and_forkserver_workers(
    eco_make_executor, eco_worker_app, start_method, process_app, expected_x
):
    app = eco_worker_app.create_app()
    executor = eco_make_executor(
        app,
        EXECUTOR_TYPE="process",
        EXECUTOR_MP_CONTEXT=start_method,
        EXECUTOR_MAX_WORKERS=1,
        EXECUTOR_PROCESS_APP=process_app,
    )
    snaps = [executor.submit(eco_snapshot).result(timeout=60) for _ in range(3)]
    for snap in snaps:
        assert snap["pid"] != os.getpid()
        assert snap["has_app"]
        assert snap["app_name"] == app.name == "eco_worker_app"
        assert snap["x"] == expected_x
        assert snap["marker"] == "import-time"
    if process_app.endswith("()"):
        # The worker loads the app once, not once per task.
        assert executor.submit(eco_worker_app_creations).result(timeout=60) == 1


@pytest.mark.timeout(120)
def test_spawned_process_worker_without_process_app_runs_without_app_context(eco_make_executor):
    executor = eco_make_executor(EXECUTOR_TYPE="process", EXECUTOR_MP_CONTEXT="spawn", EXECUTOR_MAX_WORKERS=1)
    snap = executor.submit(eco_snapshot).result(timeout=60)
    assert snap["pid"] != os.getpid()
    assert not snap["has_app"]
    assert executor.submit(eco_add, 2, 3).result(timeout=60) == 5


@pytest.mark.timeout(180)
@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_module_level_job_runs_in_a_process_pool_of_each_start_method(eco_job_executor_bound, start_method):
    eco_job_executor_bound(EXECUTOR_TYPE="process", EXECUTOR_MP_CONTEXT=start_method, EXECUTOR_MAX_WORKERS=1)
    assert eco_job_square(3) == (9, os.getpid())
    value, pid = eco_job_square.submit(4).result(timeout=60)
    assert value == 16
    assert pid != os.getpid()
    key = f"eco-square-{start_method}"
    assert eco_job_square.submit_stored(key, 5).result(timeout=60)[0] == 25
    assert eco_job_executor.futures.pop(key) is not None
    assert [value for value, _ in eco_job_square.map([1, 2], timeout=60)] == [1, 4]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_process_pool_unpicklable_callable_fails_at_submit_and_is_not_stored(eco_make_executor, start_method):
    executor = eco_make_executor(
        EXECUTOR_TYPE="process", EXECUTOR_MP_CONTEXT=start_method, EXECUTOR_MAX_WORKERS=1
    )

    def eco_closure():
        return executor

    for task in (lambda: 1, eco_closure):
        with pytest.raises(TypeError, match="(?i)pickl"):
            executor.submit(task)
    with pytest.raises(TypeError, match="(?i)pickl"):
        executor.job(eco_closure).submit()
    with pytest.raises(TypeError, match="(?i)pickl"):
        executor.submit_stored("eco-unpicklable", eco_closure)
    assert "eco-unpicklable" not in executor.futures
    assert executor.submit(eco_add, 1, 2).result(timeout=60) == 3


# ---------------------------------------------------------------------------------------------
# Process pool options: EXECUTOR_MP_CONTEXT and EXECUTOR_MAX_TASKS_PER_CHILD


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_process_mp_context_sets_the_workers_start_method(eco_make_executor, monkeypatch, start_method):
    token = uuid.uuid4().hex
    monkeypatch.setitem(eco_parent_marker, "value", token)
    executor = eco_make_executor(
        EXECUTOR_TYPE="process", EXECUTOR_MP_CONTEXT=start_method, EXECUTOR_MAX_WORKERS=1
    )
    snap = executor.submit(eco_snapshot).result(timeout=60)
    assert snap["pid"] != os.getpid()
    forked = snap["marker"] == token  # a forked worker shares the parent's memory at fork time
    child_of_this_process = snap["ppid"] == os.getpid()  # forkserver workers are the server's children
    assert (forked, child_of_this_process) == {
        "fork": (True, True),
        "spawn": (False, True),
        "forkserver": (False, False),
    }[start_method]


@pytest.mark.parametrize("mp_context", ["bogus", "thread", 3])
def test_process_bad_mp_context_fails_at_init_app(mp_context):
    app = eco_new_app(EXECUTOR_TYPE="process", EXECUTOR_MP_CONTEXT=mp_context)
    with pytest.raises(ValueError, match="EXECUTOR_MP_CONTEXT"):
        Executor(app)


def test_process_max_tasks_per_child_refused_with_fork_bad_values_or_old_python():
    with_fork = eco_new_app(
        EXECUTOR_TYPE="process", EXECUTOR_MP_CONTEXT="fork", EXECUTOR_MAX_TASKS_PER_CHILD=1
    )
    with pytest.raises(ValueError, match="EXECUTOR_MAX_TASKS_PER_CHILD"):
        Executor(with_fork)
    for bad in (0, "none", -1):
        with pytest.raises(ValueError, match="EXECUTOR_MAX_TASKS_PER_CHILD"):
            Executor(eco_new_app(EXECUTOR_TYPE="process", EXECUTOR_MAX_TASKS_PER_CHILD=bad))
    if sys.version_info < (3, 11):  # concurrent.futures has no max_tasks_per_child before 3.11
        with pytest.raises(ValueError, match="EXECUTOR_MAX_TASKS_PER_CHILD"):
            Executor(eco_new_app(EXECUTOR_TYPE="process", EXECUTOR_MAX_TASKS_PER_CHILD=1))


@pytest.mark.timeout(180)
@pytest.mark.skipif(sys.version_info < (3, 11), reason="max_tasks_per_child needs Python 3.11")
@pytest.mark.parametrize(("mp_context", "max_tasks"), [(None, 1), ("spawn", 1), ("forkserver", "1")])
def test_process_max_tasks_per_child_replaces_workers(eco_make_executor, mp_context, max_tasks):
    config = {"EXECUTOR_TYPE": "process", "EXECUTOR_MAX_WORKERS": 1}
    if mp_context is not None:
        config["EXECUTOR_MP_CONTEXT"] = mp_context
    recycling = eco_make_executor(EXECUTOR_MAX_TASKS_PER_CHILD=max_tasks, **config)
    first = recycling.submit(os.getpid).result(timeout=60)
    second = recycling.submit(os.getpid).result(timeout=60)
    assert os.getpid() not in (first, second)
    assert first != second

    # Control: without the option one worker runs both tasks.
    keeping = eco_make_executor(**config)
    first = keeping.submit(os.getpid).result(timeout=60)
    assert keeping.submit(os.getpid).result(timeout=60) == first


# ---------------------------------------------------------------------------------------------
# Types for users of the wheel


@pytest.mark.timeout(900)
def test_wheel_ships_type_stubs_that_check_user_code(tmp_path):
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "MYPYPATH")}

    def run(*command):
        done = subprocess.run(
            [str(part) for part in command],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=600,
        )
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
        return done.stdout

    # Built from a copy, so that the build leaves nothing in the checkout and no stale build/ is used.
    source = tmp_path / "source"
    shutil.copytree(
        ECO_REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".nox", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"
        ),
    )
    wheels = tmp_path / "wheels"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", source, "-w", wheels)
    (wheel,) = wheels.glob("flask_executor-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert "flask_executor.py" in names
        assert "flask_executor-stubs/__init__.pyi" in names
        stub = archive.read("flask_executor-stubs/__init__.pyi").decode()
    assert "class Executor" in stub

    venv_dir = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv_dir)
    python = venv_dir / "bin" / "python"
    run(python, "-m", "pip", "install", wheel, "mypy")
    output = run(sys.executable, ECO_REPO / "typing_check" / "check_types.py", "--python", python)
    assert "user_code.py: clean" in output
    assert "user_code_errors.py: the expected errors" in output


# ---------------------------------------------------------------------------------------------
# Dask distributed scale-out. The tests share one LocalCluster, which lives as long as this
# class: no test forks a process while the cluster's threads are running.


class TestDask:
    @pytest.mark.timeout(120)
    def test_dask_submit_map_stored_futures_jobs_and_callbacks_work(
        self, eco_make_executor, eco_dask_client, eco_job_executor_bound
    ):
        app = eco_new_app()
        executor = eco_make_executor(app, EXECUTOR_TYPE=eco_dask_executor_factory)
        called_back = threading.Event()
        callback_app = []

        def eco_remember(future):
            callback_app.append(current_app.name)
            called_back.set()

        executor.add_default_done_callback(eco_remember)
        future = executor.submit(eco_add, 40, 2)
        assert isinstance(future, TaskFuture)
        assert future.result(timeout=60) == 42
        assert called_back.wait(30)
        assert callback_app[0] == app.name
        assert executor.submit(eco_snapshot).result(timeout=60)["pid"] != os.getpid()
        assert list(executor.map(eco_add, [1, 2, 3], [10, 20, 30], timeout=60)) == [11, 22, 33]
        assert executor.submit_stored("eco-dask", eco_async_add, 1, 2).result(timeout=60) == 3

        eco_job_executor_bound(EXECUTOR_TYPE=eco_dask_executor_factory)
        assert eco_job_square.submit(6).result(timeout=60)[0] == 36

    @pytest.mark.timeout(120)
    def test_dask_factory_given_as_an_import_string_works(self, eco_make_executor, eco_dask_client):
        executor = eco_make_executor(EXECUTOR_TYPE=f"{__name__}:eco_dask_executor_factory")
        assert executor.submit(eco_add, 1, 1).result(timeout=60) == 2

    @pytest.mark.timeout(120)
    def test_dask_each_submit_runs_the_task_again(self, eco_make_executor, eco_dask_client):
        executor = eco_make_executor(EXECUTOR_TYPE=eco_dask_executor_factory)
        first = executor.submit(eco_new_uuid).result(timeout=60)
        second = executor.submit(eco_new_uuid).result(timeout=60)
        assert first != second

    @pytest.mark.timeout(120)
    def test_dask_task_keyword_arguments_named_like_dask_options_reach_the_task(
        self, eco_make_executor, eco_dask_client
    ):
        executor = eco_make_executor(EXECUTOR_TYPE=eco_dask_executor_factory)
        kwargs = {"key": "eco-user-key", "priority": 7, "retries": 2, "pure": "no"}
        assert executor.submit(eco_echo_kwargs, **kwargs).result(timeout=60) == kwargs

    @pytest.mark.timeout(120)
    def test_dask_worker_runs_tasks_in_the_process_app_only_when_configured(
        self, eco_make_executor, eco_dask_client, eco_worker_app
    ):
        executor = eco_make_executor(
            EXECUTOR_TYPE=eco_dask_executor_factory, EXECUTOR_PROCESS_APP=f"{ECO_WORKER_APP_MODULE}:app"
        )
        snap = executor.submit(eco_snapshot).result(timeout=60)
        assert snap["has_app"]
        assert snap["app_name"] == "eco_worker_app"
        assert snap["x"] == "from-module-app"

        bare = eco_make_executor(EXECUTOR_TYPE=eco_dask_executor_factory)
        snap = bare.submit(eco_snapshot).result(timeout=60)
        assert not snap["has_app"]

    @pytest.mark.timeout(120)
    def test_dask_shutdown_refuses_submits_until_init_app_again(self, eco_dask_client):
        app = eco_new_app(EXECUTOR_TYPE=eco_dask_executor_factory)
        executor = Executor(app)
        assert executor.submit(eco_add, 1, 2).result(timeout=60) == 3
        executor.shutdown(wait=True)
        with pytest.raises(RuntimeError):
            executor.submit(eco_add, 1, 2)
        executor.init_app(app)
        assert executor.submit(eco_add, 2, 2).result(timeout=60) == 4
        executor.shutdown(wait=False, cancel_futures=True)
        with pytest.raises(RuntimeError):
            executor.submit(eco_add, 1, 2)

    @pytest.mark.timeout(120)
    def test_dask_accepted_tasks_still_run_after_rebind_or_shutdown_without_wait(self, eco_dask_client):
        # As with the stdlib pools: a new init_app and shutdown(wait=False) stop new tasks, and every
        # task already accepted still runs (only cancel_futures=True cancels waiting ones).
        app = eco_new_app(EXECUTOR_TYPE=eco_dask_executor_factory)
        executor = Executor(app)
        before_rebind = executor.submit(eco_nap_then_return, "survived rebind")
        executor.init_app(eco_new_app(EXECUTOR_TYPE=eco_dask_executor_factory))
        assert before_rebind.result(timeout=60) == "survived rebind"

        before_shutdown = executor.submit(eco_nap_then_return, "survived shutdown")
        executor.shutdown(wait=False)
        assert before_shutdown.result(timeout=60) == "survived shutdown"

    @pytest.mark.timeout(120)
    def test_dask_rebind_to_a_thread_pool_and_back_finishes_accepted_tasks(self, eco_dask_client):
        executor = Executor(eco_new_app(EXECUTOR_TYPE=eco_dask_executor_factory))
        on_dask = executor.submit(eco_nap_then_return, "dask")
        thread_app = eco_new_app(EXECUTOR_TYPE="thread")
        executor.init_app(thread_app)
        assert on_dask.result(timeout=60) == "dask"
        assert executor.submit(eco_snapshot).result(timeout=30)["app_name"] == thread_app.name

        on_threads = executor.submit(eco_nap_then_return, "thread")
        executor.init_app(eco_new_app(EXECUTOR_TYPE=eco_dask_executor_factory))
        assert on_threads.result(timeout=60) == "thread"
        assert executor.submit(eco_add, 1, 2).result(timeout=60) == 3
        executor.shutdown(wait=True)


# ================================================================================================
# Reliability: forks, dead workers, floods, shutdown, bad config, isolation under load
# ================================================================================================


# Everything here uses real parts: real ``os.fork``, a real gunicorn with
# ``--preload``, real process pools whose workers really die, and a real
# threaded werkzeug server.  Network traffic only goes to 127.0.0.1 on a free
# port; every loop is bounded in count and time, and every test carries a
# ``pytest-timeout`` mark.
#
# Module-level helpers and fixtures of this part are prefixed ``rel_`` (constants
# ``REL_``), which keeps them apart from the other parts' helpers.

# ``os.fork`` in a process that already runs threads (pytest + pool threads)
# makes Python 3.12+ emit a DeprecationWarning; forking is exactly what these
# tests are about, so the warning is noise here.
REL_FORK_WARNING = "ignore:.*use of fork\\(\\) may lead to deadlocks:DeprecationWarning"

REL_MODULE_DIR = os.path.dirname(os.path.abspath(flask_executor.__file__))


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def rel_make_app(tag, **config):
    """A Flask app with its own logger name (``app.name``) so that log
    records of one test can never be confused with another test's."""
    app = Flask(f"rel_{tag}_{uuid.uuid4().hex[:8]}", root_path=REL_MODULE_DIR)
    app.config.update(config)
    return app


@pytest.fixture
def rel_executors():
    """Factory of executors; every executor made is shut down (without
    waiting) at teardown so a failing test cannot leave work behind."""
    made = []

    def make(app, name=""):
        executor = Executor(app, name=name)
        made.append(executor)
        return executor

    yield make
    for executor in made:
        try:
            executor.shutdown(wait=False, cancel_futures=True)
        except Exception:
            pass


@pytest.fixture
def rel_gates():
    """Factory of threading.Events used to block tasks; all are set at
    teardown so no pool thread stays blocked after the test."""
    gates = []

    def make():
        gate = threading.Event()
        gates.append(gate)
        return gate

    yield make
    for gate in gates:
        gate.set()


@pytest.fixture
def rel_fast_switching():
    """Switch threads far more often than usual so that races in
    check-then-act code have a real chance to show up."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(previous)


def rel_wait_until(predicate, timeout=10.0, interval=0.01):
    """Poll ``predicate`` until it is true or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def rel_record_text(record):
    """Message of a log record plus its formatted traceback, if any."""
    text = record.getMessage()
    if record.exc_info:
        text += "\n" + "".join(traceback.format_exception(*record.exc_info))
    return text


def rel_app_records(caplog, app, level):
    return [r for r in caplog.records if r.name == app.name and r.levelno == level]


def rel_rss_kb():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("VmRSS not found in /proc/self/status")


def rel_http_get(port, path, headers=None, timeout=20.0):
    """One GET on a fresh connection. Returns (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, resp.getheaders(), body
    finally:
        conn.close()


def rel_run_in_fork(child_fn, timeout=30.0):
    """Fork; the child runs ``child_fn()`` (which returns a message string)
    and always leaves with ``os._exit``.  Returns (exit code, message); the
    exit code is None when the child had to be killed after ``timeout``."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 70
        message = "child produced no message"
        try:
            os.close(read_fd)
            message = child_fn()
            code = 0
        except BaseException as exc:  # report everything to the parent
            message = "child failed:\n" + "".join(traceback.format_exception(exc))
            code = 1
        finally:
            try:
                # stay below the pipe buffer: the parent reads after exit
                os.write(write_fd, str(message).encode()[:60000])
            finally:
                os._exit(code)
    os.close(write_fd)
    status = None
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            waited, st = os.waitpid(pid, os.WNOHANG)
            if waited:
                status = st
                break
            time.sleep(0.05)
        if status is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None, f"child did not finish within {timeout} s (killed)"
        chunks = []
        while True:
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        return os.waitstatus_to_exitcode(status), b"".join(chunks).decode(errors="replace")
    finally:
        os.close(read_fd)


# Task functions.  Module level so that process pools can pickle them by
# reference.


def rel_task_pid_double(x):
    return os.getpid(), x * 2


def rel_task_sleep_return(value, delay):
    time.sleep(delay)
    return value


def rel_task_kill_self():
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(30)  # not reached


def rel_task_exit_hard():
    os._exit(1)


def rel_task_identity(value):
    return value


# --------------------------------------------------------------------------
# Fork safety: the executor works in a forked child
# --------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings(REL_FORK_WARNING)
def test_forked_child_first_submit_to_a_thread_pool_runs_in_the_child(rel_executors):
    app = rel_make_app("fork_thread", EXECUTOR_MAX_WORKERS=2)
    executor = rel_executors(app)
    # warm-up in the parent: both pool threads exist before the fork (the two
    # tasks can only pass the barrier when they run at the same time)
    meeting = threading.Barrier(2)
    warm = [executor.submit(meeting.wait, 10) for _ in range(2)]
    assert sorted(f.result(timeout=20) for f in warm) == [0, 1]
    assert executor.submit(rel_task_pid_double, 2).result(timeout=10) == (os.getpid(), 4)

    def child():
        me = os.getpid()
        # the lone first task in the child must run (in the child)
        result = executor.submit(rel_task_pid_double, 21).result(timeout=5)
        assert result == (me, 42), result
        futures = [executor.submit(rel_task_pid_double, i) for i in range(20)]
        results = [f.result(timeout=10) for f in futures]
        assert results == [(me, 2 * i) for i in range(20)], results
        return "ok"

    code, message = rel_run_in_fork(child)
    assert code == 0, message
    assert message == "ok"
    # the parent's pool is unaffected by the child
    assert executor.submit(rel_task_pid_double, 5).result(timeout=10) == (os.getpid(), 10)


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings(REL_FORK_WARNING)
def test_forked_child_first_submit_to_a_process_pool_runs(rel_executors):
    app = rel_make_app(
        "fork_process", EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=2, EXECUTOR_MP_CONTEXT="fork"
    )
    executor = rel_executors(app)
    pid, value = executor.submit(rel_task_pid_double, 1).result(timeout=30)
    assert value == 2 and pid != os.getpid()

    def child():
        me = os.getpid()
        try:
            worker_pid, value = executor.submit(rel_task_pid_double, 21).result(timeout=10)
            assert value == 42 and worker_pid != me, (worker_pid, value)
            results = [
                f.result(timeout=20) for f in [executor.submit(rel_task_pid_double, i) for i in range(10)]
            ]
            assert [v for _, v in results] == [2 * i for i in range(10)], results
        finally:
            # do not leave the child's own worker processes behind
            stopper = threading.Thread(target=executor.shutdown, daemon=True)
            stopper.start()
            stopper.join(10)
        return "ok"

    code, message = rel_run_in_fork(child, timeout=60)
    assert code == 0, message
    assert message == "ok"
    assert executor.submit(rel_task_pid_double, 5).result(timeout=30)[1] == 10


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings(REL_FORK_WARNING)
def test_forked_child_of_a_busy_parent_with_a_full_queue_can_submit(rel_executors, rel_gates):
    """Fork while the parent's workers are busy and its queue is full: the
    child starts from an empty pool and an empty queue, so its first submit
    is accepted and runs."""
    app = rel_make_app("fork_busy", EXECUTOR_MAX_WORKERS=2, EXECUTOR_QUEUE_SIZE=1)
    executor = rel_executors(app)
    gate = rel_gates()
    started = []

    def blocker(tag):
        started.append(tag)
        gate.wait(60)
        return tag

    futures = [executor.submit(blocker, i) for i in range(2)]
    assert rel_wait_until(lambda: len(started) == 2)
    futures.append(executor.submit(blocker, 2))
    with pytest.raises(QueueFull):
        executor.submit(rel_task_identity, "parent-full")

    def child():
        me = os.getpid()
        assert executor.submit(rel_task_pid_double, 21).result(timeout=5) == (me, 42)
        return "ok"

    code, message = rel_run_in_fork(child)
    assert code == 0, message
    assert message == "ok"
    gate.set()
    assert [f.result(timeout=30) for f in futures] == [0, 1, 2]
    assert executor.submit(rel_task_identity, "parent").result(timeout=30) == "parent"


REL_GUNICORN_APP = """
import os
import threading

from flask import Flask, jsonify, request

from flask_executor import Executor

app = Flask(__name__)
app.config["EXECUTOR_MAX_WORKERS"] = 2
executor = Executor(app)


def task(token):
    return {"pid": os.getpid(), "token": token}


# warm-up at import time, i.e. in the gunicorn master before it forks: both pool
# threads exist (the two tasks can only pass the barrier when they run together)
meeting = threading.Barrier(2)
warm = [executor.submit(meeting.wait, 10) for _ in range(2)]
assert sorted(f.result(timeout=20) for f in warm) == [0, 1]
assert executor.submit(task, "warm-up").result(timeout=10) == {"pid": os.getpid(), "token": "warm-up"}


@app.route("/")
def index():
    token = request.args.get("token", "")
    return jsonify(executor.submit(task, token).result(timeout=10))
"""


@pytest.mark.timeout(180)
def test_gunicorn_preload_workers_each_run_tasks_in_their_own_pool(tmp_path):
    # gunicorn is a test-only dependency (pip install gunicorn)
    (tmp_path / "rel_gunicorn_app.py").write_text(REL_GUNICORN_APP)
    port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(tmp_path), REL_MODULE_DIR] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    log_path = tmp_path / "gunicorn.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "--preload",
                "-w",
                "2",
                "--threads",
                "4",
                "-b",
                f"127.0.0.1:{port}",
                "--graceful-timeout",
                "5",
                "--timeout",
                "60",
                "--chdir",
                str(tmp_path),
                "rel_gunicorn_app:app",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(tmp_path),
        )
    try:
        assert wait_for_port(port, proc, timeout=30), "gunicorn did not start:\n" + log_path.read_text()

        # lone requests, one after another, until both workers have answered
        worker_pids = set()
        for i in range(200):
            token = f"lone-{i}"
            status, _, body = rel_http_get(port, f"/?token={token}", timeout=20)
            assert status == 200, (status, body, log_path.read_text())
            data = json.loads(body)
            assert data["token"] == token
            worker_pids.add(data["pid"])
            if len(worker_pids) == 2:
                break
        assert len(worker_pids) == 2, (worker_pids, log_path.read_text())
        assert proc.pid not in worker_pids  # tasks ran in the workers, not the master

        # a burst of concurrent requests, each answered with its own token
        tokens = [uuid.uuid4().hex for _ in range(40)]

        def fetch(token):
            status, _, body = rel_http_get(port, f"/?token={token}", timeout=30)
            return status, body

        with concurrent.futures.ThreadPoolExecutor(max_workers=40) as clients:
            answers = list(clients.map(fetch, tokens, timeout=90))
        for token, (status, body) in zip(tokens, answers):
            assert status == 200, (status, body)
            data = json.loads(body)
            assert data["token"] == token
            assert data["pid"] in worker_pids
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)


# --------------------------------------------------------------------------
# Dead process workers
# --------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings(REL_FORK_WARNING)
@pytest.mark.parametrize("killer", [rel_task_kill_self, rel_task_exit_hard], ids=["sigkill", "os_exit"])
def test_dead_process_worker_fails_only_the_tasks_handed_to_workers(rel_executors, caplog, killer):
    # 3 workers: the pool hands the ProcessPoolExecutor at most 2 x 3 + 1 tasks at a time (those
    # running, and those next in line, as its call queue holds them). When a worker dies, those
    # fail with BrokenProcessPool; the tasks still waiting in Flask-Executor's own queue never
    # reached a process, and run on a new pool.
    caplog.set_level(logging.DEBUG)
    app = rel_make_app(
        "dead_worker", EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=3, EXECUTOR_MP_CONTEXT="fork"
    )
    executor = rel_executors(app)
    assert executor.submit(rel_task_identity, "warm").result(timeout=30) == "warm"

    in_flight = [executor.submit(rel_task_sleep_return, i, 20) for i in range(2)]
    doomed = executor.submit(killer)
    next_in_line = [executor.submit(rel_task_sleep_return, i, 20) for i in range(2, 6)]
    assert all(f.running() for f in [*in_flight, doomed, *next_in_line])
    waiting = [executor.submit(rel_task_sleep_return, i, 0) for i in range(6, 16)]
    assert not any(f.running() or f.done() for f in waiting)

    handed_over = {"doomed": doomed, "in_flight_0": in_flight[0], "in_flight_1": in_flight[1]}
    handed_over.update((f"next_in_line_{index}", future) for index, future in enumerate(next_in_line))
    _, not_done = concurrent.futures.wait([*handed_over.values(), *waiting], timeout=60)
    assert not not_done, "futures of the broken pool never finished: " + repr(
        sorted(name for name, f in handed_over.items() if f in not_done)
    )
    for name, future in handed_over.items():
        assert isinstance(future.exception(timeout=0), BrokenProcessPool), (name, future.exception())
    assert [f.result(timeout=0) for f in waiting] == list(range(6, 16))

    # the next submit works too
    assert executor.submit(rel_task_identity, "after").result(timeout=60) == "after"
    assert executor.submit(rel_task_pid_double, 4).result(timeout=60)[1] == 8

    assert rel_wait_until(lambda: rel_app_records(caplog, app, logging.WARNING), timeout=10), (
        "no WARNING on app.logger about the broken pool; records: "
        + repr([(r.name, r.levelname, r.getMessage()) for r in caplog.records])
    )


REL_DROPPED_EXECUTOR_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from flask import Flask
from flask_executor import Executor

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if __name__ == "__main__":
    app = Flask("dropped")
    app.config.update(EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=1, EXECUTOR_MP_CONTEXT="fork")
    executor = Executor(app)
    futures = [executor.submit(die) for _ in range(3)]
    del executor, app  # only the futures' callbacks still hold the executor and its pool
    print(type(futures[0].exception(timeout=30)).__name__, flush=True)
"""


@pytest.mark.timeout(120)
def test_dead_worker_of_a_dropped_executor_does_not_hang_interpreter_exit(tmp_path):
    # A broken pool fails its futures in its own manager thread, holding its shutdown
    # lock. If that dropped the last reference to the pool, the pool's collection callback
    # would wait for the same lock, and the process would hang at exit.
    script = tmp_path / "dropped_executor.py"
    script.write_text(REL_DROPPED_EXECUTOR_SCRIPT.format(repo=str(Path(__file__).resolve().parent)))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "BrokenProcessPool"


# --------------------------------------------------------------------------
# Backpressure: EXECUTOR_QUEUE_SIZE and EXECUTOR_QUEUE_TIMEOUT
# --------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("queue_size", [0, 3])
def test_queue_size_bounds_waiting_tasks_and_rejects_more_with_queue_full(
    rel_executors, rel_gates, queue_size
):
    app = rel_make_app("queue_bound", EXECUTOR_MAX_WORKERS=2, EXECUTOR_QUEUE_SIZE=queue_size)
    executor = rel_executors(app)
    gate = rel_gates()
    started, ran = [], []

    def blocker(tag):
        started.append(tag)
        gate.wait(60)
        ran.append(tag)
        return tag

    running = [executor.submit(blocker, i) for i in range(2)]
    assert rel_wait_until(lambda: len(started) == 2), started
    waiting = [executor.submit(blocker, i) for i in range(2, 2 + queue_size)]

    with pytest.raises(QueueFull):
        executor.submit(blocker, "rejected")
    with pytest.raises(QueueFull):
        executor.submit_stored("rel-rejected", blocker, "rejected-stored")
    assert "rel-rejected" not in list(executor.futures.keys())
    assert sorted(started) == [0, 1]  # the waiting ones are really waiting

    gate.set()
    results = [f.result(timeout=30) for f in running + waiting]
    assert results == list(range(2 + queue_size))
    # rejected tasks never ran, and the executor accepts work again
    assert executor.submit(rel_task_identity, "again").result(timeout=30) == "again"
    assert executor.submit_stored("rel-rejected", rel_task_identity, 7).result(timeout=30) == 7
    assert sorted(map(str, ran)) == sorted(map(str, range(2 + queue_size)))


@pytest.mark.timeout(120)
def test_queue_timeout_waits_for_room_then_raises_queue_full(rel_executors, rel_gates):
    app = rel_make_app(
        "queue_timeout", EXECUTOR_MAX_WORKERS=2, EXECUTOR_QUEUE_SIZE=1, EXECUTOR_QUEUE_TIMEOUT=0.5
    )
    executor = rel_executors(app)
    gate = rel_gates()
    started, ran = [], []

    def blocker(tag):
        started.append(tag)
        gate.wait(60)
        ran.append(tag)
        return tag

    futures = [executor.submit(blocker, i) for i in range(2)]
    assert rel_wait_until(lambda: len(started) == 2)
    futures.append(executor.submit(blocker, 2))

    t0 = time.monotonic()
    with pytest.raises(QueueFull):
        executor.submit(blocker, "rejected")
    waited = time.monotonic() - t0
    # lower bound only: it did wait for room before giving up
    assert waited >= 0.4, waited

    gate.set()
    assert [f.result(timeout=30) for f in futures] == [0, 1, 2]
    assert "rejected" not in ran


@pytest.mark.timeout(120)
def test_queue_timeout_lets_a_waiting_submit_through_when_room_frees(rel_executors, rel_gates):
    app = rel_make_app("queue_free", EXECUTOR_MAX_WORKERS=2, EXECUTOR_QUEUE_SIZE=1, EXECUTOR_QUEUE_TIMEOUT=30)
    executor = rel_executors(app)
    first_gate, other_gate = rel_gates(), rel_gates()
    started = []

    def blocker(tag, gate):
        started.append(tag)
        gate.wait(60)
        return tag

    futures = [executor.submit(blocker, 0, first_gate), executor.submit(blocker, 1, other_gate)]
    assert rel_wait_until(lambda: len(started) == 2)
    futures.append(executor.submit(blocker, 2, other_gate))  # fills the queue

    outcome = {}

    def late_submitter():
        try:
            outcome["future"] = executor.submit(rel_task_identity, "late")
        except BaseException as exc:
            outcome["error"] = exc

    submitter = threading.Thread(target=late_submitter, daemon=True)
    submitter.start()
    submitter.join(0.3)
    assert submitter.is_alive(), f"submit did not wait for room: {outcome}"

    first_gate.set()  # task 0 finishes, task 2 starts, the queue has room
    submitter.join(30)
    assert not submitter.is_alive()
    assert "error" not in outcome, outcome
    other_gate.set()
    assert outcome["future"].result(timeout=30) == "late"
    assert [f.result(timeout=30) for f in futures] == [0, 1, 2]


@pytest.mark.timeout(180)
def test_bounded_queue_flood_runs_each_accepted_task_once_and_memory_stays_bounded(rel_executors):
    app = rel_make_app("flood", EXECUTOR_MAX_WORKERS=2, EXECUTOR_QUEUE_SIZE=8)
    executor = rel_executors(app)
    counter = [0]
    counter_lock = threading.Lock()

    def small():
        time.sleep(0.001)
        with counter_lock:
            counter[0] += 1

    assert executor.submit(rel_task_identity, 1).result(timeout=10) == 1  # warm-up
    gc.collect()
    rss_before = rel_rss_kb()

    n_threads, per_thread = 16, 500
    barrier = threading.Barrier(n_threads)
    accepted_by_thread = [None] * n_threads
    rejected_by_thread = [0] * n_threads
    errors = []

    def flood(index):
        accepted = []
        rejected = 0
        try:
            barrier.wait(30)
            for _ in range(per_thread):
                try:
                    accepted.append(executor.submit(small))
                except QueueFull:
                    rejected += 1
        except BaseException as exc:
            errors.append(exc)
        accepted_by_thread[index] = accepted
        rejected_by_thread[index] = rejected

    threads = [threading.Thread(target=flood, args=(i,), daemon=True) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []

    accepted = [f for fs in accepted_by_thread for f in fs]
    rejected = sum(rejected_by_thread)
    assert len(accepted) + rejected == n_threads * per_thread
    assert rejected > 0, "the queue bound never rejected anything under a flood"
    assert len(accepted) > 0

    done, not_done = concurrent.futures.wait(accepted, timeout=120)
    assert not not_done
    assert all(f.exception() is None for f in done)
    # a task that was rejected never ran; every accepted one ran exactly once
    assert rel_wait_until(lambda: counter[0] == len(accepted), timeout=10)
    assert counter[0] == len(accepted)

    accepted.clear()
    accepted_by_thread.clear()
    done = not_done = None
    gc.collect()
    growth_mb = (rel_rss_kb() - rss_before) / 1024
    assert growth_mb < 100, f"RSS grew by {growth_mb:.1f} MB"


# --------------------------------------------------------------------------
# FutureCollection thread safety and eviction order
# --------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_concurrent_submit_stored_and_pop_keep_each_key_with_its_future(rel_executors, rel_fast_switching):
    app = rel_make_app("stored", EXECUTOR_MAX_WORKERS=4, EXECUTOR_FUTURES_MAX_LENGTH=0)
    executor = rel_executors(app)
    n_threads, per_thread = 16, 50
    barrier = threading.Barrier(n_threads)
    stored = [None] * n_threads
    popped_wrong = []
    errors = []

    def submitter(t):
        try:
            barrier.wait(30)
            stored[t] = {
                f"rel-{t}-{i}": executor.submit_stored(f"rel-{t}-{i}", rel_task_identity, f"rel-{t}-{i}")
                for i in range(per_thread)
            }
        except BaseException as exc:
            errors.append(exc)

    def popper(t):
        try:
            barrier.wait(30)
            for key, future in stored[t].items():
                got = executor.futures.pop(key)
                if got is not future:
                    popped_wrong.append((key, got))
        except BaseException as exc:
            errors.append(exc)

    for target in (submitter, popper):
        threads = [threading.Thread(target=target, args=(t,), daemon=True) for t in range(n_threads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert not any(th.is_alive() for th in threads)
        assert errors == []
        if target is submitter:
            all_keys = {k for d in stored for k in d}
            assert len(all_keys) == n_threads * per_thread
            assert len(executor.futures) == n_threads * per_thread
            assert set(executor.futures.keys()) == all_keys

    assert popped_wrong == []
    assert len(executor.futures) == 0
    for d in stored:
        for key, future in d.items():
            assert future.result(timeout=30) == key


@pytest.mark.timeout(120)
def test_concurrent_submit_stored_with_one_key_accepts_and_runs_only_one(rel_executors, rel_fast_switching):
    app = rel_make_app("same_key", EXECUTOR_MAX_WORKERS=4)
    executor = rel_executors(app)
    runs = []
    barrier = threading.Barrier(16)
    outcomes = []

    def task():
        runs.append(1)
        return "ran"

    def racer():
        barrier.wait(30)
        try:
            outcomes.append(executor.submit_stored("rel-shared", task))
        except ValueError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=racer, daemon=True) for _ in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    winners = [o for o in outcomes if isinstance(o, Future)]
    assert len(outcomes) == 16
    assert len(winners) == 1
    assert winners[0].result(timeout=30) == "ran"
    assert executor.futures.pop("rel-shared") is winners[0]
    assert len(runs) == 1


@pytest.mark.timeout(120)
def test_future_collection_concurrent_add_and_pop_lose_nothing(rel_fast_switching):
    collection = FutureCollection(max_length=0)
    errors, wrong = [], []
    barrier = threading.Barrier(16)

    def worker(t):
        try:
            barrier.wait(30)
            for i in range(2000):
                key = (t, i)
                future = Future()
                collection.add(key, future)
                assert future in collection
                if collection.pop(key) is not future:
                    wrong.append(key)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert errors == [] and wrong == []
    assert len(collection) == 0


@pytest.mark.timeout(120)
def test_future_collection_concurrent_eviction_keeps_max_length(rel_fast_switching):
    collection = FutureCollection(max_length=50)
    errors = []
    barrier = threading.Barrier(16)

    def worker(t):
        try:
            barrier.wait(30)
            for i in range(3000):
                future = Future()
                future.set_result(i)
                collection.add((t, i), future)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert errors == []
    assert len(collection) == 50
    assert len(list(collection.keys())) == 50


@pytest.mark.timeout(60)
def test_future_collection_evicts_finished_futures_in_order_added_not_finished():
    collection = FutureCollection(max_length=3)
    assert collection.max_length == 3
    futures = {key: Future() for key in "abcdefg"}
    futures["a"].set_result("a")
    futures["c"].set_result("c")
    futures["e"].set_result("e")

    for key in "abc":
        collection.add(key, futures[key])
    assert set(collection.keys()) == {"a", "b", "c"}

    collection.add("d", futures["d"])  # finished first, oldest first: a
    assert set(collection.keys()) == {"b", "c", "d"}

    collection.add("e", futures["e"])  # c is the only finished one
    assert set(collection.keys()) == {"b", "d", "e"}

    futures["d"].set_result("d")  # finished later: it is now evicted before e and b
    collection.add("f", futures["f"])
    assert set(collection.keys()) == {"b", "e", "f"}

    collection.add("g", futures["g"])  # e is the only finished one
    assert set(collection.keys()) == {"b", "f", "g"}

    collection.add("h", Future())  # all unfinished: the oldest unfinished, b, goes
    assert set(collection.keys()) == {"f", "g", "h"}
    assert len(collection) == 3
    assert collection.pop("b") is None
    assert collection.pop("f") is futures["f"]
    assert futures["b"] not in collection


@pytest.mark.timeout(120)
def test_stored_future_eviction_warns_once_for_an_unfinished_one_which_still_runs(
    rel_executors, rel_gates, caplog
):
    caplog.set_level(logging.DEBUG)
    app = rel_make_app("evict", EXECUTOR_MAX_WORKERS=8, EXECUTOR_FUTURES_MAX_LENGTH=3)
    executor = rel_executors(app)
    gate = rel_gates()

    def instant(key):
        return key

    def blocked(key):
        gate.wait(60)
        return key

    fa = executor.submit_stored("a", instant, "a")
    assert fa.result(timeout=10) == "a"
    fb = executor.submit_stored("b", blocked, "b")
    fc = executor.submit_stored("c", instant, "c")
    assert fc.result(timeout=10) == "c"
    executor.submit_stored("d", blocked, "d")  # a (finished, oldest) evicted
    assert set(executor.futures.keys()) == {"b", "c", "d"}
    executor.submit_stored("e", blocked, "e")  # c (only finished) evicted
    assert set(executor.futures.keys()) == {"b", "d", "e"}
    assert rel_app_records(caplog, app, logging.WARNING) == []  # finished ones go silently

    executor.submit_stored("f", blocked, "f")  # all unfinished: b evicted with a WARNING
    assert set(executor.futures.keys()) == {"d", "e", "f"}
    assert executor.futures.done("b") is None
    warnings = rel_app_records(caplog, app, logging.WARNING)
    assert len(warnings) == 1, [r.getMessage() for r in warnings]

    gate.set()
    assert fb.result(timeout=30) == "b"  # evicted from the collection, still ran
    for key in "def":
        assert executor.futures.result(key, timeout=30) == key


# --------------------------------------------------------------------------
# Failed tasks and raising callbacks are logged
# --------------------------------------------------------------------------


def rel_callbacks_barrier(future):
    """Add, while ``future`` is still pending, a done callback that sets the
    returned Event.  Callbacks of a pending future run in the order they were
    added, so once the Event is set the ones added before (the executor's)
    have run too.  (A callback added to a finished future runs at once, in
    the caller's thread, which is why the future must still be pending.)"""
    assert not future.done()
    seen = threading.Event()
    future.add_done_callback(lambda f: seen.set())
    return seen


def rel_run_failing_task(executor, gate):
    """Submits a task that raises ValueError(token) once its done callbacks are in place,
    waits until it has failed and its callbacks have run, and returns the token."""
    token = f"rel-boom-{uuid.uuid4().hex}"

    def failing():
        gate.wait(30)
        raise ValueError(token)

    future = executor.submit(failing)
    barrier = rel_callbacks_barrier(future)
    gate.set()
    assert isinstance(future.exception(timeout=30), ValueError)
    assert barrier.wait(30)
    return token


@pytest.mark.timeout(60)
def test_task_exception_is_logged_once_with_traceback_on_the_app_logger(rel_executors, rel_gates, caplog):
    caplog.set_level(logging.DEBUG)
    app = rel_make_app("log_exc")
    executor = rel_executors(app)
    token = rel_run_failing_task(executor, rel_gates())
    assert executor.submit(rel_task_identity, 1).result(timeout=30) == 1

    mentions = [r for r in caplog.records if token in rel_record_text(r)]
    assert len(mentions) == 1, [(r.name, r.levelname, r.getMessage()) for r in mentions]
    record = mentions[0]
    assert record.name == app.name
    assert record.levelno == logging.ERROR
    assert record.exc_info and record.exc_info[0] is ValueError
    assert "Traceback" in rel_record_text(record)
    assert token in rel_record_text(record)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("value", [False, "false", "False", "off", "0"], ids=repr)
def test_log_exceptions_off_keeps_task_exceptions_out_of_the_log(rel_executors, rel_gates, caplog, value):
    caplog.set_level(logging.DEBUG)
    app = rel_make_app("log_off", EXECUTOR_LOG_EXCEPTIONS=value)
    executor = rel_executors(app)
    token = rel_run_failing_task(executor, rel_gates())
    assert [r for r in caplog.records if token in rel_record_text(r)] == []
    assert rel_app_records(caplog, app, logging.ERROR) == []


@pytest.mark.timeout(60)
def test_every_raising_done_callback_is_logged_and_the_others_still_run(rel_executors, rel_gates, caplog):
    caplog.set_level(logging.DEBUG)
    app = rel_make_app("callbacks")
    executor = rel_executors(app)
    gate = rel_gates()
    calls = []
    token = f"rel-callback-boom-{uuid.uuid4().hex}"

    def raiser(future):
        raise RuntimeError(token)

    def default_raiser(future):
        raise RuntimeError(token + "-default")

    executor.add_default_done_callback(default_raiser)
    executor.add_default_done_callback(lambda f: calls.append("default-after"))

    future = executor.submit(lambda: gate.wait(30) and "done")
    future.add_done_callback(lambda f: calls.append("before"))
    future.add_done_callback(raiser)
    future.add_done_callback(lambda f: calls.append("after"))
    barrier = rel_callbacks_barrier(future)
    gate.set()
    assert future.result(timeout=30) == "done"
    assert barrier.wait(30)
    assert sorted(calls) == ["after", "before", "default-after"]
    assert calls.index("before") < calls.index("after")

    # a raising callback added to an already finished future runs at once;
    # it is logged too and does not raise into the caller
    future.add_done_callback(raiser)
    future.add_done_callback(lambda f: calls.append("late"))
    assert calls[-1] == "late"

    errors = rel_app_records(caplog, app, logging.ERROR)
    texts = [rel_record_text(r) for r in errors]
    assert len([t for t in texts if token + "-default" in t]) == 1, texts
    assert len([t for t in texts if token in t and token + "-default" not in t]) == 2, texts


# --------------------------------------------------------------------------
# Shutdown and interpreter exit
# --------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_shutdown_wait_runs_every_accepted_task(rel_executors):
    app = rel_make_app("shutdown_wait", EXECUTOR_MAX_WORKERS=2)
    executor = rel_executors(app)
    ran = []

    def slowish(i):
        time.sleep(0.02)
        ran.append(i)
        return i

    futures = [executor.submit(slowish, i) for i in range(50)]
    executor.shutdown(wait=True)
    assert sorted(ran) == list(range(50))
    assert all(f.done() for f in futures)
    assert [f.result(timeout=0) for f in futures] == list(range(50))


@pytest.mark.timeout(120)
def test_shutdown_cancel_futures_cancels_waiting_tasks_and_running_ones_finish(rel_executors, rel_gates):
    app = rel_make_app("shutdown_cancel", EXECUTOR_MAX_WORKERS=2)
    executor = rel_executors(app)
    gate = rel_gates()
    started, ran = [], []

    def blocker(i):
        started.append(i)
        gate.wait(60)
        ran.append(i)
        return i

    running = [executor.submit(blocker, i) for i in range(2)]
    assert rel_wait_until(lambda: len(started) == 2)
    waiting = [executor.submit(blocker, i) for i in range(2, 12)]

    stopper = threading.Thread(target=lambda: executor.shutdown(wait=True, cancel_futures=True), daemon=True)
    stopper.start()
    assert rel_wait_until(lambda: all(f.cancelled() for f in waiting), timeout=30), [
        f for f in waiting if not f.cancelled()
    ]
    gate.set()
    stopper.join(30)
    assert not stopper.is_alive()
    assert [f.result(timeout=30) for f in running] == [0, 1]
    assert all(f.cancelled() for f in waiting)
    assert sorted(ran) == [0, 1]


@pytest.mark.timeout(60)
def test_submit_after_shutdown_raises_and_runs_nothing_until_init_app(rel_executors):
    app = rel_make_app("shutdown_submit")
    executor = rel_executors(app)
    assert executor.submit(rel_task_identity, 1).result(timeout=10) == 1
    executor.shutdown(wait=True)
    ran = []
    with pytest.raises(RuntimeError):
        executor.submit(ran.append, 1)
    with pytest.raises(RuntimeError):
        executor.submit_stored("rel-after", ran.append, 2)
    assert executor.futures.pop("rel-after") is None
    assert ran == []
    executor.init_app(app)  # usable again
    assert executor.submit(rel_task_identity, 2).result(timeout=10) == 2


REL_EXIT_SCRIPT = """
import json
import sys
import threading
import time

out_path, module_dir, config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
shutdown_without_waiting = config.pop("rel_shutdown_wait_false", False)
sys.path.insert(0, module_dir)

from flask import Flask
from flask_executor import Executor

app = Flask("rel_exit_app")
app.config.update(config)
executor = Executor(app)
lock = threading.Lock()


def task(i):
    time.sleep(0.05)
    with lock:
        with open(out_path, "a") as fh:
            fh.write(f"{i}\\n")


for i in range(20):
    executor.submit(task, i)
print("submitted", flush=True)
if shutdown_without_waiting:
    executor.shutdown(wait=False)
# the main thread ends here without waiting for anything
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "config",
    [
        {"EXECUTOR_MAX_WORKERS": 2},
        {"EXECUTOR_MAX_WORKERS": 2, "EXECUTOR_QUEUE_SIZE": 50},
        {"EXECUTOR_MAX_WORKERS": 2, "rel_shutdown_wait_false": True},
    ],
    ids=["unbounded", "bounded_queue", "after_shutdown_wait_false"],
)
def test_interpreter_exit_completes_accepted_tasks(tmp_path, config):
    script = tmp_path / "rel_exit_script.py"
    script.write_text(REL_EXIT_SCRIPT)
    out = tmp_path / "out.txt"
    proc = subprocess.run(
        [sys.executable, str(script), str(out), REL_MODULE_DIR, json.dumps(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    assert "submitted" in proc.stdout
    assert out.exists(), proc.stderr
    assert sorted(int(line) for line in out.read_text().split()) == list(range(20))


# --------------------------------------------------------------------------
# Configuration validation
# --------------------------------------------------------------------------

REL_BAD_CONFIG = [
    ("EXECUTOR_MAX_WORKERS", "abc", {}),
    ("EXECUTOR_MAX_WORKERS", 0, {}),
    ("EXECUTOR_MAX_WORKERS", -1, {}),
    ("EXECUTOR_FUTURES_MAX_LENGTH", -1, {}),
    ("EXECUTOR_FUTURES_MAX_LENGTH", "x", {}),
    ("EXECUTOR_TYPE", "fibre", {}),
    ("EXECUTOR_PROPAGATE_EXCEPTIONS", "maybe", {}),
    ("EXECUTOR_PUSH_APP_CONTEXT", "maybe", {}),
    ("EXECUTOR_LOG_EXCEPTIONS", 2, {}),
    ("EXECUTOR_QUEUE_SIZE", "many", {}),
    ("EXECUTOR_QUEUE_SIZE", -1, {}),
    ("EXECUTOR_QUEUE_TIMEOUT", -1, {}),
    ("EXECUTOR_QUEUE_TIMEOUT", "soon", {}),
    ("EXECUTOR_MP_CONTEXT", "bogus", {"EXECUTOR_TYPE": "process"}),
    ("EXECUTOR_MAX_TASKS_PER_CHILD", 0, {"EXECUTOR_TYPE": "process"}),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("key,value,extra", REL_BAD_CONFIG, ids=[f"{k}={v!r}" for k, v, _ in REL_BAD_CONFIG])
def test_bad_config_value_raises_value_error_naming_key_and_value(key, value, extra):
    app = rel_make_app("bad_config", **extra)
    app.config[key] = value
    executor = Executor()
    with pytest.raises(ValueError) as info:
        executor.init_app(app)
    message = str(info.value)
    assert key in message, message
    assert str(value) in message, message


@pytest.mark.timeout(30)
def test_bad_config_of_a_named_executor_names_the_prefixed_key_and_value():
    app = rel_make_app("bad_named", CUSTOM_EXECUTOR_MAX_WORKERS="abc")
    with pytest.raises(ValueError) as info:
        Executor(app, name="custom")
    message = str(info.value)
    assert "CUSTOM_EXECUTOR_MAX_WORKERS" in message, message
    assert "abc" in message, message


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "key", ["EXECUTOR_PROPAGATE_EXCEPTIONS", "EXECUTOR_PUSH_APP_CONTEXT", "EXECUTOR_LOG_EXCEPTIONS"]
)
@pytest.mark.parametrize("value", ["TRUE", "off", "Yes", "0", True, False, "no", "1", "On"])
def test_bool_config_accepts_common_spellings(rel_executors, key, value):
    app = rel_make_app("good_bool")
    app.config[key] = value
    executor = rel_executors(app)
    assert executor.submit(rel_task_identity, 3).result(timeout=10) == 3


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "config",
    [
        {"EXECUTOR_MAX_WORKERS": "4"},
        {"EXECUTOR_FUTURES_MAX_LENGTH": "0"},
        {"EXECUTOR_QUEUE_SIZE": "0"},
        {"EXECUTOR_QUEUE_SIZE": "10", "EXECUTOR_QUEUE_TIMEOUT": "0.5"},
        {"EXECUTOR_TYPE": "sync"},
    ],
    ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()),
)
def test_config_values_given_as_strings_are_accepted(rel_executors, config):
    app = rel_make_app("good_config", **config)
    executor = rel_executors(app)
    assert executor.submit(rel_task_identity, 5).result(timeout=10) == 5


# --------------------------------------------------------------------------
# Isolation under load (real threaded werkzeug server)
# --------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_threaded_server_under_load_keeps_each_requests_g_args_and_session(rel_executors):
    app = rel_make_app("isolation", SECRET_KEY="rel-secret", EXECUTOR_MAX_WORKERS=8)
    executor = rel_executors(app)

    def task():
        return {
            "g": g.token,
            "arg": request.args["token"],
            "client": session["client"],
            "n": session["n"],
            "path": request.path,
        }

    @app.route("/echo")
    def echo():
        g.token = request.args["token"]
        session.setdefault("client", request.args["client"])
        session["n"] = session.get("n", 0) + 1
        return jsonify(executor.submit(task).result(timeout=20))

    class QuietHandler(WSGIRequestHandler):
        def log_request(self, *args, **kwargs):
            pass

    port = free_port()
    server = make_server("127.0.0.1", port, app, threaded=True, request_handler=QuietHandler)
    server_thread = threading.Thread(target=server.serve_forever, daemon=True)
    server_thread.start()

    n_clients, per_client = 16, 32
    mismatches, errors = [], []
    answered = [0] * n_clients

    def client(index):
        client_id = f"client-{index}"
        cookie = None
        try:
            for i in range(per_client):
                token = f"{index}-{i}-{uuid.uuid4().hex}"
                headers = {"Cookie": cookie} if cookie else {}
                status, resp_headers, body = rel_http_get(
                    port, f"/echo?token={token}&client={client_id}", headers=headers, timeout=30
                )
                if status != 200:
                    mismatches.append((client_id, i, status, body[:200]))
                    continue
                for name, value in resp_headers:
                    if name.lower() == "set-cookie":
                        jar = http.cookies.SimpleCookie()
                        jar.load(value)
                        if "session" in jar:
                            cookie = f"session={jar['session'].value}"
                data = json.loads(body)
                expected = {"g": token, "arg": token, "client": client_id, "n": i + 1, "path": "/echo"}
                if data != expected:
                    mismatches.append((client_id, i, data, expected))
                answered[index] += 1
        except BaseException as exc:
            errors.append((client_id, repr(exc)))

    try:
        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n_clients)]
        for th in threads:
            th.start()
        deadline = time.monotonic() + 150
        for th in threads:
            th.join(max(0.1, deadline - time.monotonic()))
        assert not any(th.is_alive() for th in threads), "clients did not finish in time"
        assert errors == []
        assert mismatches == []
        assert sum(answered) == n_clients * per_client >= 500
    finally:
        server.shutdown()
        server.server_close()
        server_thread.join(10)


# ================================================================================================
# Progress reports: report_progress, future.progress, futures.progress(key)
# ================================================================================================


def progress_report_three_steps():
    """Module-level, so that a process pool can run it: reports, then returns."""
    for step in range(1, 4):
        report_progress(step, 3, f"step {step}")
    return "reported"


def test_progress_is_none_until_reported_then_the_last_report(make_executor):
    executor = make_executor(EXECUTOR_MAX_WORKERS=1)
    reported, release = threading.Event(), threading.Event()

    def task():
        report_progress(1, 4, "first quarter")
        reported.set()
        assert release.wait(WAIT_SECONDS)
        report_progress(4, 4, "all done")
        return "finished"

    blocker_release = threading.Event()
    blocker = executor.submit(blocker_release.wait, WAIT_SECONDS)
    future = executor.submit(task)
    assert future.progress is None  # waiting for the worker: nothing reported yet
    blocker_release.set()
    assert blocker.result(timeout=WAIT_SECONDS)
    assert reported.wait(WAIT_SECONDS)
    assert future.progress == Progress(1, 4, "first quarter")
    assert future.progress.fraction == 0.25
    release.set()
    assert future.result(timeout=WAIT_SECONDS) == "finished"
    assert future.progress == Progress(4, 4, "all done")
    assert future.progress.fraction == 1.0


def test_progress_of_stored_futures_by_key(make_executor):
    executor = make_executor()
    reported, release = threading.Event(), threading.Event()

    def task():
        report_progress(30, None, "rows so far")
        reported.set()
        assert release.wait(WAIT_SECONDS)

    executor.submit_stored("import", task)
    assert reported.wait(WAIT_SECONDS)
    progress = executor.futures.progress("import")
    assert (progress.done, progress.total, progress.message) == (30, None, "rows so far")
    assert progress.fraction is None  # the total is unknown
    assert executor.futures.progress("no-such-key") is None
    release.set()
    assert executor.futures.result("import", timeout=WAIT_SECONDS) is None


def test_progress_in_sync_mode_and_from_a_coroutine(make_executor):
    executor = make_executor(EXECUTOR_TYPE="sync")
    future = executor.submit(progress_report_three_steps)
    assert future.done() and future.result() == "reported"
    assert future.progress == Progress(3, 3, "step 3")

    async def coroutine_task():
        report_progress(2, 5, "awaiting")
        return "awaited"

    threaded = make_executor(name="coro")
    future = threaded.submit(coroutine_task)
    assert future.result(timeout=WAIT_SECONDS) == "awaited"
    assert future.progress == Progress(2, 5, "awaiting")


def test_progress_of_concurrent_tasks_stays_their_own(make_executor):
    task_count, steps = 16, 200
    executor = make_executor(EXECUTOR_MAX_WORKERS=task_count)
    barrier = threading.Barrier(task_count)

    def task(index):
        barrier.wait(WAIT_SECONDS)  # all of them report at the same time
        total = steps + index
        for done in range(1, total + 1):
            report_progress(done, total, f"task {index}")
        return index

    futures = [executor.submit(task, index) for index in range(task_count)]
    for index, future in enumerate(futures):
        assert future.result(timeout=WAIT_SECONDS) == index
        assert future.progress == Progress(steps + index, steps + index, f"task {index}")


def test_report_progress_outside_a_task_raises_runtime_error(app):
    with pytest.raises(RuntimeError, match="outside a task"):
        report_progress(1, 2)
    with app.app_context(), pytest.raises(RuntimeError, match="outside a task"):
        report_progress(1, 2)
    errors = []

    def plain_thread():
        try:
            report_progress(1)
        except RuntimeError as error:
            errors.append(error)

    thread = threading.Thread(target=plain_thread)
    thread.start()
    thread.join(WAIT_SECONDS)
    assert len(errors) == 1


@pytest.mark.parametrize(
    ("done", "total", "complaint"),
    [(-1, None, "done must be 0 or more"), (1, 0, "total must be more than 0"), (5, 4, "cannot be more")],
)
def test_report_progress_rejects_bad_values(make_executor, done, total, complaint):
    executor = make_executor(EXECUTOR_TYPE="sync", EXECUTOR_LOG_EXCEPTIONS=False)
    future = executor.submit(report_progress, done, total)
    assert isinstance(future.exception(), ValueError)
    assert complaint in str(future.exception())
    assert future.progress is None  # a rejected report leaves nothing behind


def test_report_progress_in_a_process_pool_is_a_no_op(make_executor):
    executor = make_executor(EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=1)
    future = executor.submit(progress_report_three_steps)
    assert future.result(timeout=WAIT_SECONDS) == "reported"  # no error in the worker
    assert future.progress is None  # progress does not travel between processes


def test_progress_record_computes_fraction_and_is_immutable():
    progress = Progress(3, 12, "resizing")
    assert progress.fraction == 0.25
    assert Progress(3).fraction is None
    assert Progress(0, 0).fraction is None
    with pytest.raises(AttributeError):
        progress.done = 4  # type: ignore[misc]


# ================================================================================================
# The README is the PyPI page: it must be valid reStructuredText
# ================================================================================================


def test_readme_is_valid_restructuredtext():
    import docutils.core as docutils_core  # a test dependency only

    readme = (Path(__file__).resolve().parent / "README.rst").read_text(encoding="utf-8")
    # halt_level 2: any warning (a broken table, an unclosed literal) raises.
    docutils_core.publish_doctree(readme, settings_overrides={"halt_level": 2, "report_level": 2})


# ================================================================================================
# Code written for Flask-Executor 1.0, a real dependent (Flask-Shell2HTTP), and Flask 3.2
# ================================================================================================
# Tests: code written for Flask-Executor 1.0, a real dependent, and Flask 3.2.
#
# - 1.0's import paths (``flask_executor.executor``, ``.futures``, ``.helpers``), from the
#   installed wheel and from the module copied alone into a project;
# - 1.0's keyword call forms (``submit_stored(future_key=..., fn=...)``), while the typed
#   signatures stay strict for mypy;
# - ``Executor(current_app)`` built in a view or an app context;
# - ``futures._state(key)`` and ``futures.running(key)`` agreeing for process pools;
# - Flask-Shell2HTTP 1.9.1 from PyPI, driven through its documented flow, with the stored futures
#   in memory and in a shared SQLite store (EXECUTOR_FUTURES_STORE);
# - the request body shared by a view and its tasks, read at once through a slow stream;
# - uploaded files, url_value_preprocessor and teardown functions with Flask 3.2's merged contexts.
#
# Conventions (to be merged into test_flask_executor.py): module-level helpers and fixtures
# start with ``compat_``, tests with ``test_compat_``. Real parts only: real pools, real apps
# driven through their WSGI interface, real virtual environments and packages; every wait is
# bounded.

# Generous bound used whenever a test waits for something to happen.
COMPAT_WAIT = 30
# Python 3.12+ warns when a multi-threaded process forks; process pools fork on purpose.
COMPAT_FORK_WARNING = "ignore:.*use of fork\\(\\) may lead to deadlocks:DeprecationWarning"


def compat_find_repo():
    """The checkout: the first folder up from this file that holds setup.py and the module."""
    for folder in Path(__file__).resolve().parents:
        if (folder / "setup.py").exists() and (folder / "flask_executor.py").exists():
            return folder
    raise RuntimeError("no checkout of Flask-Executor above " + __file__)


COMPAT_REPO = compat_find_repo()
# The module under test (the one imported above): copied into projects and built into wheels.
COMPAT_MODULE = Path(flask_executor.__file__).resolve()
# Wheels that are not on the package index, such as Flask's development builds.
COMPAT_SHARED_WHEELS = COMPAT_REPO.parent / "shared" / "wheels"
COMPAT_SHELL2HTTP = "flask-shell2http==1.9.1"


# ---------------------------------------------------------------------------------------------
# Helpers and fixtures


def compat_clean_env():
    """This environment without the variables that would point a subprocess at this checkout."""
    return {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "MYPYPATH")}


def compat_run(*command, cwd, timeout=600, check=True):
    done = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=compat_clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    return done


def compat_flask_requirements():
    """pip arguments that install the Flask and Werkzeug this suite runs on, so that a fresh
    environment tests the same versions (a development build of Flask comes from its wheel)."""
    flask = importlib.metadata.distribution("flask")
    werkzeug = f"werkzeug=={importlib.metadata.version('werkzeug')}"
    if "dev" not in flask.version:
        return [f"flask=={flask.version}", werkzeug]
    # Installed from a wheel file (pip records where), or else one in shared/wheels.
    url = urllib.parse.urlparse(json.loads(flask.read_text("direct_url.json") or "{}").get("url", ""))
    wheels = [Path(urllib.request.url2pathname(url.path))] if url.scheme == "file" else []
    wheels = [wheel for wheel in wheels if wheel.is_file()]
    wheels += sorted(COMPAT_SHARED_WHEELS.glob(f"flask-{flask.version}-*.whl"))
    assert wheels, f"no wheel of Flask {flask.version} (a development build) in {COMPAT_SHARED_WHEELS}"
    return [werkzeug, str(wheels[0])]


def compat_make_venv(folder):
    compat_run(sys.executable, "-m", "venv", folder, cwd=folder.parent)
    return folder / "bin" / "python"


@pytest.fixture(scope="session")
def compat_wheel(tmp_path_factory):
    """A wheel of the module under test, built from a copy of the checkout (so that the build
    leaves nothing in it) whose flask_executor.py is the module imported by this suite."""
    base = tmp_path_factory.mktemp("compat_wheel")
    source = base / "source"
    shutil.copytree(
        COMPAT_REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".nox", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "wip"
        ),
    )
    shutil.copy(COMPAT_MODULE, source / "flask_executor.py")
    compat_run(sys.executable, "-m", "pip", "wheel", "--no-deps", source, "-w", base / "wheels", cwd=base)
    (wheel,) = (base / "wheels").glob("flask_executor-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert "flask_executor.py" in archive.namelist()
    return wheel


@pytest.fixture
def compat_app():
    app = Flask(__name__)
    app.config.update(SECRET_KEY="compat-test-secret", TESTING=True)
    return app


@pytest.fixture
def compat_make_executor(compat_app):
    """Factory: compat_make_executor(**config) -> Executor bound to compat_app, shut down after."""
    created = []

    def build(**config):
        compat_app.config.update(config)
        executor = Executor(compat_app)
        created.append(executor)
        return executor

    yield build
    for executor in created:
        executor.shutdown(wait=True, cancel_futures=True)


def compat_add(x, y):
    return x + y


def compat_apply(value, fn):
    """A task whose own keyword argument is named ``fn``."""
    return fn(value)


def compat_run_command(cmd, timeout, key):
    """Shaped like Flask-Shell2HTTP's RunnerParser.run_command, which it submits by keyword."""
    return {"key": key, "report": " ".join(cmd), "timeout": timeout, "returncode": 0}


# ---------------------------------------------------------------------------------------------
# 1. Flask-Executor 1.0's import paths

# Run in a fresh interpreter, where nothing has imported flask_executor yet. It prints the
# file it imported flask_executor from, and fails (exit 1) on the first broken promise.
COMPAT_IMPORTS_SCRIPT = """\
import collections
import concurrent.futures
import importlib
import sys
import threading

import flask_executor.futures

# The plain statement binds the top-level name, and the submodule as its attribute.
assert flask_executor.futures is sys.modules["flask_executor.futures"]

from flask_executor.executor import (
    Executor,
    ExecutorJob,
    FutureCollection,
    FutureProxy,
    InstanceProxy,
    copy_current_request_context,
    current_app,
    g,
    get_current_app_context,
    propagate_exceptions_callback,
    push_app_context,
    str2bool,
)
from flask_executor.futures import (
    Future,
    FutureCollection as FuturesFutureCollection,
    FutureProxy as FuturesFutureProxy,
    InstanceProxy as FuturesInstanceProxy,
    OrderedDict,
)
from flask_executor.helpers import PROXIED_OBJECT, InstanceProxy as HelpersInstanceProxy
from flask_executor.helpers import str2bool as helpers_str2bool

import flask
import flask_executor

for name in ("executor", "futures", "helpers"):
    module = importlib.import_module("flask_executor." + name)
    assert module is getattr(flask_executor, name), name

assert Executor is flask_executor.Executor
assert ExecutorJob is flask_executor.ExecutorJob
assert FutureCollection is FuturesFutureCollection is flask_executor.FutureCollection
assert FutureProxy is FuturesFutureProxy is flask_executor.TaskFuture
assert InstanceProxy is FuturesInstanceProxy is HelpersInstanceProxy
assert str2bool is helpers_str2bool
assert propagate_exceptions_callback is flask_executor.propagate_exceptions_callback
assert copy_current_request_context is flask.copy_current_request_context
assert current_app is flask.current_app
assert g is flask.g
assert Future is concurrent.futures.Future
assert OrderedDict is collections.OrderedDict
assert PROXIED_OBJECT == "__proxied_object"

# str2bool keeps 1.0's meaning: yes/true/t/1 in any case, anything else is false.
for word in ("yes", "YES", "true", "True", "t", "T", "1", 1, True):
    assert str2bool(word) is True, word
for word in ("no", "false", "f", "0", "on", "off", "", "maybe", 0, False):
    assert str2bool(word) is False, word

# InstanceProxy reads the attributes of the object it wraps, which is its _self.
wrapped_future = concurrent.futures.Future()
assert InstanceProxy(wrapped_future).done() is False
assert InstanceProxy(wrapped_future)._self is wrapped_future

app = flask.Flask("compat_imports")
executor = Executor(app)
future = executor.submit(pow, 2, 10)
assert isinstance(future, FutureProxy) and isinstance(future, Future)
assert future.result(timeout=30) == 1024


def report(number):
    seen = (current_app.name, g.get("user"), number, get_current_app_context() is not None)
    g.user = "changed-in-the-wrapped-call"
    return seen


# push_app_context: the function runs in an app context of the current app, with a copy of
# g as it was when it was wrapped.
assert get_current_app_context() is None
with app.app_context():
    assert get_current_app_context().app is app
    g.user = "alice"
    wrapped = push_app_context(report)
    g.user = "changed-after-wrapping"
outcomes = []
thread = threading.Thread(target=lambda: outcomes.append(wrapped(7)))
thread.start()
thread.join(30)
assert outcomes == [("compat_imports", "alice", 7, True)], outcomes
assert get_current_app_context() is None

executor.shutdown()
print("IMPORTED FROM", flask_executor.__file__)
"""


@pytest.mark.timeout(900)
def test_compat_1_0_import_paths_from_the_installed_wheel(compat_wheel, tmp_path):
    python = compat_make_venv(tmp_path / "venv")
    compat_run(python, "-m", "pip", "install", compat_wheel, *compat_flask_requirements(), cwd=tmp_path)
    project = tmp_path / "project"
    project.mkdir()
    (project / "check_imports.py").write_text(COMPAT_IMPORTS_SCRIPT)

    done = compat_run(python, "check_imports.py", cwd=project, timeout=120)

    imported_from = Path(done.stdout.split("IMPORTED FROM", 1)[1].strip())
    assert imported_from.parent.name == "site-packages"
    assert imported_from.is_relative_to(tmp_path / "venv")


@pytest.mark.timeout(120)
def test_compat_1_0_import_paths_from_the_module_copied_into_a_project(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(COMPAT_MODULE, project / "flask_executor.py")
    (project / "check_imports.py").write_text(COMPAT_IMPORTS_SCRIPT)

    # The script's folder comes first on sys.path, before the checkout's editable install.
    done = compat_run(sys.executable, "check_imports.py", cwd=project, timeout=120)

    assert Path(done.stdout.split("IMPORTED FROM", 1)[1].strip()) == project / "flask_executor.py"


@pytest.mark.timeout(120)
def test_compat_1_0_modules_are_bound_in_this_process():
    import flask_executor.futures
    import flask_executor.helpers

    assert sys.modules["flask_executor.futures"] is flask_executor.futures
    assert flask_executor.futures.FutureProxy is TaskFuture
    assert flask_executor.futures.Future is concurrent.futures.Future
    assert flask_executor.helpers.str2bool("t") is True
    assert flask_executor.helpers.str2bool("on") is False


# ---------------------------------------------------------------------------------------------
# 2. Flask-Executor 1.0's keyword call forms, and strict types


@pytest.mark.timeout(120)
def test_compat_submit_stored_by_keyword_as_flask_shell2http_calls_it(compat_make_executor):
    executor = compat_make_executor()

    future = executor.submit_stored(
        future_key="job-1", fn=compat_run_command, cmd=["echo", "hi"], timeout=5, key="job-1"
    )

    assert future.result(timeout=COMPAT_WAIT) == {
        "key": "job-1",
        "report": "echo hi",
        "timeout": 5,
        "returncode": 0,
    }
    assert executor.futures._futures.get("job-1") is future
    assert executor.futures.pop("job-1") is future


@pytest.mark.timeout(120)
def test_compat_submit_and_job_submit_stored_take_their_leading_arguments_by_keyword(compat_make_executor):
    executor = compat_make_executor()
    add_job = executor.job(compat_add)

    assert executor.submit(fn=compat_add, x=1, y=2).result(timeout=COMPAT_WAIT) == 3
    assert executor.submit_stored("pos-key", fn=compat_add, x=2, y=2).result(timeout=COMPAT_WAIT) == 4
    stored = add_job.submit_stored(future_key="job-key", x=3, y=4)
    assert stored.result(timeout=COMPAT_WAIT) == 7
    assert executor.futures.pop("job-key") is stored
    assert "pos-key" in executor.futures


@pytest.mark.timeout(120)
def test_compat_missing_fn_or_future_key_gives_a_type_error_naming_it(compat_make_executor):
    executor = compat_make_executor()
    add_job = executor.job(compat_add)

    with pytest.raises(TypeError, match="'fn'"):
        executor.submit()
    with pytest.raises(TypeError, match="'fn'"):
        executor.submit(x=1, y=2)
    with pytest.raises(TypeError, match="'fn'"):
        executor.submit_stored(future_key="never-stored", x=1, y=2)
    with pytest.raises(TypeError, match="'future_key'"):
        executor.submit_stored(fn=compat_add, x=1, y=2)
    with pytest.raises(TypeError, match="'future_key'"):
        add_job.submit_stored(x=1, y=2)
    assert len(executor.futures) == 0


@pytest.mark.timeout(120)
def test_compat_task_keyword_named_fn_reaches_the_task_when_fn_is_positional(compat_make_executor):
    executor = compat_make_executor()
    apply_job = executor.job(compat_apply)

    futures = [
        executor.submit(compat_apply, "abc", fn=str.upper),
        executor.submit_stored("stored", compat_apply, "def", fn=str.upper),
        apply_job.submit("ghi", fn=str.upper),
        apply_job.submit_stored("job-stored", "jkl", fn=str.upper),
        executor.submit(compat_apply, value="mno", fn=str.upper),
    ]

    assert [f.result(timeout=COMPAT_WAIT) for f in futures] == ["ABC", "DEF", "GHI", "JKL", "MNO"]
    assert list(executor.map(compat_apply, ["x", "y"], [str.upper, str.title])) == ["X", "Y"]


COMPAT_TYPED_USER_CODE = """\
from collections.abc import Callable

from flask import Flask

from flask_executor import Executor, TaskFuture

app = Flask(__name__)
executor = Executor(app)


def add(x: int, y: int) -> int:
    return x + y


def apply(value: str, fn: Callable[[str], str]) -> str:
    return fn(value)


@executor.job
def double(x: int) -> int:
    return 2 * x


positional: TaskFuture[int] = executor.submit(add, 1, 2)
mixed: TaskFuture[int] = executor.submit(add, 1, y=2)
stored: TaskFuture[int] = executor.submit_stored("sum", add, 1, y=2)
own_fn: TaskFuture[str] = executor.submit(apply, "abc", fn=str.upper)
own_fn_stored: TaskFuture[str] = executor.submit_stored("upper", apply, "abc", fn=str.upper)
job_stored: TaskFuture[int] = double.submit_stored("double", 2)
# A job has no fn argument, so 1.0's keyword form is still checked against the job.
job_by_keyword: TaskFuture[int] = double.submit_stored(future_key="double-kw", x=2)
"""

# Each call below runs (1.0's call forms), and mypy must still reject it: new code is checked
# against the function it submits, which it cannot be when that function is a keyword.
COMPAT_TYPED_USER_MISTAKES = """\
from flask import Flask

from flask_executor import Executor

app = Flask(__name__)
executor = Executor(app)


def add(x: int, y: int) -> int:
    return x + y


@executor.job
def double(x: int) -> int:
    return 2 * x


executor.submit(fn=add, x=1, y=2)  # error expected
executor.submit_stored(future_key="sum", fn=add, x=1, y=2)  # error expected
executor.submit_stored("sum", fn=add, x=1, y=2)  # error expected
executor.submit(add, 1, "two")  # error expected
double.submit_stored(future_key="double", x="two")  # error expected
"""


def compat_mypy_errors(folder, filename):
    """The lines of ``filename`` on which ``mypy --strict`` reports an error, with mypy's output."""
    done = compat_run(
        sys.executable,
        "-m",
        "mypy",
        "--strict",
        # flask_executor.py is checked by the project's own mypy session; here only the user's file.
        "--follow-imports=silent",
        "--no-incremental",
        "--cache-dir",
        folder / ".mypy_cache",
        "--show-error-codes",
        "--no-error-summary",
        "--no-color-output",
        filename,
        cwd=folder,
        check=False,
    )
    output = done.stdout + done.stderr
    lines = {int(match[1]) for match in re.finditer(rf"^{re.escape(filename)}:(\d+): error:", output, re.M)}
    return lines, output


@pytest.mark.timeout(600)
def test_compat_typed_signatures_reject_fn_by_keyword_and_accept_positional_calls(tmp_path):
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed here (the mypy session checks typing)")
    # A user folder holding the module as a vendored copy, so that mypy reads its types.
    shutil.copy(COMPAT_MODULE, tmp_path / "flask_executor.py")
    (tmp_path / "user_code.py").write_text(COMPAT_TYPED_USER_CODE)
    (tmp_path / "user_mistakes.py").write_text(COMPAT_TYPED_USER_MISTAKES)

    good_lines, good_output = compat_mypy_errors(tmp_path, "user_code.py")
    bad_lines, bad_output = compat_mypy_errors(tmp_path, "user_mistakes.py")

    assert good_lines == set(), good_output
    expected = {
        number
        for number, line in enumerate(COMPAT_TYPED_USER_MISTAKES.splitlines(), start=1)
        if line.endswith("# error expected")
    }
    assert bad_lines == expected, bad_output


# ---------------------------------------------------------------------------------------------
# 3. Executor(current_app), built in a view or in an app context


@pytest.mark.timeout(120)
def test_compat_executor_of_current_app_built_in_a_view_runs_tasks(compat_app):
    built = []
    ran = []
    all_ran = threading.Event()

    def move_items(items):
        ran.append((current_app._get_current_object() is compat_app, request.path, items))
        if len(ran) == 2:
            all_ran.set()

    @compat_app.post("/move/<int:count>")
    def move_view(count):
        # As mediasort's view does: a new executor for each request, fire and forget.
        executor = Executor(current_app)
        built.append(executor)
        executor.submit(move_items, list(range(count)))
        return jsonify(registered=current_app.extensions["executor"] is executor)

    try:
        client = compat_app.test_client()
        first = client.post("/move/2")
        second = client.post("/move/3")
        assert all_ran.wait(COMPAT_WAIT)
    finally:
        for executor in built:
            executor.shutdown(wait=True)

    assert first.status_code == second.status_code == 200
    assert first.get_json() == second.get_json() == {"registered": True}
    assert sorted(ran) == [(True, "/move/2", [0, 1]), (True, "/move/3", [0, 1, 2])]
    assert compat_app.extensions["executor"] is built[-1]


@pytest.mark.timeout(120)
def test_compat_executor_of_current_app_built_in_an_app_context_works_outside_it(compat_app):
    compat_app.config["MARKER"] = "built-in-app-context"
    with compat_app.app_context():
        executor = Executor(current_app)
        inside = executor.submit(lambda: current_app.config["MARKER"])
        assert inside.result(timeout=COMPAT_WAIT) == "built-in-app-context"
    try:
        # Bound to the app itself, not to the proxy, which points nowhere out here.
        outside = executor.submit(lambda: current_app._get_current_object())
        assert outside.result(timeout=COMPAT_WAIT) is compat_app
        assert compat_app.extensions["executor"] is executor
    finally:
        executor.shutdown(wait=True)


# ---------------------------------------------------------------------------------------------
# 4. futures._state(key) and futures.running(key) for a process pool


def compat_block_until_released(started_path, release_path, value):
    """Runs in a worker process: says it started, then waits (bounded) for the release file."""
    Path(started_path).write_text("started")
    deadline = time.monotonic() + COMPAT_WAIT
    while not os.path.exists(release_path):
        if time.monotonic() > deadline:
            raise TimeoutError("never released")
        time.sleep(0.01)
    return value


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings(COMPAT_FORK_WARNING)
def test_compat_state_and_running_agree_for_process_pool_tasks(compat_make_executor, tmp_path):
    executor = compat_make_executor(EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=1)
    release = tmp_path / "release"
    keys = [f"task-{index}" for index in range(5)]
    for index, key in enumerate(keys):
        executor.submit_stored(key, compat_block_until_released, tmp_path / key, release, index)
    futures = executor.futures
    try:
        assert wait_for_condition(lambda: (tmp_path / keys[0]).exists())

        # The first task is running in the only worker, as 1.0 said; the last one waits behind
        # the worker and the call queue, so it is pending and not running.
        assert futures._state(keys[0]) == "RUNNING"
        assert futures.running(keys[0]) is True
        assert futures._state(keys[-1]) == "PENDING"
        assert futures.running(keys[-1]) is False
        for key in keys:
            assert futures.running(key) == (futures._state(key) == "RUNNING"), key
        assert not (tmp_path / keys[-1]).exists()
    finally:
        release.write_text("go")

    assert [futures.result(key, timeout=COMPAT_WAIT) for key in keys] == [0, 1, 2, 3, 4]
    for key in keys:
        assert futures._state(key) == "FINISHED"
        assert futures.running(key) is False


# ---------------------------------------------------------------------------------------------
# 5. A real dependent: Flask-Shell2HTTP 1.9.1 from PyPI

COMPAT_SHELL2HTTP_APP = '''\
"""Flask-Shell2HTTP's documented flow, driven with the test client; prints what it saw.
The argument, if any, is a shared store for the stored futures (as gunicorn workers need)."""
import json
import sys
import time

from flask import Flask, current_app, has_app_context
from flask_executor import Executor
from flask_shell2http import Shell2HTTP

app = Flask("shell2http_app")
app.config["TESTING"] = True
if len(sys.argv) > 1:
    app.config.update(SECRET_KEY="shell2http-secret", EXECUTOR_FUTURES_STORE=sys.argv[1])
executor = Executor(app)
shell2http = Shell2HTTP(app, executor, base_url_prefix="/cmd/")
callbacks = []


def my_callback_fn(context, future):
    callbacks.append(
        {
            "context": context,
            "in_app_context": has_app_context(),
            "app": current_app.name if has_app_context() else None,
            "returncode": future.result()["returncode"],
        }
    )


shell2http.register_command(endpoint="echo", command_name="echo", callback_fn=my_callback_fn)
shell2http.register_command(endpoint="sleep", command_name="sleep", callback_fn=my_callback_fn)

client = app.test_client()
seen = {}


def record(step, response):
    seen[step] = {"status": response.status_code, "json": response.get_json(silent=True)}
    return seen[step]["json"]


echo = {"args": ["hello", "world"], "callback_context": {"job": "echo"}}
key = record("echo_post", client.post("/cmd/echo", json=echo))["key"]
record("echo_report", client.get("/cmd/echo", query_string={"key": key, "wait": "true"}))
record("echo_report_again", client.get("/cmd/echo", query_string={"key": key, "wait": "true"}))
record("echo_post_again", client.post("/cmd/echo", json=echo))
record("echo_report_third", client.get("/cmd/echo", query_string={"key": key, "wait": "true"}))

sleeper = {"args": ["5"], "callback_context": {"job": "sleep"}}
key = record("sleep_post", client.post("/cmd/sleep", json=sleeper))["key"]
record("sleep_report_nowait", client.get("/cmd/sleep", query_string={"key": key, "wait": "false"}))
record("sleep_post_duplicate", client.post("/cmd/sleep", json=sleeper))
record("sleep_report_wait", client.get("/cmd/sleep", query_string={"key": key, "wait": "true"}))

doomed = {"args": ["4"], "callback_context": {"job": "deleted"}}
key = record("doomed_post", client.post("/cmd/sleep", json=doomed))["key"]
deadline = time.monotonic() + 30  # DELETE it once it runs (a waiting one would be cancelled)
while not executor.futures.running(key) and time.monotonic() < deadline:
    time.sleep(0.01)
seen["doomed_running"] = executor.futures.running(key)
record("doomed_delete", client.delete("/cmd/sleep", query_string={"key": key}))
record("doomed_report", client.get("/cmd/sleep", query_string={"key": key, "wait": "true"}))

deadline = time.monotonic() + 30
while len(callbacks) < 4 and time.monotonic() < deadline:
    time.sleep(0.05)
seen["callbacks"] = sorted(callbacks, key=lambda c: c["context"]["job"])
print("SEEN " + json.dumps(seen))
'''

# What pip says when it cannot reach the index.
COMPAT_OFFLINE_SIGNS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "ProxyError",
    "No matching distribution found for flask-shell2http",
)


@pytest.fixture(scope="session")
def compat_shell2http_python(compat_wheel, tmp_path_factory):
    """A fresh environment with Flask, this module's wheel and Flask-Shell2HTTP from PyPI."""
    tmp_path = tmp_path_factory.mktemp("compat_shell2http")
    python = compat_make_venv(tmp_path / "venv")
    pip = (python, "-m", "pip", "install")
    compat_run(*pip, compat_wheel, *compat_flask_requirements(), "blinker", cwd=tmp_path)
    done = compat_run(*pip, "--no-deps", COMPAT_SHELL2HTTP, cwd=tmp_path, check=False)
    if done.returncode != 0:
        output = done.stdout + done.stderr
        if any(sign in output for sign in COMPAT_OFFLINE_SIGNS):
            reason = f"PyPI cannot be reached to install {COMPAT_SHELL2HTTP}: {output.strip()[-300:]}"
            print(reason)
            pytest.skip(reason)
        pytest.fail(f"installing {COMPAT_SHELL2HTTP} failed:\n{output}")
    return python


@pytest.mark.timeout(900)
@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_compat_flask_shell2http_documented_flow(compat_shell2http_python, tmp_path, store):
    (tmp_path / "shell2http_app.py").write_text(COMPAT_SHELL2HTTP_APP)
    app_command = ["shell2http_app.py", *([tmp_path / "futures.sqlite"] if store == "sqlite" else [])]

    done = compat_run(compat_shell2http_python, *app_command, cwd=tmp_path, timeout=120)

    seen = json.loads(done.stdout.split("SEEN ", 1)[1])
    posted = seen["echo_post"]
    assert posted["status"] == 202, seen
    key = posted["json"]["key"]
    assert posted["json"] == {
        "status": "running",
        "key": key,
        "result_url": f"http://localhost/cmd/echo?key={key}&wait=false",
    }
    report = seen["echo_report"]
    assert report["status"] == 200, seen
    assert report["json"]["key"] == key
    assert report["json"]["report"] == "hello world\n"
    assert report["json"]["returncode"] == 0
    assert report["json"]["error"] == ""
    # GET popped the future: the key is gone, and usable again.
    assert seen["echo_report_again"]["status"] == 404, seen
    assert seen["echo_post_again"]["status"] == 202, seen
    assert seen["echo_post_again"]["json"]["key"] == key
    assert seen["echo_report_third"]["status"] == 200, seen
    assert seen["echo_report_third"]["json"]["report"] == "hello world\n"

    sleep_key = seen["sleep_post"]["json"]["key"]
    assert seen["sleep_post"]["status"] == 202, seen
    assert seen["sleep_report_nowait"] == {
        "status": 200,
        "json": {
            "status": "running",
            "key": sleep_key,
            "result_url": f"http://localhost/cmd/sleep?key={sleep_key}&wait=false",
        },
    }
    duplicate = seen["sleep_post_duplicate"]
    assert duplicate["status"] == 400, seen
    assert duplicate["json"]["key"] == sleep_key
    assert duplicate["json"]["result_url"] == f"http://localhost/cmd/sleep?key={sleep_key}&wait=false"
    assert sleep_key in duplicate["json"]["error"]
    assert seen["sleep_report_wait"]["status"] == 200, seen
    assert seen["sleep_report_wait"]["json"]["returncode"] == 0

    assert seen["doomed_post"]["status"] == 202, seen
    assert seen["doomed_running"] is True
    assert seen["doomed_delete"]["status"] == 204, seen
    assert seen["doomed_report"]["status"] == 404, seen

    # The user's callback ran for every job (the deleted one too: it was already running),
    # with its callback_context, inside the app context.
    assert seen["callbacks"] == [
        {"context": {"job": job}, "in_app_context": True, "app": "shell2http_app", "returncode": 0}
        for job in ["deleted", "echo", "echo", "sleep"]
    ]


# ---------------------------------------------------------------------------------------------
# 6. The request body, read by a view and its tasks at once


class CompatSlowInput:
    """A WSGI input stream that hands out its body a small chunk at a time, pausing before
    each, like a slow client's socket: parsing the body takes long enough that readers in
    several threads would overlap, if nothing kept them apart."""

    def __init__(self, data, chunk=512, pause=0.001):
        self._data = io.BytesIO(data)
        self._chunk = chunk
        self._pause = pause

    def read(self, size=-1):
        time.sleep(self._pause)
        if size is None or size < 0:
            return self._data.read()
        return self._data.read(min(size, self._chunk))

    def readline(self, size=-1):
        time.sleep(self._pause)
        return self._data.readline(size)


def compat_slow_environ(path, *, chunk=512, trailing=b"", **builder_options):
    """A POST to path as a client would send it, its body served by a CompatSlowInput;
    ``trailing`` is what follows the body on the connection (the next request's body)."""
    builder = EnvironBuilder(path=path, method="POST", **builder_options)
    try:
        environ = builder.get_environ()
    finally:
        builder.close()
    body = environ["wsgi.input"].read()
    environ["wsgi.input"] = CompatSlowInput(body + trailing, chunk)
    return environ, body


def compat_call_wsgi(app, environ):
    """Runs one request through the app's WSGI interface; returns (status code, body)."""
    app_iter, status, _headers = run_wsgi_app(app, environ, buffered=True)
    return int(status.split()[0]), b"".join(app_iter)


def compat_sha256(data):
    return hashlib.sha256(data).hexdigest()


def compat_is_in_memory(stream):
    """Whether an uploaded file's stream holds its content in memory rather than a temporary
    file. (Werkzeug spools an upload to a SpooledTemporaryFile, which moves to disk past 500 KB.)"""
    if isinstance(stream, io.BytesIO):
        return True
    if isinstance(stream, tempfile.SpooledTemporaryFile):
        return not stream._rolled
    return False


def compat_read_body(kind, part=None):
    """What a reader of the request body sees: the view and its tasks call this."""
    if kind == "form":
        return request.form.to_dict()
    if kind == "files":
        upload = request.files[part]
        return [upload.filename, compat_sha256(upload.read()), request.form["title"]]
    if kind == "json":
        return request.get_json()
    if kind == "data":
        return compat_sha256(request.get_data())
    raise AssertionError(kind)


def compat_outcome(future):
    error = future.exception(timeout=COMPAT_WAIT)
    return {"error": repr(error)} if error is not None else {"value": future.result()}


COMPAT_READERS = 6
COMPAT_FORM = {f"field{index}": f"{index}-" + "x" * 4000 for index in range(8)}
COMPAT_UPLOADS = {
    f"doc{index}": bytes([65 + index]) * 6000 + os.urandom(2000) for index in range(COMPAT_READERS)
}
COMPAT_UPLOADS["doc_view"] = os.urandom(8000)


def compat_body_request(kind):
    """(builder options, what every reader must see: the view, and task number i)."""
    if kind == "form":
        return {"data": COMPAT_FORM}, lambda index: COMPAT_FORM
    if kind == "files":
        data = {name: (io.BytesIO(content), f"{name}.bin") for name, content in COMPAT_UPLOADS.items()}
        data["title"] = "uploads"

        def expected(index):
            name = "doc_view" if index is None else f"doc{index}"
            return [f"{name}.bin", compat_sha256(COMPAT_UPLOADS[name]), "uploads"]

        return {"data": data}, expected
    document = {"items": list(range(3000)), "title": "é" * 2000}
    if kind == "json":
        return {"json": document}, lambda index: document
    raw = json.dumps(document).encode() * 3
    return {"data": raw, "content_type": "application/octet-stream"}, lambda index: compat_sha256(raw)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["form", "files", "json", "data"])
def test_compat_view_and_its_tasks_read_a_slow_body_at_once_and_all_see_it_whole(
    compat_make_executor, compat_app, kind
):
    executor = compat_make_executor(EXECUTOR_MAX_WORKERS=COMPAT_READERS + 2)

    @compat_app.post("/body")
    def body_view():
        # The tasks start reading at once, and the view reads too, before any of them is done.
        futures = [executor.submit(compat_read_body, kind, f"doc{index}") for index in range(COMPAT_READERS)]
        view_saw = compat_read_body(kind, "doc_view")
        return jsonify(view=view_saw, tasks=[compat_outcome(f) for f in futures])

    for _attempt in range(3):  # a few requests, so that an unguarded race shows
        options, expected = compat_body_request(kind)
        environ, _body = compat_slow_environ("/body", **options)
        status, body = compat_call_wsgi(compat_app, environ)
        assert status == 200, body[-2000:]
        seen = json.loads(body)
        assert seen["view"] == expected(None)
        assert seen["tasks"] == [{"value": expected(index)} for index in range(COMPAT_READERS)]


def compat_spooled_upload(name):
    upload = request.files[name]
    in_memory = compat_is_in_memory(upload.stream)
    digest = compat_sha256(upload.read())
    upload.seek(0)  # leave it as found, for the view
    return [in_memory, digest]


@pytest.mark.timeout(120)
def test_compat_large_upload_is_spooled_to_disk_for_the_view_and_its_tasks(compat_make_executor, compat_app):
    executor = compat_make_executor(EXECUTOR_MAX_WORKERS=4)
    big = os.urandom(3 * 1024 * 1024)

    @compat_app.post("/upload")
    def upload_view():
        title = executor.submit(lambda: request.form["title"])
        spooled = executor.submit(compat_spooled_upload, "big")
        view_title = request.form["title"]  # while the tasks read the same body
        task_saw = spooled.result(timeout=COMPAT_WAIT)
        upload = request.files["big"]
        return jsonify(
            titles=[view_title, title.result(timeout=COMPAT_WAIT)],
            task=task_saw,
            view=[compat_is_in_memory(upload.stream), compat_sha256(upload.read())],
        )

    environ, _body = compat_slow_environ(
        "/upload", chunk=64 * 1024, data={"title": "big one", "big": (io.BytesIO(big), "big.bin")}
    )
    status, body = compat_call_wsgi(compat_app, environ)

    assert status == 200, body[-2000:]
    seen = json.loads(body)
    assert seen["titles"] == ["big one", "big one"]
    # Neither the task nor the view got the upload loaded into memory.
    assert seen["task"] == [False, compat_sha256(big)]
    assert seen["view"] == [False, compat_sha256(big)]


# Each case: builder options, what comes next on the connection (another request's body, of
# the same length), and what a reader would see of this request.
COMPAT_LATE_READS = {
    "form": ({"data": {"title": "mine-0000"}}, b"title=them-1111", {"title": "mine-0000"}),
    "files": ({"data": {"title": "mine-0000"}}, b"title=them-1111", None),
    "json": ({"json": {"title": "mine-0000"}}, b'{"title": "them-1111"}', {"title": "mine-0000"}),
    "data": (
        {"data": b"mine-0000", "content_type": "application/octet-stream"},
        b"them-1111",
        compat_sha256(b"mine-0000"),
    ),
}


def compat_read_late(kind):
    if kind == "files":
        return request.files.to_dict()
    return compat_read_body(kind)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", sorted(COMPAT_LATE_READS))
def test_compat_task_reading_an_unread_body_after_the_view_returned_gets_a_runtime_error(
    compat_make_executor, compat_app, kind
):
    executor = compat_make_executor()
    release = threading.Event()
    submitted = []

    def read_later():
        assert release.wait(COMPAT_WAIT)
        return compat_read_late(kind)

    @compat_app.post("/later")
    def later_view():
        submitted.append(executor.submit(read_later))
        return "accepted"  # without reading the body

    options, next_body, _mine = COMPAT_LATE_READS[kind]
    environ, body = compat_slow_environ("/later", trailing=next_body, **options)
    status, _response = compat_call_wsgi(compat_app, environ)
    assert status == 200
    # As a keep-alive server does once the response is sent: it discards the unread body, and
    # the connection's stream moves on to the next request.
    assert environ["wsgi.input"].read(len(body)) == body
    release.set()

    (future,) = submitted
    error = future.exception(timeout=COMPAT_WAIT)
    assert isinstance(error, RuntimeError), compat_outcome(future)
    assert "not read before the view returned" in str(error)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["form", "json", "data"])
def test_compat_task_reading_the_body_after_the_view_returned_sees_what_the_view_read(
    compat_make_executor, compat_app, kind
):
    executor = compat_make_executor()
    release = threading.Event()
    submitted = []

    def read_later():
        assert release.wait(COMPAT_WAIT)
        return compat_read_late(kind)

    @compat_app.post("/later")
    def later_view():
        submitted.append(executor.submit(read_later))
        return jsonify(compat_read_body(kind))

    options, next_body, mine = COMPAT_LATE_READS[kind]
    environ, body = compat_slow_environ("/later", trailing=next_body, **options)
    status, response = compat_call_wsgi(compat_app, environ)
    assert status == 200
    assert json.loads(response) == mine
    release.set()

    (future,) = submitted
    assert future.result(timeout=COMPAT_WAIT) == mine


# ---------------------------------------------------------------------------------------------
# 7. Uploaded files stay open for the view (Flask 2.2 to 3.2)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("size", [1000, 2 * 1024 * 1024], ids=["in-memory", "spooled"])
def test_compat_task_saving_an_upload_leaves_it_open_for_the_view(
    compat_make_executor, compat_app, tmp_path, size
):
    executor = compat_make_executor()
    content = os.urandom(size)
    saved = tmp_path / "saved.bin"
    task_context_torn_down = threading.Event()

    @compat_app.teardown_request
    def note_task_teardown(exc):
        # While the view below waits, only the task's context can be torn down.
        task_context_torn_down.set()

    @compat_app.post("/upload")
    def upload_view():
        executor.submit(lambda: request.files["document"].save(saved)).result(timeout=COMPAT_WAIT)
        assert task_context_torn_down.wait(COMPAT_WAIT)
        upload = request.files["document"]
        closed = upload.stream.closed
        upload.seek(0)
        return jsonify(closed=closed, digest=compat_sha256(upload.read()))

    response = compat_app.test_client().post(
        "/upload", data={"document": (io.BytesIO(content), "document.bin")}
    )

    assert response.status_code == 200, response.get_data(as_text=True)[-2000:]
    assert response.get_json() == {"closed": False, "digest": compat_sha256(content)}
    assert saved.read_bytes() == content


# ---------------------------------------------------------------------------------------------
# 8. Routing and teardown in a task's context (Flask 3.2 merges the request context into the
# app context; these hold on every Flask version)


@pytest.mark.timeout(120)
def test_compat_task_context_does_not_rematch_the_url_under_the_view(compat_make_executor, compat_app):
    executor = compat_make_executor(EXECUTOR_MAX_WORKERS=4)

    @compat_app.url_value_preprocessor
    def pull_lang(endpoint, values):
        g.lang = values.pop("lang", None) if values else None

    def read_routing():
        return [dict(request.view_args), request.url_rule.rule, request.endpoint, g.lang]

    @compat_app.get("/<lang>/items/<int:item_id>")
    def item_view(item_id):
        view_args = request.view_args
        before = dict(view_args)
        futures = [executor.submit(read_routing) for _ in range(8)]
        while not all(f.done() for f in futures):
            # The view keeps using its request while the tasks run.
            assert request.view_args is view_args
            assert request.view_args == before
            time.sleep(0.001)
        return jsonify(
            before=before,
            after=request.view_args,
            same_object=request.view_args is view_args,
            tasks=[f.result(timeout=COMPAT_WAIT) for f in futures],
            lang=g.lang,
        )

    response = compat_app.test_client().get("/fr/items/7")

    assert response.status_code == 200, response.get_data(as_text=True)[-2000:]
    seen = response.get_json()
    assert seen["before"] == seen["after"] == {"item_id": 7}
    assert seen["same_object"] is True
    assert seen["lang"] == "fr"
    assert seen["tasks"] == [[{"item_id": 7}, "/<lang>/items/<int:item_id>", "item_view", "fr"]] * 8


@pytest.mark.timeout(120)
def test_compat_teardown_functions_run_after_each_task_of_a_request(compat_make_executor, compat_app):
    executor = compat_make_executor(EXECUTOR_MAX_WORKERS=3)
    task_count = 9
    teardowns = collections.Counter()
    lock = threading.Lock()

    @compat_app.teardown_request
    def count_request_teardown(exc):
        with lock:
            teardowns["request", threading.get_ident()] += 1

    @compat_app.teardown_appcontext
    def count_appcontext_teardown(exc):
        with lock:
            teardowns["appcontext", threading.get_ident()] += 1

    def task_thread():
        return threading.get_ident()

    @compat_app.get("/fan-out")
    def fan_out_view():
        futures = [executor.submit(task_thread) for _ in range(task_count)]
        threads = [f.result(timeout=COMPAT_WAIT) for f in futures]

        def counted(kind):
            with lock:
                return sum(n for (k, thread), n in teardowns.items() if k == kind and thread in threads)

        assert wait_for_condition(lambda: counted("request") == counted("appcontext") == task_count)
        time.sleep(0.05)
        view_thread = threading.get_ident()
        with lock:
            view_teardowns = sum(n for (_kind, thread), n in teardowns.items() if thread == view_thread)
        return jsonify(request=counted("request"), appcontext=counted("appcontext"), view=view_teardowns)

    response = compat_app.test_client().get("/fan-out")

    assert response.status_code == 200, response.get_data(as_text=True)[-2000:]
    # Once per task, in the task's thread; none yet for the view, whose request is still live.
    assert response.get_json() == {"request": task_count, "appcontext": task_count, "view": 0}


# ================================================================================================
# The shared store on Redis, across hosts, and with tasks on Dask
# ================================================================================================
# Tests: EXECUTOR_FUTURES_STORE = "redis://host:port/db" (and rediss://), the shared store
# across machines, with the contract of the SQLite store.
#
# - two gunicorn instances on two ports (standing for two hosts), one app module, one Redis:
#   keys started on A are read, cancelled while waiting and popped on B; B refuses a key
#   running on A; progress from A reaches B; a task of a killed worker of A is TaskLost on B;
# - no way in through Redis: forged outcomes, progress and whole entries written straight
#   into Redis (or a signed outcome moved to another key) are refused, never unpickled, and
#   logged at ERROR on app.logger;
# - a password in the URL, rediss:// with a certificate made here, and a wrong password that
#   fails at init_app without printing it;
# - without redis-py installed (a fresh virtual environment), init_app says ``pip install redis``;
# - the store says a task is done as soon as its future is, for every reader;
# - max length and TTL store-wide, the same as the SQLite store's (finished first, oldest
#   first; the TTL removes finished entries only); these run on the SQLite store too;
# - a Redis outage while tasks run leaves the pool running tasks;
# - tasks run on a Dask cluster, with their state in Redis, seen from two app servers.
#
# Conventions (to be merged into test_flask_executor.py): module-level helpers and fixtures
# start with ``redis_`` (classes with ``Redis``, constants with ``REDIS_``), tests with
# ``test_redis_``. Real parts only: real redis-server processes this module starts on free
# loopback ports without persistence and stops by pid, real gunicorn, a real Dask cluster, a
# real virtual environment. Network traffic goes to 127.0.0.1 only; every wait is bounded.
# When /usr/bin/redis-server is absent (apt-get install redis-server), the tests skip and say so.

# Generous bound used whenever a test waits for something to happen.
REDIS_WAIT = 30
REDIS_SECRET_KEY = "redis-store-test-secret"
REDIS_MODULE_DIR = os.path.dirname(os.path.abspath(flask_executor.__file__))
# Where the module keeps an executor's entries (see the comment above its Lua scripts):
# PREFIX:keys maps an encoded key ("s:" + a string key) to an entry id, PREFIX:e:ID holds
# an entry's fields. A forger who can write to Redis knows this much, so the tests do.
REDIS_PREFIX = "flask_executor:EXECUTOR_"
# How long a process's heartbeat outlives it in the store (the module's own figure, 5 s).
REDIS_LOST_AFTER = getattr(flask_executor, "_LOST_AFTER_SECONDS", 5.0)
REDIS_HEARTBEAT = getattr(flask_executor, "_HEARTBEAT_SECONDS", 1.0)


# ---------------------------------------------------------------------------------------------
# Helpers


def redis_server_binary():
    """Debian's redis-server, or else one on PATH; None when there is none."""
    for candidate in ("/usr/bin/redis-server", shutil.which("redis-server")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def redis_stop_process(process, timeout=15):
    """Stops a process this module started, by its pid: SIGTERM, then SIGKILL."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)


class RedisTestServer:
    """A redis-server started by this module on a free loopback port, with no persistence
    and its files in ``folder``; stopped by its pid. With ``tls=(cert, key)`` its port
    speaks TLS only (and clients need no certificate of their own)."""

    def __init__(self, folder, *options, tls=None):
        binary = redis_server_binary()
        if binary is None:
            pytest.skip(
                "redis-server is not installed (looked for /usr/bin/redis-server and on PATH;"
                " apt-get install redis-server): the Redis store tests need a real server"
            )
        self.binary = binary
        self.folder = pathlib.Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.options = options
        self.tls = tls
        self.process = None
        for _ in range(3):  # another program may take the free port before the server does
            self.port = free_port()
            if self._start():
                return
        raise RuntimeError(f"redis-server did not start:\n{self.log_text()}")

    def _start(self):
        if self.tls is None:
            ports = ["--port", str(self.port)]
        else:
            cert, key = self.tls
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert)]
            ports += ["--tls-key-file", str(key), "--tls-auth-clients", "no"]
        self.log_path = self.folder / f"redis-server-{self.port}.log"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [self.binary, *ports, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
                + ["--dir", str(self.folder), *self.options],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=str(self.folder),
            )
        if wait_for_port(self.port, self.process, timeout=10):
            return True
        redis_stop_process(self.process)
        return False

    def url(self, password=None, scheme=None, query=""):
        scheme = scheme or ("redis" if self.tls is None else "rediss")
        credentials = "" if password is None else f":{password}@"
        return f"{scheme}://{credentials}127.0.0.1:{self.port}/0" + (f"?{query}" if query else "")

    def log_text(self):
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def restart(self):
        """Starts the server again on the same port, empty (nothing is persisted)."""
        if not self._start():
            raise RuntimeError(f"redis-server did not start again:\n{self.log_text()}")

    def stop(self):
        if self.process is not None:
            redis_stop_process(self.process)


def redis_client(url):
    """A redis-py client of its own, for the test to read and forge entries."""
    redis = pytest.importorskip("redis", reason="redis-py is not installed (pip install redis)")
    return redis.Redis.from_url(url)


def redis_settle_heartbeats():
    """Waits until the heartbeat threads of this process have told the store they have no
    unfinished task left (once a second), so that none fails on a server stopped under it."""
    time.sleep(REDIS_HEARTBEAT * 1.5)


def redis_entry_name(entry_id):
    return f"{REDIS_PREFIX}:e:{entry_id}"


def redis_entry_id(client, key):
    """The id of the entry under a string key, or None."""
    found = client.hget(REDIS_PREFIX + ":keys", "s:" + key)
    return None if found is None else int(found)


def redis_plant_entry(client, key, entry_id, fields):
    """Writes an entry straight into Redis under key, as a forger would."""
    client.hset(redis_entry_name(entry_id), mapping=fields)
    client.hset(REDIS_PREFIX + ":keys", "s:" + key, entry_id)
    client.zadd(REDIS_PREFIX + ":order", {entry_id: entry_id})


class RedisMarkerPayload:
    """What an attacker who can write to Redis would store: unpickling it runs code, here
    code that creates the file at ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').close()",))


def redis_marker_pickle(path):
    return pickle.dumps(RedisMarkerPayload(path), pickle.HIGHEST_PROTOCOL)


def redis_assert_payload_is_live(folder):
    """The forged payloads of these tests do create their marker file when unpickled, so a
    marker file that stays absent means they were not unpickled."""
    control = pathlib.Path(folder) / f"control-{uuid.uuid4().hex}"
    pickle.loads(redis_marker_pickle(control))
    assert control.exists()
    control.unlink()


def redis_app_records(caplog, app, level):
    return [record for record in caplog.records if record.name == app.logger.name and record.levelno == level]


def redis_record_text(record):
    text = record.getMessage()
    if record.exc_info:
        text += "\n" + "".join(traceback.format_exception(*record.exc_info))
    return text


def redis_finished(executor, key, future):
    """Waits for future, then for the store to say that key is done (the store is told
    after the future's waiters wake: see test_redis_store_says_done_as_soon_as_the_future_is_done)."""
    value = future.result(timeout=REDIS_WAIT)
    assert wait_for_condition(lambda: executor.futures.done(key), timeout=REDIS_WAIT)
    return value


def redis_new_key(label):
    return f"{label}-{uuid.uuid4().hex[:10]}"


# In-process tasks (module level, as the suite's are).


def redis_add(first, second):
    return first + second


def redis_hold(gate, value):
    gate.wait(REDIS_WAIT)
    return value


def redis_report_then_hold(gate, done, total, message):
    report_progress(done, total, message)
    gate.wait(REDIS_WAIT)
    return message


def redis_return(value):
    return value


# ---------------------------------------------------------------------------------------------
# Two app servers (gunicorn), standing for two hosts


# Tasks run on the Dask cluster: no side effects at import, because Dask workers import it.
REDIS_DASK_TASKS = """
import os
import threading
import time


def wait_for_file_then_double(path, number):
    deadline = time.monotonic() + 30
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    return {
        "value": number * 2,
        "pid": os.getpid(),
        "thread": threading.current_thread().name,
        "saw_file": os.path.exists(path),
    }
"""

REDIS_HOSTS_APP = '''
"""One app, served by two gunicorn instances that stand for two hosts sharing a Redis store."""
import os
import pathlib
import threading

from flask import Flask, jsonify, request

import redis_dask_tasks
from flask_executor import Executor, report_progress

app = Flask(__name__)
app.config["SECRET_KEY"] = os.environ["REDIS_TEST_SECRET_KEY"]
app.config["EXECUTOR_FUTURES_STORE"] = os.environ["REDIS_TEST_STORE_URL"]
if os.environ.get("REDIS_TEST_DASK_SCHEDULER"):

    def make_dask_executor(**options):
        import distributed

        client = distributed.Client(os.environ["REDIS_TEST_DASK_SCHEDULER"], set_as_default=False)
        return client.get_executor()

    app.config["EXECUTOR_TYPE"] = make_dask_executor
else:
    app.config["EXECUTOR_MAX_WORKERS"] = 1  # one task at a time: the next one waits
executor = Executor(app)

gates = {}
gates_lock = threading.Lock()


def gate(name):
    with gates_lock:
        return gates.setdefault(name, threading.Event())


def hold(name, value):
    gate(name).wait(60)
    return value


def report_then_hold(name, done, total, message):
    report_progress(done, total, message)
    gate(name).wait(60)
    return message


def add(first, second):
    return first + second


def write_marker(path):
    pathlib.Path(path).write_text("ran")
    return path


TASKS = {
    "hold": hold,
    "report_then_hold": report_then_hold,
    "add": add,
    "write_marker": write_marker,
    "dask_wait_for_file_then_double": redis_dask_tasks.wait_for_file_then_double,
}


def outcome(read):
    try:
        return {"kind": "result", "value": read()}
    except Exception as error:  # what a reader gets, by type and message
        return {"kind": "exception", "type": type(error).__name__, "message": str(error)}


@app.post("/start/<key>")
def start(key):
    body = request.get_json()
    try:
        executor.submit_stored(key, TASKS[body["task"]], *body["args"])
    except ValueError as error:
        return jsonify(started=False, error=str(error)), 409
    return jsonify(started=True)


@app.get("/state/<key>")
def state(key):
    futures = executor.futures
    if key not in futures:
        return jsonify(found=False)
    progress = futures.progress(key)
    return jsonify(
        found=True,
        done=futures.done(key),
        running=futures.running(key),
        cancelled=futures.cancelled(key),
        progress=None if progress is None else list(progress),
    )


@app.get("/result/<key>")
def result(key):
    if key not in executor.futures:
        return jsonify(found=False)
    timeout = float(request.args.get("timeout", "0"))
    return jsonify(found=True, **outcome(lambda: executor.futures.result(key, timeout=timeout)))


@app.post("/cancel/<key>")
def cancel(key):
    return jsonify(cancelled=executor.futures.cancel(key))


@app.post("/pop/<key>")
def pop(key):
    future = executor.futures.pop(key)
    if future is None:
        return jsonify(found=False)
    timeout = float(request.args.get("timeout", "0"))
    return jsonify(found=True, **outcome(lambda: future.result(timeout)))


@app.get("/keys")
def keys():
    return jsonify(keys=executor.futures.keys())


@app.post("/release/<name>")
def release(name):
    gate(name).set()
    return jsonify(released=True)


@app.get("/pid")
def pid():
    return jsonify(pid=os.getpid())
'''


def redis_write_app_modules(folder):
    folder = pathlib.Path(folder)
    (folder / "redis_hosts_app.py").write_text(REDIS_HOSTS_APP)
    (folder / "redis_dask_tasks.py").write_text(REDIS_DASK_TASKS)


class RedisAppServer:
    """A gunicorn instance serving redis_hosts_app on a free loopback port: one worker
    process (so that its pid is known) with threads; stopped by the master's pid."""

    def __init__(self, folder, name, store_url, preload=False, extra_env=None):
        self.name = name
        self.port = free_port()
        env = dict(os.environ)
        env.update(extra_env or {})
        env["REDIS_TEST_SECRET_KEY"] = REDIS_SECRET_KEY
        env["REDIS_TEST_STORE_URL"] = store_url
        env["PYTHONPATH"] = os.pathsep.join(
            [str(folder), REDIS_MODULE_DIR] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        self.log_path = pathlib.Path(folder) / f"gunicorn-{name}.log"
        arguments = [sys.executable, "-m", "gunicorn", "-w", "1", "--threads", "8"]
        arguments += ["-b", f"127.0.0.1:{self.port}", "--graceful-timeout", "5", "--timeout", "60"]
        arguments += ["--chdir", str(folder)] + (["--preload"] if preload else []) + ["redis_hosts_app:app"]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                arguments, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(folder)
            )
        if not wait_for_port(self.port, self.process, timeout=REDIS_WAIT):
            self.stop()
            raise RuntimeError(f"gunicorn {name} did not start:\n{self.log_text()}")

    def request(self, method, path, body=None, timeout=REDIS_WAIT):
        """One request on a fresh connection: (status, JSON body)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            headers = {} if body is None else {"Content-Type": "application/json"}
            connection.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        try:
            return response.status, json.loads(data)
        except ValueError:
            raise AssertionError(
                f"{self.name} {method} {path}: {response.status} {data!r}\n{self.log_text()}"
            ) from None

    def start(self, key, task, *args):
        return self.request("POST", f"/start/{key}", {"task": task, "args": list(args)})

    def state(self, key):
        return self.request("GET", f"/state/{key}")[1]

    def result(self, key, timeout=0):
        return self.request("GET", f"/result/{key}?timeout={timeout}")[1]

    def pop(self, key, timeout=0):
        return self.request("POST", f"/pop/{key}?timeout={timeout}")[1]

    def stored_keys(self):
        return self.request("GET", "/keys")[1]["keys"]

    def release(self, gate):
        return self.request("POST", f"/release/{gate}")[1]

    def worker_pid(self):
        """The pid of the worker process, checked to be a child of this gunicorn master."""
        pid = self.request("GET", "/pid")[1]["pid"]
        with open(f"/proc/{pid}/stat") as stat:
            parent = int(stat.read().rpartition(")")[2].split()[1])
        assert parent == self.process.pid, (pid, parent, self.process.pid)
        return pid

    def log_text(self):
        return self.log_path.read_text(errors="replace")

    def stop(self):
        redis_stop_process(self.process)


@contextlib.contextmanager
def redis_releasing(host, *gates):
    """Releases the gates on host at the end, even when the test fails: a task left holding
    a host's one worker would stall the tests that follow."""
    try:
        yield
    finally:
        for gate in gates:
            try:
                host.release(gate)
            except OSError:
                pass  # the host's worker was killed, and its gates with it


@pytest.fixture(scope="module")
def redis_hosts(tmp_path_factory):
    """A Redis server and two gunicorn instances of one app sharing it: ``a`` (forked from a
    preloaded master, as many deployments run) and ``b``."""
    folder = tmp_path_factory.mktemp("redis_hosts")
    redis_write_app_modules(folder)
    server = RedisTestServer(folder / "redis")
    started = []
    try:
        started.append(RedisAppServer(folder, "a", server.url(), preload=True))
        started.append(RedisAppServer(folder, "b", server.url()))
        a, b = started
        yield types.SimpleNamespace(a=a, b=b, folder=folder, server=server)
    finally:
        for app_server in started:
            app_server.stop()
        server.stop()


# ---------------------------------------------------------------------------------------------
# In-process fixtures


@pytest.fixture(scope="module")
def redis_shared_server(tmp_path_factory):
    server = RedisTestServer(tmp_path_factory.mktemp("redis_shared"))
    yield server
    redis_settle_heartbeats()
    server.stop()


@pytest.fixture
def redis_url(redis_shared_server):
    """The URL of the module's Redis server, emptied for this test."""
    url = redis_shared_server.url()
    redis_client(url).flushall()
    return url


@pytest.fixture
def redis_servers(tmp_path):
    """Factory of Redis servers of this test: start(*options, tls=None). Each is stopped at
    teardown, once this process's heartbeats have gone quiet."""
    started = []

    def start(*options, tls=None):
        server = RedisTestServer(tmp_path / f"redis-{len(started)}", *options, tls=tls)
        started.append(server)
        return server

    yield start
    if started:
        redis_settle_heartbeats()
    for server in started:
        server.stop()


@pytest.fixture
def redis_gates():
    """Factory of threading.Events that hold tasks; all are set at teardown."""
    made = []

    def make():
        gate = threading.Event()
        made.append(gate)
        return gate

    make.made = made
    yield make
    for gate in made:
        gate.set()


@pytest.fixture
def redis_executors(redis_servers, redis_gates):
    """Factory: make(store, tag, secret=REDIS_SECRET_KEY, **config) -> (app, executor), each
    executor bound to an app of its own (its own logger name) that names the store. At
    teardown, the gates are set and every executor is shut down, before any server stops."""
    made = []

    def make(store, tag, secret=REDIS_SECRET_KEY, **config):
        app = Flask(f"redis_{tag}_{uuid.uuid4().hex[:8]}")
        app.config.update(SECRET_KEY=secret, EXECUTOR_FUTURES_STORE=store, **config)
        executor = Executor(app)
        made.append(executor)
        return app, executor

    yield make
    for gate in redis_gates.made:
        gate.set()
    for executor in made:
        executor.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(params=["redis", "sqlite"])
def redis_or_sqlite_store(request, tmp_path):
    """The store of the test: Redis, and the SQLite store whose contract it has, as reference."""
    if request.param == "redis":
        return request.getfixturevalue("redis_url")
    return str(tmp_path / "futures.db")


# ---------------------------------------------------------------------------------------------
# Two hosts: A and B, gunicorn instances of one app, sharing one Redis


@pytest.mark.timeout(120)
def test_redis_task_started_on_one_host_is_read_and_popped_on_the_other(redis_hosts):
    a, b = redis_hosts.a, redis_hosts.b
    key = redis_new_key("sum")
    assert a.start(key, "add", 40, 2) == (200, {"started": True})

    assert b.result(key, timeout=20) == {"found": True, "kind": "result", "value": 42}
    assert b.state(key) == {
        "found": True,
        "done": True,
        "running": False,
        "cancelled": False,
        "progress": None,
    }
    assert key in b.stored_keys()
    assert key in a.stored_keys()

    assert b.pop(key, timeout=5) == {"found": True, "kind": "result", "value": 42}
    assert a.state(key) == {"found": False}
    assert b.state(key) == {"found": False}
    assert key not in a.stored_keys()
    assert b.pop(key) == {"found": False}


@pytest.mark.timeout(120)
def test_redis_key_popped_on_one_host_while_running_on_the_other_is_free_and_the_popper_gets_the_result(
    redis_hosts,
):
    a, b = redis_hosts.a, redis_hosts.b
    key, gate = redis_new_key("popped-running"), redis_new_key("gate")
    with redis_releasing(a, gate):
        assert a.start(key, "hold", gate, "first")[0] == 200
        assert wait_for_condition(lambda: b.state(key).get("running")), b.state(key)

        with concurrent.futures.ThreadPoolExecutor(1) as client:
            popped = client.submit(b.pop, key, 20)  # waits on B for the result
            assert wait_for_condition(lambda: key not in a.stored_keys()), a.stored_keys()
            assert b.state(key) == {"found": False}
            # The key is free at once: A takes it again while the popped task still runs.
            assert a.start(key, "add", 1, 1) == (200, {"started": True})
            assert not popped.done()
            a.release(gate)
            assert popped.result(timeout=REDIS_WAIT) == {"found": True, "kind": "result", "value": "first"}

    assert b.result(key, timeout=20) == {"found": True, "kind": "result", "value": 2}
    assert b.pop(key)["value"] == 2


def redis_start_blocker_and_waiting_task(hosts, marker):
    """On A, whose one worker runs one task at a time: a blocker, running, and a task that
    writes marker, waiting behind it. Returns (blocker key, waiting key, gate)."""
    a, b = hosts.a, hosts.b
    blocker, waiting, gate = redis_new_key("blocker"), redis_new_key("waiting"), redis_new_key("gate")
    assert a.start(blocker, "hold", gate, "blocker")[0] == 200
    assert wait_for_condition(lambda: b.state(blocker).get("running")), b.state(blocker)
    assert a.start(waiting, "write_marker", str(marker))[0] == 200
    assert b.state(waiting) == {
        "found": True,
        "done": False,
        "running": False,
        "cancelled": False,
        "progress": None,
    }
    return blocker, waiting, gate


@pytest.mark.timeout(120)
def test_redis_waiting_task_cancelled_from_another_host_never_runs_and_is_not_reported_lost(redis_hosts):
    a, b = redis_hosts.a, redis_hosts.b
    marker = redis_hosts.folder / f"{uuid.uuid4().hex}.ran"
    blocker, waiting, gate = redis_start_blocker_and_waiting_task(redis_hosts, marker)
    after = redis_new_key("after")
    with redis_releasing(a, gate):
        assert b.request("POST", f"/cancel/{waiting}") == (200, {"cancelled": True})
        assert b.state(waiting)["cancelled"] is True
        assert b.result(waiting)["type"] == "CancelledError"

        a.release(gate)
        assert b.result(blocker, timeout=20)["value"] == "blocker"
        # A's one worker takes tasks in order: once a later task has run, it has passed the cancelled one.
        assert a.start(after, "add", 2, 3)[0] == 200
        assert b.result(after, timeout=20)["value"] == 5
    assert not marker.exists()
    assert a.state(waiting)["cancelled"] is True
    assert a.result(waiting)["type"] == "CancelledError"
    for key in (blocker, waiting, after):
        assert b.pop(key)["found"]
    # A learnt of the cancel from the store: nothing was lost, and its log must not say so.
    assert [line for line in a.log_text().splitlines() if waiting in line] == []


@pytest.mark.timeout(120)
def test_redis_task_cancelled_from_another_host_reads_as_cancelled_at_once_on_the_host_that_accepted_it(
    redis_hosts,
):
    a, b = redis_hosts.a, redis_hosts.b
    marker = redis_hosts.folder / f"{uuid.uuid4().hex}.ran"
    blocker, waiting, gate = redis_start_blocker_and_waiting_task(redis_hosts, marker)
    with redis_releasing(a, gate):
        assert b.request("POST", f"/cancel/{waiting}") == (200, {"cancelled": True})
        # While A's worker is still busy with the blocker, A answers as B does.
        assert a.state(waiting) == b.state(waiting)
        assert a.state(waiting)["cancelled"] is True
        assert a.result(waiting, timeout=1)["type"] == "CancelledError"
    assert b.result(blocker, timeout=20)["value"] == "blocker"
    assert not marker.exists()
    for key in (blocker, waiting):
        b.pop(key)


@pytest.mark.timeout(120)
def test_redis_duplicate_start_on_another_host_of_a_key_running_on_the_first_is_refused_and_never_runs(
    redis_hosts,
):
    a, b = redis_hosts.a, redis_hosts.b
    key, gate = redis_new_key("duplicate"), redis_new_key("gate")
    marker = redis_hosts.folder / f"{key}.ran"
    with redis_releasing(a, gate):
        assert a.start(key, "hold", gate, "from A")[0] == 200
        assert wait_for_condition(lambda: b.state(key).get("running")), b.state(key)

        status, body = b.start(key, "write_marker", str(marker))
        assert status == 409
        assert body["started"] is False
        assert "already in use" in body["error"]
        assert key in body["error"]

        a.release(gate)
        assert b.result(key, timeout=20) == {"found": True, "kind": "result", "value": "from A"}
    assert not marker.exists()
    assert a.pop(key)["value"] == "from A"


@pytest.mark.timeout(120)
def test_redis_progress_reported_on_one_host_is_read_on_the_other(redis_hosts):
    a, b = redis_hosts.a, redis_hosts.b
    key, gate = redis_new_key("progress"), redis_new_key("gate")
    with redis_releasing(a, gate):
        assert a.start(key, "report_then_hold", gate, 3, 4, "three of four")[0] == 200
        assert wait_for_condition(lambda: b.state(key).get("progress") == [3, 4, "three of four"]), b.state(
            key
        )
        assert b.state(key)["running"] is True
        a.release(gate)
        assert b.result(key, timeout=20)["value"] == "three of four"
    assert b.state(key)["progress"] == [3, 4, "three of four"]
    assert b.pop(key)["found"]


@pytest.mark.timeout(120)
def test_redis_task_of_a_killed_worker_is_read_as_lost_on_the_other_host_and_a_live_hosts_task_is_not(
    redis_hosts,
):
    a, b = redis_hosts.a, redis_hosts.b
    doomed, live = redis_new_key("doomed"), redis_new_key("live")
    doomed_gate, live_gate = redis_new_key("gate"), redis_new_key("gate")
    with redis_releasing(a, doomed_gate), redis_releasing(b, live_gate):
        assert a.start(doomed, "hold", doomed_gate, "never")[0] == 200
        assert b.start(live, "hold", live_gate, "alive")[0] == 200
        live_started = time.monotonic()
        assert wait_for_condition(lambda: b.state(doomed).get("running")), b.state(doomed)
        assert a.state(live)["running"] is True

        old_worker = a.worker_pid()
        os.kill(old_worker, signal.SIGKILL)  # a worker of the gunicorn this module started

        # Lost once A's heartbeat expires (5 s); 15 s is the bound.
        assert wait_for_condition(lambda: b.state(doomed).get("done"), timeout=15), b.state(doomed)
        lost = b.result(doomed)
        assert lost["kind"] == "exception"
        assert lost["type"] == "TaskLost"
        assert doomed in lost["message"]
        # A's new worker (gunicorn starts one) reads the same.
        assert a.result(doomed)["type"] == "TaskLost"
        assert a.worker_pid() != old_worker

        # B's task has run longer than the heartbeat expiry, and B is alive: it is not lost.
        time.sleep(max(0.0, REDIS_LOST_AFTER + 2 - (time.monotonic() - live_started)))
        assert a.state(live) == {
            "found": True,
            "done": False,
            "running": True,
            "cancelled": False,
            "progress": None,
        }
        b.release(live_gate)
        assert a.result(live, timeout=20) == {"found": True, "kind": "result", "value": "alive"}
    assert a.pop(live)["found"]
    assert a.pop(doomed)["found"]


# ---------------------------------------------------------------------------------------------
# No way in through Redis: what is unpickled must carry the app's signature


@pytest.mark.timeout(60)
@pytest.mark.parametrize("signature", ["missing", "wrong"])
def test_redis_forged_outcome_is_refused_never_unpickled_and_logged(
    redis_url, redis_executors, tmp_path, caplog, signature
):
    redis_assert_payload_is_live(tmp_path)
    _, runner = redis_executors(redis_url, "runner")
    reader_app, reader = redis_executors(redis_url, "reader")
    assert redis_finished(runner, "report", runner.submit_stored("report", redis_add, 40, 2)) == 42
    assert reader.futures.result("report", timeout=REDIS_WAIT) == 42

    marker = tmp_path / "outcome-unpickled"
    payload = redis_marker_pickle(marker)
    forged = payload if signature == "missing" else os.urandom(32) + payload
    client = redis_client(redis_url)
    client.hset(redis_entry_name(redis_entry_id(client, "report")), "outcome", forged)

    assert reader.futures.done("report") is True
    with pytest.raises(StoreError, match="signature"):
        reader.futures.result("report", timeout=5)
    with pytest.raises(StoreError, match="signature"):
        reader.futures.exception("report", timeout=5)
    assert not marker.exists()
    errors = [
        r for r in redis_app_records(caplog, reader_app, logging.ERROR) if "signature" in r.getMessage()
    ]
    assert errors
    assert "outcome" in errors[0].getMessage()


@pytest.mark.timeout(60)
def test_redis_outcome_signed_with_another_secret_key_is_refused_never_unpickled_and_logged(
    redis_url, redis_executors, tmp_path, caplog
):
    redis_assert_payload_is_live(tmp_path)
    marker = tmp_path / "other-key-unpickled"
    # An app with another SECRET_KEY, naming the same store, stores a result whose unpickling runs code.
    _, other = redis_executors(redis_url, "other", secret="not-the-secret-key")
    reader_app, reader = redis_executors(redis_url, "reader")
    redis_finished(other, "planted", other.submit_stored("planted", redis_return, RedisMarkerPayload(marker)))

    assert reader.futures.done("planted") is True
    with pytest.raises(StoreError, match="signature"):
        reader.futures.result("planted", timeout=5)
    assert not marker.exists()
    assert [r for r in redis_app_records(caplog, reader_app, logging.ERROR) if "signature" in r.getMessage()]


@pytest.mark.timeout(60)
def test_redis_forged_progress_is_refused_never_unpickled_and_logged(
    redis_url, redis_executors, redis_gates, tmp_path, caplog
):
    redis_assert_payload_is_live(tmp_path)
    _, runner = redis_executors(redis_url, "runner")
    reader_app, reader = redis_executors(redis_url, "reader")
    gate = redis_gates()
    future = runner.submit_stored("import", redis_report_then_hold, gate, 1, 2, "half")
    assert wait_for_condition(lambda: reader.futures.progress("import") == Progress(1, 2, "half"))

    marker = tmp_path / "progress-unpickled"
    client = redis_client(redis_url)
    client.hset(
        redis_entry_name(redis_entry_id(client, "import")),
        "progress",
        os.urandom(32) + redis_marker_pickle(marker),
    )

    with pytest.raises(StoreError, match="signature"):
        reader.futures.progress("import")
    assert not marker.exists()
    errors = [
        r for r in redis_app_records(caplog, reader_app, logging.ERROR) if "signature" in r.getMessage()
    ]
    assert errors
    assert "progress" in errors[0].getMessage()

    # The task's own last report replaces the forgery when it finishes.
    gate.set()
    assert redis_finished(runner, "import", future) == "half"
    assert reader.futures.progress("import") == Progress(1, 2, "half")
    assert not marker.exists()


@pytest.mark.timeout(60)
def test_redis_whole_fake_entry_under_a_key_is_refused_never_unpickled_and_logged(
    redis_url, redis_executors, tmp_path, caplog
):
    redis_assert_payload_is_live(tmp_path)
    reader_app, reader = redis_executors(redis_url, "reader")
    finished_marker, running_marker = (
        tmp_path / "fake-outcome-unpickled",
        tmp_path / "fake-progress-unpickled",
    )
    client = redis_client(redis_url)
    fake_outcome = os.urandom(32) + redis_marker_pickle(finished_marker)
    redis_plant_entry(
        client,
        "fake",
        10**9,
        {"key": "s:fake", "state": "FINISHED", "owner": "intruder", "outcome": fake_outcome},
    )
    fake_progress = redis_marker_pickle(running_marker)  # no signature at all
    # A live-looking owner, so that the reader does not take the task for lost.
    client.set("flask_executor:owner:intruder", 1, ex=60)
    redis_plant_entry(
        client,
        "fake-running",
        10**9 + 1,
        {"key": "s:fake-running", "state": "RUNNING", "owner": "intruder", "progress": fake_progress},
    )

    assert "fake" in reader.futures
    assert reader.futures.done("fake") is True
    with pytest.raises(StoreError, match="signature"):
        reader.futures.result("fake", timeout=5)
    assert reader.futures.running("fake-running") is True
    with pytest.raises(StoreError, match="signature"):
        reader.futures.progress("fake-running")
    assert not finished_marker.exists()
    assert not running_marker.exists()
    errors = [
        r for r in redis_app_records(caplog, reader_app, logging.ERROR) if "signature" in r.getMessage()
    ]
    assert len(errors) >= 2


@pytest.mark.timeout(60)
def test_redis_signed_outcome_moved_to_another_key_is_refused_and_logged(redis_url, redis_executors, caplog):
    # Someone who can write to Redis, but has no SECRET_KEY, copies the outcome of one task
    # (signed by the app) into the entry of another: a reader of the second must not get the
    # first one's result (one user's report shown to another).
    _, runner = redis_executors(redis_url, "runner")
    reader_app, reader = redis_executors(redis_url, "reader")
    redis_finished(runner, "alice-report", runner.submit_stored("alice-report", redis_return, "alice's data"))
    redis_finished(runner, "bob-report", runner.submit_stored("bob-report", redis_return, "bob's data"))
    client = redis_client(redis_url)
    alice, bob = redis_entry_id(client, "alice-report"), redis_entry_id(client, "bob-report")
    client.hset(redis_entry_name(bob), "outcome", client.hget(redis_entry_name(alice), "outcome"))

    assert reader.futures.result("alice-report", timeout=5) == "alice's data"
    with pytest.raises(StoreError, match="signature"):
        reader.futures.result("bob-report", timeout=5)
    assert [r for r in redis_app_records(caplog, reader_app, logging.ERROR) if "bob-report" in r.getMessage()]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("missing", ["key", "owner"])
def test_redis_fake_entry_with_a_field_missing_gives_store_error_and_is_logged(
    redis_url, redis_executors, tmp_path, caplog, missing
):
    redis_assert_payload_is_live(tmp_path)
    reader_app, reader = redis_executors(redis_url, "reader")
    marker = tmp_path / "malformed-unpickled"
    fields = {"key": "s:malformed", "state": "FINISHED", "owner": "intruder"}
    fields["outcome"] = os.urandom(32) + redis_marker_pickle(marker)
    del fields[missing]
    redis_plant_entry(redis_client(redis_url), "malformed", 10**9, fields)

    with pytest.raises(StoreError):
        reader.futures.result("malformed", timeout=5)
    assert not marker.exists()
    assert redis_app_records(caplog, reader_app, logging.ERROR)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("missing", ["key", "owner"])
def test_redis_entry_that_loses_a_field_after_a_process_read_it_gives_that_process_store_error(
    redis_url, redis_executors, caplog, missing
):
    # The reader's next status query of the key reads the entry plainly (it knows its
    # id): a field missing there must still give StoreError, and an error in the log.
    reader_app, reader = redis_executors(redis_url, "known_reader")
    _, writer = redis_executors(redis_url, "known_writer")
    assert redis_finished(writer, "known", writer.submit_stored("known", redis_add, 1, 2)) == 3
    assert reader.futures.done("known") is True
    client = redis_client(redis_url)
    client.hdel(redis_entry_name(redis_entry_id(client, "known")), missing)
    with pytest.raises(StoreError):
        reader.futures.done("known")
    assert redis_app_records(caplog, reader_app, logging.ERROR)


# ---------------------------------------------------------------------------------------------
# Passwords and TLS


@pytest.mark.timeout(60)
def test_redis_store_with_a_password_in_the_url_shares_tasks(redis_servers, redis_executors):
    server = redis_servers("--requirepass", "s3cret-pass")
    url = server.url(password="s3cret-pass")
    _, a = redis_executors(url, "a")
    _, b = redis_executors(url, "b")
    assert redis_finished(a, "guarded", a.submit_stored("guarded", redis_add, 20, 22)) == 42
    assert b.futures.keys() == ["guarded"]
    assert b.futures.result("guarded", timeout=REDIS_WAIT) == 42
    assert b.futures.pop("guarded").result(timeout=REDIS_WAIT) == 42
    assert "guarded" not in a.futures


@pytest.mark.timeout(60)
def test_redis_wrong_or_missing_password_fails_at_init_app_with_a_value_error_that_hides_it(
    redis_servers, redis_executors, caplog
):
    server = redis_servers("--requirepass", "right-pass-4711")
    app, executor = redis_executors(server.url(password="right-pass-4711"), "bound")

    for url in (server.url(password="wrong-pass-0815"), server.url()):
        other = Flask(f"redis_wrong_{uuid.uuid4().hex[:8]}")
        other.config.update(SECRET_KEY=REDIS_SECRET_KEY, EXECUTOR_FUTURES_STORE=url)
        with pytest.raises(ValueError, match="EXECUTOR_FUTURES_STORE") as raised:
            executor.init_app(other)
        shown = "".join(traceback.format_exception(raised.value))
        assert "wrong-pass-0815" not in shown
        assert "right-pass-4711" not in shown
        assert f"127.0.0.1:{server.port}" in str(raised.value)  # it says which store

    # Nothing changed: the executor still uses the store it was bound to.
    assert executor.submit_stored("still-bound", redis_add, 1, 1).result(timeout=REDIS_WAIT) == 2
    assert redis_client(server.url(password="right-pass-4711")).hexists(
        REDIS_PREFIX + ":keys", "s:still-bound"
    )
    assert "wrong-pass-0815" not in caplog.text


@pytest.fixture
def redis_tls_server(redis_servers, tmp_path):
    """A redis-server whose port speaks TLS only, with a self-signed certificate for
    127.0.0.1 made here, and a password; skips when openssl or TLS support is missing."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed: it makes the certificate of the TLS test")
    cert, key = tmp_path / "redis-cert.pem", tmp_path / "redis-key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    try:
        server = redis_servers("--requirepass", "tls-pass-1234", tls=(cert, key))
    except RuntimeError as error:
        if "tls" in str(error).lower():
            pytest.skip(f"this redis-server has no TLS support (built without BUILD_TLS=yes): {error}")
        raise
    server.cert = cert
    return server


@pytest.mark.timeout(60)
def test_redis_store_over_tls_with_a_password_shares_tasks(redis_tls_server, redis_executors):
    server = redis_tls_server
    trusting = server.url(
        password="tls-pass-1234", query="ssl_ca_certs=" + urllib.parse.quote(str(server.cert))
    )
    unchecked = server.url(password="tls-pass-1234", query="ssl_cert_reqs=none")
    assert trusting.startswith("rediss://")
    _, a = redis_executors(trusting, "tls_a")
    _, b = redis_executors(unchecked, "tls_b")
    assert a.submit_stored("encrypted", redis_add, 40, 2).result(timeout=REDIS_WAIT) == 42
    assert b.futures.result("encrypted", timeout=REDIS_WAIT) == 42
    assert b.futures.pop("encrypted").result(timeout=REDIS_WAIT) == 42
    assert a.futures.keys() == []


@pytest.mark.timeout(60)
def test_redis_tls_store_refuses_an_untrusted_certificate_and_plain_connections_at_init_app(redis_tls_server):
    server = redis_tls_server
    untrusted = server.url(password="tls-pass-1234")  # rediss://, and the certificate is self-signed
    plain = server.url(password="tls-pass-1234", scheme="redis")
    for url in (untrusted, plain):
        app = Flask(f"redis_tls_refused_{uuid.uuid4().hex[:8]}")
        app.config.update(SECRET_KEY=REDIS_SECRET_KEY, EXECUTOR_FUTURES_STORE=url)
        with pytest.raises(ValueError, match="EXECUTOR_FUTURES_STORE") as raised:
            Executor(app)
        assert "tls-pass-1234" not in "".join(traceback.format_exception(raised.value))


# ---------------------------------------------------------------------------------------------
# Without redis-py


REDIS_NO_REDIS_PY_SCRIPT = """
import importlib.util
import json

result = {"redis_found": importlib.util.find_spec("redis") is not None}
from flask import Flask

import flask_executor

result["module"] = flask_executor.__file__
app = Flask("no_redis_py")
app.config.update(SECRET_KEY="s", EXECUTOR_FUTURES_STORE="redis://:hidden-pass-99@127.0.0.1:1/0")
try:
    flask_executor.Executor(app)
except ValueError as error:
    result["error"] = str(error)
print(json.dumps(result))
"""


def redis_flask_distributions():
    """Flask and every distribution it requires, as installed here (optional ones skipped)."""
    found = {}
    pending = ["flask"]
    while pending:
        name = pending.pop()
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # a requirement for other Pythons, not installed here
        canonical = re.sub(r"[-_.]+", "-", distribution.metadata["Name"]).lower()
        if canonical in found:
            continue
        found[canonical] = distribution
        for requirement in distribution.requires or []:
            if "extra ==" not in requirement:
                pending.append(re.match(r"[A-Za-z0-9._-]+", requirement).group(0))
    return found


@pytest.mark.timeout(120)
def test_redis_store_without_redis_py_fails_at_init_app_saying_pip_install_redis(tmp_path):
    # A fresh virtual environment with only Flask (and what it requires) in it: the installed
    # distributions are linked in, so that no package index is needed.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    site_packages = pathlib.Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.strip()
    )
    distributions = redis_flask_distributions()
    assert "redis" not in distributions
    for distribution in distributions.values():
        tops = {pathlib.PurePath(str(file)).parts[0] for file in distribution.files or []}
        for top in tops:
            if top == ".." or top == "__pycache__":
                continue  # scripts in bin/, and caches
            source = pathlib.Path(distribution.locate_file(top))
            if source.exists() and not (site_packages / top).exists():
                (site_packages / top).symlink_to(source)
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(flask_executor.__file__, project / "flask_executor.py")
    (project / "check_store.py").write_text(REDIS_NO_REDIS_PY_SCRIPT)

    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    done = subprocess.run(
        [str(python), "-s", "check_store.py"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["redis_found"] is False
    assert pathlib.Path(result["module"]).resolve() == (project / "flask_executor.py").resolve()
    assert "pip install redis" in result["error"]
    assert "EXECUTOR_FUTURES_STORE" in result["error"]
    assert "hidden-pass-99" not in result["error"]


# ---------------------------------------------------------------------------------------------
# The store and the futures agree


@pytest.mark.timeout(60)
def test_redis_store_says_done_as_soon_as_the_future_is_done(redis_or_sqlite_store, redis_executors):
    # A view that waited for a task and then sends the client to fetch the result, from this
    # process or another, must not have the store answer "still running", not even while the
    # task's done callbacks run (here one that takes a while, as sending an email does).
    store = redis_or_sqlite_store
    own_app, own = redis_executors(store, "own", EXECUTOR_FUTURES_MAX_LENGTH=0)
    _, other = redis_executors(store, "other", EXECUTOR_FUTURES_MAX_LENGTH=0)
    own.add_default_done_callback(lambda future: time.sleep(0.2))
    stale_own, stale_other = [], []
    for number in range(5):
        key = f"task-{number}"
        future = own.submit_stored(key, redis_add, number, 1)
        assert future.result(timeout=REDIS_WAIT) == number + 1
        if own.futures.done(key) is not True:
            stale_own.append(key)
        if other.futures.done(key) is not True:
            stale_other.append(key)
    assert stale_own == [], f"{len(stale_own)} of 5 read as unfinished by the executor whose future was done"
    assert stale_other == [], f"{len(stale_other)} of 5 read as unfinished by another executor"


# ---------------------------------------------------------------------------------------------
# Max length and TTL, store-wide, as the SQLite store has them


@pytest.mark.timeout(60)
def test_redis_max_length_is_store_wide_and_drops_finished_entries_first_oldest_first(
    redis_or_sqlite_store, redis_executors, redis_gates, caplog
):
    store = redis_or_sqlite_store
    config = {"EXECUTOR_FUTURES_MAX_LENGTH": 3, "EXECUTOR_MAX_WORKERS": 4}
    app_a, a = redis_executors(store, "length_a", **config)
    _, b = redis_executors(store, "length_b", **config)
    gate = redis_gates()

    u1 = a.submit_stored("u1", redis_hold, gate, "u1")
    assert redis_finished(b, "f2", b.submit_stored("f2", redis_add, 1, 1)) == 2
    assert redis_finished(a, "f3", a.submit_stored("f3", redis_add, 1, 2)) == 3
    assert b.futures.keys() == ["u1", "f2", "f3"]
    # Full: the oldest finished entry goes, not the older unfinished one.
    assert redis_finished(b, "f4", b.submit_stored("f4", redis_add, 1, 3)) == 4
    assert a.futures.keys() == ["u1", "f3", "f4"]
    a.submit_stored("u5", redis_hold, gate, "u5")
    assert b.futures.keys() == ["u1", "f4", "u5"]
    b.submit_stored("u6", redis_hold, gate, "u6")
    assert a.futures.keys() == ["u1", "u5", "u6"]
    assert b.futures.done("f2") is None and a.futures.done("f3") is None

    # Nothing finished: the oldest of all goes, with a warning from the executor that added.
    a.submit_stored("u7", redis_hold, gate, "u7")
    assert b.futures.keys() == ["u5", "u6", "u7"]
    assert len(a.futures) == len(b.futures) == 3
    assert b.futures.done("u1") is None
    warnings = [r.getMessage() for r in redis_app_records(caplog, app_a, logging.WARNING)]
    assert any("'u1'" in message and "Stopped tracking" in message for message in warnings), warnings

    gate.set()
    assert u1.result(timeout=REDIS_WAIT) == "u1"  # dropped from the store, still run
    if store.startswith("redis"):
        entries = redis_client(store).keys(REDIS_PREFIX + ":e:*")
        assert len(entries) == 3  # dropped entries leave nothing behind in Redis


@pytest.mark.timeout(60)
def test_redis_ttl_removes_finished_entries_for_every_process_and_keeps_unfinished_ones(
    redis_or_sqlite_store, redis_executors, redis_gates
):
    store = redis_or_sqlite_store
    ttl = 1.0
    _, a = redis_executors(store, "ttl_a", EXECUTOR_FUTURES_TTL=ttl)
    _, b = redis_executors(store, "ttl_b", EXECUTOR_FUTURES_TTL=ttl)
    gate = redis_gates()
    client = redis_client(store) if store.startswith("redis") else None

    assert redis_finished(a, "old", a.submit_stored("old", redis_add, 1, 2)) == 3
    assert b.futures.done("old") is True  # there for the other process too
    old_entry = client and redis_entry_id(client, "old")
    long = b.submit_stored("long", redis_hold, gate, "long")
    old_finished = time.monotonic()

    # Past the TTL of "old" (and "long", unfinished, older than it): keys() and len() come
    # first, before any read of "old" could remove it on the way.
    time.sleep(max(0.0, 2 * ttl - (time.monotonic() - old_finished)))
    assert b.futures.keys() == ["long"]
    assert len(a.futures) == 1
    assert b.futures.done("old") is None
    assert "old" not in a.futures
    assert a.futures.running("long") is True
    # An expired key is free again.
    assert a.submit_stored("old", redis_add, 2, 2).result(timeout=REDIS_WAIT) == 4
    assert b.futures.keys() == ["long", "old"]

    gate.set()
    assert redis_finished(b, "long", long) == "long"
    long_entry = client and redis_entry_id(client, "long")
    assert wait_for_condition(lambda: a.futures.done("long") is None, timeout=10)
    if client is not None:
        assert not client.exists(redis_entry_name(old_entry))
        assert not client.exists(redis_entry_name(long_entry))


@pytest.mark.timeout(60)
def test_shared_store_finished_entry_past_its_ttl_reads_as_gone_to_a_process_that_read_it_before(
    redis_or_sqlite_store, redis_executors
):
    # The first thing after the TTL is a read by a process that read the key before (and
    # so may know its entry): no sweep by another operation came first.
    ttl = 1.0
    _, a = redis_executors(redis_or_sqlite_store, "ttl_read_a", EXECUTOR_FUTURES_TTL=ttl)
    _, b = redis_executors(redis_or_sqlite_store, "ttl_read_b", EXECUTOR_FUTURES_TTL=ttl)
    assert redis_finished(a, "old", a.submit_stored("old", redis_add, 1, 2)) == 3
    finished = time.monotonic()
    assert b.futures.done("old") is True
    time.sleep(max(0.0, 2 * ttl - (time.monotonic() - finished)))
    assert b.futures.done("old") is None
    assert a.futures.done("old") is None


@pytest.mark.timeout(60)
def test_redis_reader_of_a_key_popped_and_taken_again_reads_the_new_task_not_the_one_it_read(
    redis_url, redis_executors, redis_gates
):
    # c reads "k" while its first task runs on a; b pops "k" (the running entry stays,
    # without its key, for b) and a takes "k" again for a task that finishes at once.
    _, a = redis_executors(redis_url, "retaken_a")
    _, b = redis_executors(redis_url, "retaken_b")
    _, c = redis_executors(redis_url, "retaken_c")
    gate = redis_gates()
    first = a.submit_stored("k", redis_hold, gate, "first")
    assert wait_for_condition(lambda: c.futures.running("k"), timeout=REDIS_WAIT)
    popped = b.futures.pop("k")
    assert popped.running()
    assert redis_finished(a, "k", a.submit_stored("k", redis_add, 1, 2)) == 3
    assert c.futures.running("k") is False
    assert c.futures.done("k") is True
    assert c.futures.result("k") == 3
    gate.set()
    assert first.result(timeout=REDIS_WAIT) == "first"
    assert popped.result(timeout=REDIS_WAIT) == "first"
    assert c.futures.result("k") == 3


@pytest.mark.timeout(60)
def test_redis_repeated_status_queries_are_plain_reads_once_the_key_was_read(
    redis_servers, redis_executors, redis_gates
):
    # A script costs Redis ten times what a plain read does. Once a process has read a
    # key, its status queries read the entry with one HMGET, for a finished task, and for
    # an unfinished one while its owner's mark lasts. (A server of its own: the counts
    # are the server's, and no other test's tasks may add to them.)
    redis_url = redis_servers().url()
    _, a = redis_executors(redis_url, "plain_a")
    _, b = redis_executors(redis_url, "plain_b")
    gate = redis_gates()
    assert redis_finished(a, "done", a.submit_stored("done", redis_add, 1, 2)) == 3
    a.submit_stored("running", redis_hold, gate, "running")
    assert wait_for_condition(lambda: b.futures.running("running"), timeout=REDIS_WAIT)
    assert b.futures.done("done") is True
    client = redis_client(redis_url)

    def calls(command):
        return client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0)

    scripts, reads = calls("evalsha"), calls("hmget")
    for _ in range(10):
        assert b.futures.done("done") is True
        assert b.futures.running("running") is True
    assert calls("evalsha") == scripts
    assert calls("hmget") == reads + 20
    # A key popped elsewhere is forgotten at the first read that finds it gone: the reads
    # after that one are one script each, with no plain read first.
    assert a.futures.pop("done").result() == 3
    assert b.futures.done("done") is None
    scripts, reads = calls("evalsha"), calls("hmget")
    for _ in range(5):
        assert b.futures.done("done") is None
    assert (calls("evalsha"), calls("hmget")) == (scripts + 5, reads)
    gate.set()


@pytest.mark.timeout(60)
def test_redis_store_loads_its_scripts_again_after_redis_forgot_them(redis_url, redis_executors):
    # SCRIPT FLUSH, as a restart of Redis or another client can do: every operation is a
    # script called by its digest, which Redis then no longer knows.
    _, executor = redis_executors(redis_url, "flushed")
    assert redis_finished(executor, "before", executor.submit_stored("before", redis_add, 1, 2)) == 3
    redis_client(redis_url).script_flush()
    assert executor.futures.done("before") is True
    assert redis_finished(executor, "after", executor.submit_stored("after", redis_add, 2, 2)) == 4
    assert executor.futures.keys() == ["before", "after"]
    assert executor.futures.pop("before").result() == 3


@pytest.mark.timeout(60)
def test_redis_claim_after_the_owners_mark_expired_marks_the_owner_alive_again(redis_url, redis_executors):
    # A claim marks its process alive only when it has not done so within a heartbeat; a
    # process idle for longer than the mark lasts must mark itself again, or readers in
    # other processes would take its new task for lost until the next heartbeat.
    _, executor = redis_executors(redis_url, "idle")
    client = redis_client(redis_url)
    mark = "flask_executor:owner:" + flask_executor._this_process.token
    assert redis_finished(executor, "first", executor.submit_stored("first", redis_add, 1, 1)) == 2
    assert client.pttl(mark) > 0
    # No unfinished task: the heartbeat stops renewing the mark, and it expires.
    assert wait_for_condition(lambda: not client.exists(mark), timeout=15)
    gate = threading.Event()
    try:
        executor.submit_stored("second", gate.wait, REDIS_WAIT)
        assert client.pttl(mark) > 0, "the claim left its owner unmarked: readers elsewhere see TaskLost"
    finally:
        gate.set()


@pytest.mark.timeout(60)
def test_shared_store_refuses_a_key_that_is_no_text_or_whole_number_and_runs_nothing(
    redis_or_sqlite_store, redis_executors
):
    _, executor = redis_executors(redis_or_sqlite_store, "bad_keys")
    ran = []
    with pytest.raises(TypeError, match="strings or whole numbers"):
        executor.submit_stored(("a", 1), ran.append, "tuple")
    with pytest.raises(ValueError, match="not valid text"):
        executor.submit_stored("broken-\ud800", ran.append, "surrogate")
    assert executor.futures.keys() == [] and ran == []
    assert executor.submit_stored("fine-\u00e9", ran.append, "ok").result(REDIS_WAIT) is None
    assert ran == ["ok"] and executor.futures.keys() == ["fine-\u00e9"]


# ---------------------------------------------------------------------------------------------
# The store's own connections to Redis


@pytest.mark.timeout(60)
def test_redis_store_works_at_once_after_the_server_restarted_under_its_idle_connections(
    redis_servers, redis_executors
):
    # The store keeps its connections open between commands. A restart of Redis closes
    # them all; the first command after it must go out on a new connection, not fail.
    server = redis_servers()
    _, executor = redis_executors(server.url(), "restarted")
    assert redis_finished(executor, "before", executor.submit_stored("before", redis_add, 1, 2)) == 3
    server.stop()
    server.restart()  # empty: nothing is persisted
    assert executor.futures.done("before") is None
    assert redis_finished(executor, "after", executor.submit_stored("after", redis_add, 2, 2)) == 4
    assert executor.futures.keys() == ["after"]


@pytest.mark.timeout(60)
def test_redis_command_that_timed_out_leaves_no_late_reply_for_the_next_command(
    redis_url, redis_executors, monkeypatch
):
    # A reply that comes after its command timed out must never be read as the reply of a
    # later command: here, "missing" times out, and a late "no such key" would make
    # "present" read as absent.
    monkeypatch.setattr(flask_executor, "_STORE_WAIT_SECONDS", 0.5)
    _, executor = redis_executors(redis_url, "late_reply")
    assert redis_finished(executor, "present", executor.submit_stored("present", redis_add, 1, 1)) == 2
    redis_client(redis_url).execute_command("CLIENT", "PAUSE", 1500, "ALL")
    started = time.monotonic()
    with pytest.raises(flask_executor.StoreError, match="Timeout"):
        executor.futures.done("missing")
    assert time.monotonic() - started < 1.4, "the command waited for the pause to end"
    time.sleep(max(0.0, started + 2.0 - time.monotonic()))  # the pause is over: the late reply came
    assert executor.futures.done("present") is True
    assert executor.futures.done("missing") is None


REDIS_FORK_SCRIPT = """
import ctypes
import os
import sys

sys.path.insert(0, sys.argv[1])
from flask import Flask

from flask_executor import Executor

app = Flask("redis_fork")
app.config.update(SECRET_KEY="s", EXECUTOR_FUTURES_STORE=sys.argv[2], EXECUTOR_MAX_WORKERS=2)
executor = Executor(app)
assert executor.submit_stored("before", int, "7").result(timeout=10) == 7
while not executor.futures.done("before"):  # the worker's last write is made: its connection idle
    pass
# Python's fork runs the fork hooks; a fork made in C (as uWSGI makes its workers) does not.
fork = os.fork if sys.argv[3] == "python" else ctypes.PyDLL(None).fork
pid = fork()
side = "child" if pid == 0 else "parent"
try:
    # Both processes talk to Redis at once: on one shared socket, replies would cross.
    # Reads first: in a process forked in C, nothing else has noticed the fork before them.
    for _ in range(300):
        assert executor.futures.done("before") is True
        assert executor.futures.done(f"{side}-none") is None
    for number in range(100):
        key = f"{side}-{number}"
        future = executor.submit_stored(key, int, str(number))
        assert future.result(timeout=10) == number
        assert executor.futures.done("before") is True
        assert executor.futures.done(f"{side}-none") is None
        assert executor.futures.pop(key).result() == number
    outcome = "ok"
except BaseException as error:
    outcome = repr(error)
if pid == 0:
    print("child", outcome, flush=True)
    os._exit(0)
_, status = os.waitpid(pid, 0)
print("parent", outcome, flush=True)
print("keys", executor.futures.keys(), flush=True)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fork", ["python", "c"])
def test_redis_store_used_before_a_fork_gives_each_process_its_own_replies(redis_url, tmp_path, fork):
    script = tmp_path / "redis_fork.py"
    script.write_text(REDIS_FORK_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), REDIS_MODULE_DIR, redis_url, fork],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert sorted(result.stdout.splitlines()) == ["child ok", "keys ['before']", "parent ok"], (
        result.stdout + result.stderr
    )


# ---------------------------------------------------------------------------------------------
# A Redis outage


@pytest.mark.timeout(60)
def test_redis_outage_while_tasks_run_leaves_the_pool_running_tasks(
    redis_servers, redis_executors, redis_gates
):
    server = redis_servers()
    _, executor = redis_executors(server.url(), "outage", EXECUTOR_MAX_WORKERS=1)
    gate = redis_gates()
    first = executor.submit_stored("first", redis_hold, gate, "first")
    second = executor.submit_stored("second", redis_add, 1, 2)  # accepted, waits for the one worker
    assert wait_for_condition(lambda: executor.futures.running("first"))

    server.stop()  # the store goes away while "first" runs and "second" waits
    try:
        gate.set()
        assert first.result(timeout=REDIS_WAIT) == "first"  # this process has it, store or not
        done, _ = concurrent.futures.wait([second], timeout=10)
        assert second in done, "a task accepted before the outage never completed"
        assert executor.submit(redis_add, 2, 3).result(timeout=10) == 5
    finally:
        server.restart()  # so that this process's heartbeat can say it is done, and go quiet


# ---------------------------------------------------------------------------------------------
# Dask and Redis together: tasks run on a Dask cluster, their state in Redis, two app servers


@pytest.fixture
def redis_dask_cluster(tmp_path):
    """A Dask cluster on 127.0.0.1 whose workers are threads of this process (reached over
    TCP by the app servers); the task module's folder is on sys.path for them."""
    import distributed  # here: only this test needs Dask

    folder = tmp_path / "app"
    folder.mkdir()
    redis_write_app_modules(folder)
    sys.path.insert(0, str(folder))
    cluster = distributed.LocalCluster(
        n_workers=1,
        threads_per_worker=2,
        processes=False,
        host="127.0.0.1",
        protocol="tcp",
        dashboard_address=None,
    )
    try:
        yield types.SimpleNamespace(cluster=cluster, folder=folder)
    finally:
        cluster.close()
        sys.path.remove(str(folder))
        sys.modules.pop("redis_dask_tasks", None)


@pytest.mark.timeout(120)
def test_redis_task_submitted_on_one_app_server_runs_on_dask_and_the_other_reads_its_state_and_result(
    redis_servers, redis_dask_cluster
):
    server = redis_servers()
    folder = redis_dask_cluster.folder
    scheduler = redis_dask_cluster.cluster.scheduler_address
    started = []
    try:
        started.append(
            RedisAppServer(folder, "dask-a", server.url(), extra_env={"REDIS_TEST_DASK_SCHEDULER": scheduler})
        )
        started.append(RedisAppServer(folder, "dask-b", server.url()))
        a, b = started
        key, go = redis_new_key("on-dask"), folder / "go"

        assert a.start(key, "dask_wait_for_file_then_double", str(go), 21) == (200, {"started": True})
        assert wait_for_condition(lambda: b.state(key).get("running")), (b.state(key), a.log_text())
        go.write_text("go")
        answer = b.result(key, timeout=REDIS_WAIT)
        assert answer["kind"] == "result", (answer, a.log_text())
        ran = answer["value"]
        assert ran["value"] == 42
        assert ran["saw_file"] is True
        assert ran["pid"] == os.getpid()  # on the Dask worker, a thread of this process, not in gunicorn
        assert "Dask" in ran["thread"]
        assert a.state(key) == {
            "found": True,
            "done": True,
            "running": False,
            "cancelled": False,
            "progress": None,
        }
        assert b.pop(key)["value"]["value"] == 42
        assert a.state(key) == {"found": False}
    finally:
        for app_server in started:
            app_server.stop()


# ================================================================================================
# The shared store on SQLite: every worker process of a server shares stored futures
# ================================================================================================
# Tests: the shared futures store (EXECUTOR_FUTURES_STORE = a SQLite file), with real processes.
#
# Every process that names the file shares ``executor.futures``. The tests drive real
# processes: "agents" (a small script, STORE_AGENT_SCRIPT, that binds an Executor to the
# store and runs commands sent as JSON lines on its stdin), gunicorn servers on 127.0.0.1,
# Flask-Shell2HTTP under gunicorn, and a hammer of 8 processes x 4 threads. The pytest
# process itself is often the reader ("R"), with an Executor of its own on the same file.
#
# Conventions (to be merged into test_flask_executor.py): module-level helpers and
# fixtures start with ``store_`` (classes with ``Store``), tests are named for the
# behaviour they check, every wait is bounded, network only to 127.0.0.1, and only
# processes started here are signalled (gunicorn workers are children of a master
# started here).
#
# Running as root: root bypasses permission bits, so "a directory this process cannot
# write" cannot be made with chmod alone. That check runs in a child process started
# through ``setpriv`` with CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH dropped (still uid 0,
# but now bound by the mode bits like any owner); when setpriv cannot do that, the test
# is skipped and says why. Not as root, it runs in this process.
#
# Some tests write straight into the SQLite file with the sqlite3 module (to tamper with
# an entry); they rely on the schema's table ``tasks`` with columns ``namespace``,
# ``key`` (``"s:" + key`` for a string key), ``state``, ``outcome`` and ``progress``,
# and check that each such write changed exactly one row.

STORE_WAIT = 30  # generous bound for anything the tests wait for
STORE_SECRET = "shared-store-test-secret"
STORE_MODULE_DIR = os.path.dirname(os.path.abspath(flask_executor.__file__))
STORE_KEY = "EXECUTOR_FUTURES_STORE"


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def store_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [STORE_MODULE_DIR] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    return env


def store_files(path):
    return [Path(str(path) + suffix) for suffix in ("", "-wal", "-shm")]


def store_sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def store_wait_for_gate(gate, limit=60):
    """A task for executors of this process: waits until the file ``gate`` exists."""
    deadline = time.monotonic() + limit
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {gate} never opened")
        time.sleep(0.01)
    return "opened"


def store_append_line(path, text):
    with open(path, "a") as file:
        file.write(text + "\n")
    return text


def store_square(number):
    return number * number


class StoreMarkerOnUnpickle:
    """Unpickling this creates the file at ``path``: what a forged store entry would do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def store_evil_blob(marker):
    """32 bytes where the signature goes, then a pickle that creates ``marker`` when loaded."""
    return os.urandom(32) + pickle.dumps(StoreMarkerOnUnpickle(marker))


def store_tamper(path, key, column, value, namespace="EXECUTOR_"):
    """Writes ``value`` into ``column`` of the entry under ``key``, straight into the file."""
    assert column in ("outcome", "progress", "state")
    db = sqlite3.connect(str(path), timeout=10, isolation_level=None)
    try:
        changed = db.execute(
            f"UPDATE tasks SET {column} = ? WHERE namespace = ? AND key = ?", (value, namespace, "s:" + key)
        ).rowcount
    finally:
        db.close()
    assert changed == 1, f"the tamper of {key!r} changed {changed} rows: has the schema changed?"


def store_raw_row_count(path):
    db = sqlite3.connect(str(path), timeout=10)
    try:
        return db.execute("SELECT count(*) FROM tasks").fetchone()[0]
    finally:
        db.close()


def store_app_errors(caplog, app, text=""):
    return [
        r
        for r in caplog.records
        if r.name == app.logger.name and r.levelno == logging.ERROR and text in r.getMessage()
    ]


def store_process_state(pid):
    """The one-letter state of a process (R, S, T, Z...), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def store_gone(pid):
    return store_process_state(pid) in (None, "Z", "X")


# --- agents: real processes bound to the store, driven by JSON commands -----------------

STORE_AGENT_SCRIPT = r"""
import concurrent.futures, json, logging, os, sys, threading, time, traceback
from flask import Flask
import flask_executor
from flask_executor import Executor, report_progress

settings = json.loads(sys.argv[1])
name = settings.pop("__name", "")
app = Flask("store_agent_%d" % os.getpid())
app.config.update(settings)
records = []


class Keep(logging.Handler):
    def emit(self, record):
        records.append([record.levelname, record.getMessage()])


app.logger.addHandler(Keep())
app.logger.setLevel(logging.DEBUG)
try:
    executor = Executor(app, name=name)
except Exception as error:
    print(json.dumps({"init_error": type(error).__name__, "message": str(error)}), flush=True)
    sys.exit(0)
handles = {}


def gated(gate, started=None, value=None):
    if started:
        with open(started, "a") as file:
            file.write("%d\n" % os.getpid())
    deadline = time.monotonic() + 60
    count = 0
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError("gate %s never opened" % gate)
        count += 1
        report_progress(count, None, "waiting")
        time.sleep(0.02)
    return value


def give(value):
    return value


def fail(message):
    raise LookupError(message)


def unpicklable():
    return threading.Lock()


def mark(path, value=None):
    with open(path, "a") as file:
        file.write("%d\n" % os.getpid())
    return value


def progress_then_give(value):
    report_progress(3, 3, "all done")
    return value


def payload(size):
    return "x" * size


TASKS = {f.__name__: f for f in (gated, give, fail, unpicklable, mark, progress_then_give, payload)}


def describe(value):
    if isinstance(value, BaseException):
        return {"exception": type(value).__name__, "message": str(value)}
    if isinstance(value, flask_executor.Progress):
        return {"progress": [value.done, value.total, value.message]}
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return {"type": type(value).__name__}
    return {"value": value}


def sizes(path):
    return [os.path.getsize(path + s) if os.path.exists(path + s) else 0 for s in ("", "-wal", "-shm")]


def fork_submit(keys):
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        message = "{}"
        try:
            os.close(read_fd)
            before = len(records)
            outcomes = []
            for key in keys:
                try:
                    outcomes.append(executor.submit_stored(key, give, key).result(10))
                except Exception as error:
                    outcomes.append("%s: %s" % (type(error).__name__, error))
            message = json.dumps({"records": records[before:], "outcomes": outcomes})
        except BaseException:
            message = json.dumps({"error": traceback.format_exc()})
        finally:
            os.write(write_fd, message.encode())
            os._exit(0)
    os.close(write_fd)
    chunks = []
    while True:
        chunk = os.read(read_fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_fd)
    os.waitpid(pid, 0)
    return json.loads(b"".join(chunks))


def burst(prefix, count, size, batch, checkpoints):
    measured = []
    done = 0
    while done < count:
        futures = [
            executor.submit_stored("%s%d" % (prefix, done + i), payload, size) for i in range(batch)
        ]
        for future in futures:
            future.result(30)
        done += batch
        if done in checkpoints:
            measured.append([done] + sizes(app.config["EXECUTOR_FUTURES_STORE"]))
    return measured


def run(op):
    kind = op["op"]
    args = op.get("args", [])
    if kind == "submit":
        value = executor.submit_stored(op["key"], TASKS[op["fn"]], *args)
    elif kind == "futures":
        method = op["method"]
        if method == "contains":
            value = args[0] in executor.futures
        elif method == "len":
            value = len(executor.futures)
        else:
            value = getattr(executor.futures, method)(*args)
    elif kind == "compat_get":
        value = executor.futures._futures.get(op["key"])
    elif kind == "handle":
        value = getattr(handles[op["handle"]], op["method"])
        if callable(value):
            value = value(*args)
    elif kind == "logs":
        value = records
    elif kind == "fork_submit":
        value = fork_submit(op["keys"])
    elif kind == "burst":
        value = burst(op["prefix"], op["count"], op["size"], op["batch"], op["checkpoints"])
    elif kind == "exit":
        os._exit(0)
    else:
        raise ValueError("unknown op %r" % kind)
    if op.get("as"):
        handles[op["as"]] = value
    return value


print(json.dumps({"ready": os.getpid()}), flush=True)
for line in sys.stdin:
    op = json.loads(line)
    try:
        answer = {"ok": describe(run(op))}
    except BaseException as error:
        answer = {"raised": describe(error), "traceback": traceback.format_exc()}
    print(json.dumps(answer), flush=True)
"""


class StoreAgent:
    """A real process with an Executor bound to the store, driven by JSON commands."""

    def __init__(self, directory, config):
        script = Path(directory) / "store_agent.py"
        if not script.exists():
            script.write_text(STORE_AGENT_SCRIPT)
        self.stderr_path = Path(directory) / f"store_agent_{uuid.uuid4().hex[:8]}.stderr"
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, str(script), json.dumps(config)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=store_env(),
                text=True,
            )
        self._lines = queue.Queue()
        threading.Thread(target=self._read_lines, daemon=True).start()
        first = self._next(STORE_WAIT)
        self.init_error = first if "init_error" in first else None
        self.pid = first.get("ready")

    def _read_lines(self):
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _next(self, timeout):
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"agent {self.proc.pid} did not answer in {timeout} s:\n{self.stderr()}"
            ) from None
        if line is None:
            raise AssertionError(f"agent {self.proc.pid} exited:\n{self.stderr()}")
        return json.loads(line)

    def stderr(self):
        return self.stderr_path.read_text(errors="replace")[-4000:]

    def send(self, **op):
        self.proc.stdin.write(json.dumps(op) + "\n")
        self.proc.stdin.flush()

    def request(self, timeout=STORE_WAIT, **op):
        self.send(**op)
        return self._next(timeout)

    def ok(self, timeout=STORE_WAIT, **op):
        """The plain value of a command that must succeed."""
        answer = self.request(timeout=timeout, **op)
        assert "ok" in answer, (op, answer)
        described = answer["ok"]
        return described.get("value", described)

    def submit(self, key, fn, *args, handle=None):
        return self.ok(op="submit", key=key, fn=fn, args=list(args), **({"as": handle} if handle else {}))

    def futures(self, method, *args, timeout=STORE_WAIT):
        """Calls ``executor.futures.<method>(*args)`` there; returns its answer as described."""
        return self.request(timeout=timeout, op="futures", method=method, args=list(args))

    def value(self, method, *args):
        answer = self.futures(method, *args)
        assert "ok" in answer, (method, args, answer)
        return answer["ok"].get("value", answer["ok"])

    def logs(self):
        return self.ok(op="logs")

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.send(op="exit")
            except (BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture
def store_path(tmp_path):
    return tmp_path / "futures.db"


@pytest.fixture
def store_agents(tmp_path, store_path):
    """Factory: store_agents(**config) -> a StoreAgent on ``store_path`` with SECRET_KEY set."""
    made = []

    def start(**config):
        settings = {"SECRET_KEY": STORE_SECRET, STORE_KEY: str(store_path)}
        settings.update(config)
        settings = {k: v for k, v in settings.items() if v is not None}
        agent = StoreAgent(tmp_path, settings)
        made.append(agent)
        assert agent.init_error is None, agent.init_error
        return agent

    yield start
    for agent in made:
        agent.stop()


@pytest.fixture
def store_gates(tmp_path):
    """Factory of gate files (paths); every gate is opened at teardown so no task stays blocked."""
    gates = []

    def make():
        gate = tmp_path / f"gate-{uuid.uuid4().hex[:8]}"
        gates.append(gate)
        return str(gate)

    yield make
    for gate in gates:
        Path(gate).touch()


@pytest.fixture
def store_busy_owner(store_agents, store_local, store_gates):
    """Factory: store_busy_owner(key, value) -> (owner, reader, gate): an owner process whose
    one worker runs the task ``key`` until the gate opens (then returns ``value``), so that
    what the test submits next waits; and a reader in this process."""

    def start(key, value):
        owner = store_agents(EXECUTOR_MAX_WORKERS=1)
        _, reader = store_local()
        gate = store_gates()
        owner.submit(key, "gated", gate, None, value)
        return owner, reader, gate

    return start


@pytest.fixture
def store_local(store_path):
    """Factory: an app and an Executor in this process on ``store_path``: the reader R."""
    made = []

    def make(path=None, name="", **config):
        app = Flask(f"store_reader_{uuid.uuid4().hex[:8]}")
        app.config.update(SECRET_KEY=STORE_SECRET)
        app.config[STORE_KEY] = str(store_path if path is None else path)
        app.config.update(config)
        executor = Executor(app, name=name)
        made.append(executor)
        return app, executor

    yield make
    for executor in made:
        executor.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------
# Reading, waiting, cancelling and popping from any process
# ---------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_any_process_reads_state_progress_and_keys_of_a_task_accepted_by_another(
    store_agents, store_local, store_gates
):
    owner = store_agents(EXECUTOR_MAX_WORKERS=4)
    _, reader = store_local()
    gate = store_gates()
    owner.submit("q-run", "gated", gate, None, {"made": "by the owner"})
    owner.submit("q-ok", "give", {"n": 1, "list": [1, 2], "text": "é"})
    owner.submit("q-fail", "fail", "nope")
    futures = reader.futures

    assert wait_for_condition(lambda: futures.done("q-ok") and futures.done("q-fail"))
    assert wait_for_condition(lambda: futures.running("q-run"))
    assert "q-run" in futures and "q-ok" in futures and "missing" not in futures
    assert futures.done("q-run") is False
    assert futures.cancelled("q-run") is False
    assert futures._state("q-run") == "RUNNING"
    assert futures._state("q-ok") == "FINISHED"
    assert futures.done("missing") is None and futures.result("missing") is None
    assert futures.keys() == ["q-run", "q-ok", "q-fail"]
    assert len(futures) == 3

    # results and exceptions travel pickled
    assert futures.result("q-ok", 5) == {"n": 1, "list": [1, 2], "text": "é"}
    assert futures.exception("q-ok", 5) is None
    error = futures.exception("q-fail", 5)
    assert type(error) is LookupError and error.args == ("nope",)
    with pytest.raises(LookupError, match="nope"):
        futures.result("q-fail", 5)

    # progress is live: it grows while the task runs
    first = wait_for_condition(lambda: futures.progress("q-run"))
    assert isinstance(first, Progress) and first.done >= 1 and first.message == "waiting"
    assert wait_for_condition(lambda: futures.progress("q-run").done > first.done)

    # result(key, timeout) waits across processes: times out, then gets the value
    with pytest.raises(concurrent.futures.TimeoutError):
        futures.result("q-run", 0.2)
    with concurrent.futures.ThreadPoolExecutor(1) as waiter:
        waiting = waiter.submit(futures.result, "q-run", STORE_WAIT)
        time.sleep(0.2)
        assert not waiting.done()
        Path(gate).touch()
        assert waiting.result(STORE_WAIT) == {"made": "by the owner"}
    assert futures.done("q-run") is True and futures.running("q-run") is False

    # and the other way round: the owner reads a task the reader accepted
    reader.submit_stored("r-own", store_square, 12)
    assert wait_for_condition(lambda: owner.value("done", "r-own"))
    assert owner.value("result", "r-own", 5) == 144
    assert owner.value("keys") == ["q-run", "q-ok", "q-fail", "r-own"]
    assert owner.value("len") == 4


@pytest.mark.timeout(90)
def test_futures_mapping_of_1_0_gives_working_futures_for_tasks_of_another_process(store_busy_owner):
    owner, reader, gate = store_busy_owner("c-run", "ran")
    owner.submit("c-wait", "give", "never")
    owner.submit("c-after", "give", "after")
    mapping = reader.futures._futures
    assert mapping.get("missing") is None
    assert wait_for_condition(lambda: reader.futures.running("c-run"))

    running = mapping.get("c-run")
    assert running.done() is False and running.running() is True and running.cancelled() is False
    assert running.cancel() is False  # running: cannot be cancelled
    with pytest.raises(concurrent.futures.TimeoutError):
        running.result(0.1)

    waiting = mapping.get("c-wait")
    assert waiting.running() is False and waiting.done() is False
    assert waiting.cancel() is True
    assert waiting.cancelled() is True and waiting.done() is True
    with pytest.raises(concurrent.futures.CancelledError):
        waiting.result(1)

    Path(gate).touch()
    assert running.result(STORE_WAIT) == "ran"
    assert running.exception(1) is None
    assert mapping.get("c-after").result(STORE_WAIT) == "after"
    assert mapping.get("c-run").done() is True


@pytest.mark.timeout(90)
def test_task_waiting_for_a_worker_is_cancelled_from_another_process_and_never_runs(
    store_busy_owner, tmp_path
):
    owner, reader, gate = store_busy_owner("x-run", "first")
    ran = tmp_path / "cancelled-task-ran"
    owner.submit("x-wait", "mark", str(ran), "never", handle="submitted")
    owner.submit("x-after", "give", "after")
    futures = reader.futures
    assert wait_for_condition(lambda: futures.running("x-run"))
    assert futures._state("x-wait") == "PENDING"

    assert futures.cancel("x-wait") is True
    assert futures.cancel("x-run") is False  # running: cannot be cancelled
    for view in (reader.futures.cancelled, lambda k: owner.value("cancelled", k)):
        assert view("x-wait") is True
    assert futures.done("x-wait") is True and futures._state("x-wait") == "CANCELLED"
    assert owner.value("_state", "x-wait") == "CANCELLED"
    with pytest.raises(concurrent.futures.CancelledError):
        futures.result("x-wait", 1)

    Path(gate).touch()
    # one worker, first in first out: x-after finishing means the worker has passed x-wait
    assert futures.result("x-after", STORE_WAIT) == "after"
    assert not ran.exists(), "the cancelled task ran"
    assert owner.ok(op="handle", handle="submitted", method="cancelled") is True
    assert futures.result("x-run", STORE_WAIT) == "first"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("popper", ["reader", "owner"])
def test_task_cancelled_elsewhere_and_popped_before_a_worker_reached_it_never_runs(
    store_busy_owner, tmp_path, popper
):
    owner, reader, gate = store_busy_owner("y-run", "first")
    ran = tmp_path / "cancelled-and-popped-task-ran"
    owner.submit("y-wait", "mark", str(ran), "never")
    owner.submit("y-after", "give", "after")
    futures = reader.futures
    assert wait_for_condition(lambda: futures.running("y-run"))
    assert futures.cancel("y-wait") is True
    # the usual clean-up of a cancelled task, before a worker got to it
    if popper == "reader":
        assert futures.pop("y-wait").cancelled() is True
    else:
        assert owner.value("pop", "y-wait") is not None
    Path(gate).touch()
    # one worker, first in first out: y-after finishing means the worker has passed y-wait
    assert futures.result("y-after", STORE_WAIT) == "after"
    assert not ran.exists(), f"a task cancelled, then popped by the {popper}, before a worker reached it ran"
    if popper == "owner":  # the owner deleted the entry it kept no longer
        db = sqlite3.connect(reader.futures._store.backend._path)
        try:
            assert db.execute("SELECT count(*) FROM tasks WHERE key IS NULL").fetchone()[0] == 0
        finally:
            db.close()


@pytest.mark.timeout(90)
def test_future_got_by_key_then_popped_here_after_it_finished_still_gives_its_result(
    store_busy_owner,
):
    # 1.0's recipe, Flask-Shell2HTTP's report: future = futures._futures.get(key), then
    # futures.pop(key), then future.result(). When the task finishes between the get and the
    # pop, the pop deletes the entry; the future got first must still read the result.
    owner, reader, gate = store_busy_owner("g-run", {"report": "done"})
    assert wait_for_condition(lambda: reader.futures.running("g-run"))
    got = reader.futures._futures.get("g-run")
    Path(gate).touch()
    assert wait_for_condition(lambda: owner.value("done", "g-run"))
    assert reader.futures.pop("g-run") is not None
    assert got.result(STORE_WAIT) == {"report": "done"}
    assert "g-run" not in reader.futures


@pytest.mark.timeout(90)
def test_cancel_of_a_stored_future_read_before_its_key_was_taken_again_leaves_the_new_task_alone(
    store_agents, store_local, store_gates
):
    # B reads "job"; A pops it (it keeps running) and submits "job" again, which waits for
    # A's one worker. B's cancel() is about the task it read, which runs: the new one stays.
    owner = store_agents(EXECUTOR_MAX_WORKERS=1)
    _, reader = store_local()
    first_gate, second_gate = store_gates(), store_gates()
    owner.submit("job", "gated", first_gate, None, "first")
    assert wait_for_condition(lambda: reader.futures.running("job"))
    read_before = reader.futures._futures.get("job")
    assert owner.value("pop", "job") is not None
    owner.submit("job", "gated", second_gate, None, "second")
    assert reader.futures._state("job") == "PENDING"

    assert read_before.cancel() is False, "cancel() of a running task said True"
    assert reader.futures.cancelled("job") is False
    assert owner.value("cancelled", "job") is False
    Path(first_gate).touch()
    Path(second_gate).touch()
    assert reader.futures.result("job", STORE_WAIT) == "second"


@pytest.mark.timeout(60)
def test_store_task_dropped_while_it_waited_still_runs_as_in_the_memory_store(
    redis_or_sqlite_store, redis_executors, caplog
):
    # Over EXECUTOR_FUTURES_MAX_LENGTH with every entry unfinished, the oldest are dropped:
    # only their keys are forgotten, and their tasks run, as with the in-memory store.
    _, executor = redis_executors(
        redis_or_sqlite_store, "dropped", EXECUTOR_FUTURES_MAX_LENGTH=2, EXECUTOR_MAX_WORKERS=1
    )
    gate, ran = threading.Event(), []

    def task(name):
        if name == "a":
            gate.wait(REDIS_WAIT)
        ran.append(name)
        return name

    with caplog.at_level(logging.WARNING):
        futures = {name: executor.submit_stored(name, task, name) for name in "abcd"}
    assert executor.futures.keys() == ["c", "d"]
    assert "Stopped tracking" in caplog.text
    gate.set()
    assert {name: future.result(REDIS_WAIT) for name, future in futures.items()} == {n: n for n in "abcd"}
    assert ran == ["a", "b", "c", "d"]


@pytest.mark.timeout(90)
def test_cancel_from_another_process_logs_no_lost_task_warning_in_the_owner(store_busy_owner):
    owner, reader, gate = store_busy_owner("w-run", "first")
    owner.submit("w-wait", "give", "never")
    owner.submit("w-after", "give", "after")
    assert wait_for_condition(lambda: reader.futures.running("w-run"))
    assert reader.futures.cancel("w-wait") is True
    Path(gate).touch()
    assert reader.futures.result("w-after", STORE_WAIT) == "after"
    warnings = [message for level, message in owner.logs() if level in ("WARNING", "ERROR")]
    assert warnings == [], (
        "a task cancelled from another process was logged by its owner as reported lost: " + repr(warnings)
    )


@pytest.mark.timeout(90)
def test_cancelling_a_waiting_task_twice_does_not_make_the_owners_running_task_lost(store_busy_owner):
    owner, reader, gate = store_busy_owner("d-run", "finished")
    owner.submit("d-wait", "give", "never")
    assert wait_for_condition(lambda: reader.futures.running("d-run"))
    # two requests served by the owner cancel the same waiting task: both say True
    assert owner.value("cancel", "d-wait") is True
    assert owner.value("cancel", "d-wait") is True

    # the running task's owner is alive: for longer than the heartbeat expiry (5 s),
    # readers elsewhere must keep seeing it running, never lost
    deadline = time.monotonic() + 7
    while time.monotonic() < deadline:
        state = reader.futures._state("d-run")
        assert state == "RUNNING", (
            f"the running task of a live owner read {state} after a waiting task was cancelled twice: "
            + repr(reader.futures.exception("d-run", 0) if state == "FINISHED" else None)
        )
        time.sleep(0.2)
    Path(gate).touch()
    assert reader.futures.result("d-run", STORE_WAIT) == "finished"


@pytest.mark.timeout(90)
def test_pop_from_another_process_removes_the_key_everywhere_and_the_popper_can_wait(
    store_agents, store_local, store_gates
):
    owner = store_agents(EXECUTOR_MAX_WORKERS=4)
    other = store_agents()
    _, reader = store_local()
    gate = store_gates()
    owner.submit("p-done", "give", "done value")
    owner.submit("p-run", "gated", gate, None, "original")
    owner.submit("p-own", "gated", gate, None, "popped by its owner")
    futures = reader.futures
    assert wait_for_condition(lambda: futures.done("p-done") and futures.running("p-run"))
    assert len(futures) == 3

    popped = futures.pop("p-done")
    assert popped.result(1) == "done value"
    assert "p-done" not in futures
    assert other.value("contains", "p-done") is False
    assert owner.value("contains", "p-done") is False
    assert owner.value("pop", "p-done") is None
    assert futures.keys() == ["p-run", "p-own"] == other.value("keys")

    # an unfinished task, popped: gone everywhere at once, the key is free again,
    # and the popper still gets the original task's value
    unfinished = futures.pop("p-run")
    assert unfinished is not None and unfinished.done() is False
    assert "p-run" not in futures
    assert other.value("contains", "p-run") is False
    assert owner.value("contains", "p-run") is False
    assert futures.pop("p-run") is None
    other.submit("p-run", "give", "the next task under the key")
    assert wait_for_condition(lambda: futures.done("p-run"))
    assert futures.result("p-run", 1) == "the next task under the key"

    # the owner pops its own unfinished task: gone everywhere, and it can wait on it
    assert owner.ok(op="futures", method="pop", args=["p-own"], **{"as": "own"}) == {"type": "TaskFuture"}
    assert "p-own" not in futures and other.value("contains", "p-own") is False

    Path(gate).touch()
    assert unfinished.result(STORE_WAIT) == "original"
    assert owner.ok(op="handle", handle="own", method="result", args=[STORE_WAIT]) == "popped by its owner"
    assert futures.keys() == ["p-run"] == owner.value("keys")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("popper", ["owner", "another_process"])
def test_future_read_through_1_0_mapping_stays_usable_after_the_key_is_popped(
    store_agents, store_local, store_gates, popper
):
    # Flask-Shell2HTTP's GET ?wait=true: future = futures._futures.get(key); futures.pop(key);
    # future.result(). 1.0's mapping handed out the future itself, which popping did not change.
    owner = store_agents(EXECUTOR_MAX_WORKERS=2)
    gate = store_gates()
    owner.submit("s2h", "gated", gate, None, {"report": "hello"})
    if popper == "owner":
        actor = owner
    else:
        actor = store_agents()
    assert wait_for_condition(lambda: actor.value("running", "s2h"))
    got = actor.ok(op="compat_get", key="s2h", **{"as": "got"})
    assert isinstance(got, dict) and "type" in got, got  # a future-like object, not None
    actor.value("pop", "s2h")
    timer = threading.Timer(0.3, Path(gate).touch)
    timer.start()
    try:
        answer = actor.request(op="handle", handle="got", method="result", args=[STORE_WAIT])
    finally:
        timer.cancel()
        Path(gate).touch()
    assert answer.get("ok") == {"value": {"report": "hello"}}, (
        f"popped by the {popper}, the future read before the pop failed: {answer.get('raised')}"
    )


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "duplicate_from", ["a_process_that_never_submitted", "a_process_that_submitted_before", "the_owner"]
)
def test_key_in_use_in_any_process_is_refused_before_anything_runs(
    store_agents, store_local, store_gates, tmp_path, duplicate_from
):
    owner = store_agents(EXECUTOR_MAX_WORKERS=4)
    gate = store_gates()
    ran = tmp_path / "duplicate-ran"
    owner.submit("one", "gated", gate, None, "the first")
    if duplicate_from == "the_owner":
        actor = owner
    else:
        actor = store_agents(EXECUTOR_MAX_WORKERS=4)
        if duplicate_from == "a_process_that_submitted_before":
            actor.submit("warm-up", "give", "warm")
            assert actor.value("result", "warm-up", STORE_WAIT) == "warm"
    answer = actor.request(op="submit", key="one", fn="mark", args=[str(ran), "the duplicate"])
    assert answer.get("raised", {}).get("exception") == "ValueError", (
        f"a key in use, submitted from {duplicate_from.replace('_', ' ')}, was not refused: {answer}"
    )
    assert "one" in answer["raised"]["message"]
    assert actor.value("keys").count("one") == 1
    Path(gate).touch()
    assert actor.value("result", "one", STORE_WAIT) == "the first"
    time.sleep(0.2)
    assert not ran.exists(), "the refused duplicate ran"


@pytest.mark.timeout(90)
def test_unpicklable_result_is_real_in_the_owner_and_a_store_error_elsewhere(store_agents, store_local):
    owner = store_agents()
    _, reader = store_local()
    owner.submit("lock", "unpicklable")
    assert wait_for_condition(lambda: reader.futures.done("lock"))
    assert owner.ok(op="futures", method="result", args=["lock", 5]) == {"type": "lock"}
    with pytest.raises(StoreError) as raised:
        reader.futures.result("lock", 5)
    message = str(raised.value)
    assert "'lock'" in message and "pickle" in message, message
    other = store_agents()
    answer = other.futures("result", "lock", 5)
    assert answer["raised"]["exception"] == "StoreError", answer


# ---------------------------------------------------------------------------
# Lost tasks
# ---------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_tasks_of_a_killed_process_read_task_lost_and_a_live_owners_task_does_not(
    store_agents, store_local, store_gates
):
    live = store_agents(EXECUTOR_MAX_WORKERS=2)
    doomed = store_agents(EXECUTOR_MAX_WORKERS=1)
    _, reader = store_local()
    gate = store_gates()
    live.submit("alive", "gated", gate, None, "still here")
    doomed.submit("doomed-running", "gated", gate, None, "never")
    doomed.submit("doomed-waiting", "give", "never")
    futures = reader.futures
    assert wait_for_condition(lambda: futures.running("alive") and futures.running("doomed-running"))
    assert futures._state("doomed-waiting") == "PENDING"

    os.kill(doomed.proc.pid, signal.SIGKILL)
    doomed.proc.wait(timeout=10)
    # read within a few seconds (heartbeat expiry ~5 s); the live owner's task keeps running
    deadline = time.monotonic() + 20
    while not (futures.done("doomed-running") and futures.done("doomed-waiting")):
        assert time.monotonic() < deadline, "the tasks of a killed process stayed unfinished"
        assert futures._state("alive") == "RUNNING"
        time.sleep(0.1)
    for key in ("doomed-running", "doomed-waiting"):
        assert isinstance(futures.exception(key, 1), TaskLost), futures.exception(key, 1)
        with pytest.raises(TaskLost):
            futures.result(key, 1)
        assert futures.running(key) is False and futures.cancelled(key) is False
        assert futures._state(key) == "FINISHED"
    assert futures.done("alive") is False and futures._state("alive") == "RUNNING"

    # a process started afterwards reads them lost too
    later = store_agents()
    for key in ("doomed-running", "doomed-waiting"):
        assert later.futures("exception", key, 5)["ok"]["exception"] == "TaskLost"
    assert live.futures("result", "doomed-running", 5)["raised"]["exception"] == "TaskLost"
    Path(gate).touch()
    assert futures.result("alive", STORE_WAIT) == "still here"


# ---------------------------------------------------------------------------
# Bounds: max length, TTL, file size
# ---------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_max_length_is_store_wide_dropping_finished_entries_first_oldest_first(
    store_agents, store_local, store_gates
):
    first = store_agents(EXECUTOR_MAX_WORKERS=8, EXECUTOR_FUTURES_MAX_LENGTH=4)
    second = store_agents(EXECUTOR_MAX_WORKERS=8, EXECUTOR_FUTURES_MAX_LENGTH=4)
    _, reader = store_local(EXECUTOR_MAX_WORKERS=8, EXECUTOR_FUTURES_MAX_LENGTH=4)
    gate = store_gates()
    futures = reader.futures

    def finished(agent, key):
        agent.submit(key, "give", key)
        assert wait_for_condition(lambda: futures.done(key))

    finished(first, "m-f1")
    second.submit("m-u1", "gated", gate)
    finished(first, "m-f2")
    finished(second, "m-f3")
    assert futures.keys() == ["m-f1", "m-u1", "m-f2", "m-f3"]
    first.submit("m-n1", "gated", gate)
    assert futures.keys() == ["m-u1", "m-f2", "m-f3", "m-n1"]  # the oldest finished went
    second.submit("m-n2", "gated", gate)
    assert futures.keys() == ["m-u1", "m-f3", "m-n1", "m-n2"]
    reader.submit_stored("m-n3", store_wait_for_gate, gate)
    assert futures.keys() == ["m-u1", "m-n1", "m-n2", "m-n3"]
    for agent in (first, second):
        assert agent.value("keys") == ["m-u1", "m-n1", "m-n2", "m-n3"]
        assert agent.value("len") == 4
    # none finished: the oldest of all goes, with a warning where it was dropped
    first.submit("m-n4", "gated", gate)
    assert futures.keys() == ["m-n1", "m-n2", "m-n3", "m-n4"] == second.value("keys")
    assert len(futures) == 4
    assert any(level == "WARNING" and "'m-u1'" in message for level, message in first.logs())


@pytest.mark.timeout(60)
def test_store_never_hands_out_the_id_of_a_deleted_entry_again(store_local, store_path):
    # A reader, or the task's own process, may still hold the id of an entry that was
    # popped: a new entry under that id would be read, or written, as the old one.
    _, executor = store_local()
    backend = executor.futures._store.backend
    backend.beat("owner-a", alive=True)
    newest = None
    for key in ("s:first", "s:second", "s:third"):
        newest, _ = backend.claim(key, "owner-a", 0)
    assert backend.transition(newest, "owner-a", ("PENDING",), "FINISHED", outcome=b"x")
    assert backend.pop("s:third").id == newest  # finished: deleted, and it held the highest id
    assert backend.read_entry(newest) is None
    again, _ = backend.claim("s:fourth", "owner-a", 0)
    assert again > newest
    assert backend.read_entry(newest) is None
    # and from a process that starts afresh on the file
    _, later = store_local()
    later_backend = later.futures._store.backend
    later_backend.delete(again)
    assert later_backend.claim("s:fifth", "owner-b", 0)[0] > again


# The layout of store files made by earlier development builds (before 2.0.0): ids from
# AUTOINCREMENT, and an insert trigger that counted and dropped, and never refused.
STORE_EARLIER_LAYOUT = (
    "PRAGMA journal_mode = WAL",
    f"PRAGMA application_id = {0x46455846}",
    "CREATE TABLE tasks (id INTEGER PRIMARY KEY AUTOINCREMENT, namespace TEXT NOT NULL,"
    " key TEXT, state TEXT NOT NULL, owner TEXT NOT NULL, outcome BLOB, progress BLOB, finished REAL)",
    "CREATE UNIQUE INDEX tasks_by_key ON tasks (namespace, key)",
    "CREATE INDEX finished_tasks ON tasks (namespace, id) WHERE finished IS NOT NULL",
    "CREATE TABLE owners (owner TEXT PRIMARY KEY, seen REAL NOT NULL) WITHOUT ROWID",
    "CREATE TABLE namespaces (namespace TEXT PRIMARY KEY, tasks INTEGER NOT NULL DEFAULT 0,"
    " max_length INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID",
    "CREATE TRIGGER inserted AFTER INSERT ON tasks BEGIN"
    " INSERT INTO namespaces (namespace, tasks) VALUES (new.namespace, 1)"
    " ON CONFLICT (namespace) DO UPDATE SET tasks = tasks + 1;"
    " DELETE FROM tasks WHERE id IN (SELECT id FROM tasks WHERE namespace = new.namespace"
    " AND finished IS NOT NULL ORDER BY id LIMIT coalesce((SELECT max(0, tasks - max_length)"
    " FROM namespaces WHERE namespace = new.namespace AND max_length > 0), 0)); END",
    "CREATE TRIGGER deleted AFTER DELETE ON tasks BEGIN"
    " UPDATE namespaces SET tasks = tasks - 1 WHERE namespace = old.namespace; END",
)


@pytest.mark.timeout(60)
def test_store_file_of_an_earlier_build_is_taken_over_counting_each_entry_once_and_reusing_no_id(
    store_local, store_path
):
    db = sqlite3.connect(store_path, isolation_level=None)
    for statement in STORE_EARLIER_LAYOUT:
        db.execute(statement)
    insert = (
        "INSERT INTO tasks (namespace, key, state, owner, finished)"
        " VALUES ('EXECUTOR_', ?, 'FINISHED', 'x', 1)"
    )
    for key in ("s:e-old-1", "s:e-old-2", "s:e-old-3"):
        db.execute(insert, (key,))
    db.execute("DELETE FROM tasks WHERE key = 's:e-old-3'")  # the newest: id 3 must never come back
    db.close()
    store_path.chmod(0o600)

    _, executor = store_local(EXECUTOR_FUTURES_MAX_LENGTH=3)
    db = sqlite3.connect(store_path)
    triggers = sorted(name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'"))
    assert triggers == ["bounded", "deleted"]
    gate = threading.Event()
    try:
        for key in ("e-1", "e-2", "e-3", "e-4"):
            executor.submit_stored(key, gate.wait, STORE_WAIT)
        ids = dict(db.execute("SELECT key, id FROM tasks WHERE key LIKE 's:e-_'").fetchall())
        # counted once each: finished entries went first, then only the oldest unfinished one
        assert executor.futures.keys() == ["e-2", "e-3", "e-4"]
        assert len(executor.futures) == 3
        assert min(ids.values()) > 3, ids
    finally:
        gate.set()
        db.close()


@pytest.mark.timeout(90)
def test_finished_entries_past_the_ttl_are_gone_from_contains_keys_and_len(
    store_agents, store_local, store_gates
):
    owner = store_agents(EXECUTOR_MAX_WORKERS=4, EXECUTOR_FUTURES_TTL=1)
    _, reader = store_local(EXECUTOR_FUTURES_TTL=1)
    gate = store_gates()
    owner.submit("t-unfinished", "gated", gate)
    owner.submit("t-1", "give", 1)
    owner.submit("t-2", "give", 2)
    futures = reader.futures
    assert wait_for_condition(lambda: futures.done("t-1") and futures.done("t-2"))
    assert wait_for_condition(lambda: "t-1" not in futures and "t-2" not in futures, timeout=10)
    assert futures.done("t-2") is None
    # no new task was submitted since: readers alone must not see expired keys
    assert futures.keys() == ["t-unfinished"], "keys() lists finished entries past their TTL"
    assert len(futures) == 1, "len() counts finished entries past their TTL"
    assert owner.value("keys") == ["t-unfinished"]


@pytest.mark.timeout(90)
def test_key_of_an_expired_entry_is_free_and_unfinished_entries_never_expire(
    store_agents, store_local, store_gates
):
    owner = store_agents(EXECUTOR_MAX_WORKERS=4, EXECUTOR_FUTURES_TTL=1)
    _, reader = store_local(EXECUTOR_FUTURES_TTL=1)
    gate = store_gates()
    owner.submit("e-unfinished", "gated", gate, None, "late")
    owner.submit("e-1", "give", "first")
    futures = reader.futures
    assert wait_for_condition(lambda: futures.done("e-1"))
    assert wait_for_condition(lambda: "e-1" not in futures, timeout=10)
    assert reader.submit_stored("e-1", store_square, 3).result(STORE_WAIT) == 9
    assert futures.result("e-1", 5) == 9
    time.sleep(0.5)  # well past the TTL since the unfinished one was accepted
    assert "e-unfinished" in futures and futures.running("e-unfinished") is True
    Path(gate).touch()
    assert futures.result("e-unfinished", STORE_WAIT) == "late"


@pytest.mark.timeout(90)
def test_store_file_stays_small_under_a_long_run_with_a_small_max_length(store_agents, store_path):
    agents = [store_agents(EXECUTOR_MAX_WORKERS=4, EXECUTOR_FUTURES_MAX_LENGTH=10) for _ in range(2)]
    for index, agent in enumerate(agents):
        agent.send(op="burst", prefix=f"b{index}-", count=1000, size=2000, batch=5, checkpoints=[300, 1000])
    measured = [agent._next(120) for agent in agents]
    for answer in measured:
        assert "ok" in answer, answer
    # [tasks done, db bytes, wal bytes, shm bytes] at 300 and 1000 tasks of each process
    (mid, end), (mid2, end2) = (answer["ok"]["value"] for answer in measured)
    db, wal, _ = (os.path.getsize(f) if f.exists() else 0 for f in store_files(store_path))
    sizes = {"mid": [mid, mid2], "end": [end, end2], "after": [db, wal]}
    print("store sizes after 2 x 1000 tasks of 2 KB with max_length 10:", sizes)
    assert len(agents[0].value("keys")) <= 10
    assert store_raw_row_count(store_path) <= 10 + 2
    assert db <= 1024 * 1024, sizes
    assert wal <= 8 * 1024 * 1024, sizes
    assert max(end[1], end2[1]) <= max(mid[1], mid2[1]) + 256 * 1024, sizes


# ---------------------------------------------------------------------------
# Without the store: forked workers
# ---------------------------------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("name", "store", "key"),
    [
        ("", False, "EXECUTOR_FUTURES_STORE"),
        ("reports", False, "REPORTS_EXECUTOR_FUTURES_STORE"),
        ("", True, None),
    ],
    ids=["default_executor", "named_executor", "with_a_store"],
)
def test_forked_process_warns_once_that_stored_futures_are_per_process(store_agents, name, store, key):
    prefix = f"{name.upper()}_" if name else ""
    config = {"__name": name, f"{prefix}EXECUTOR_MAX_WORKERS": 2}
    if not store:
        config[STORE_KEY] = None  # the fixture's default store is not set
    parent = store_agents(**config)
    child = parent.ok(op="fork_submit", keys=["f-1", "f-2", "f-3"])
    assert "error" not in child, child
    assert child["outcomes"] == ["f-1", "f-2", "f-3"]
    warnings = [message for level, message in child["records"] if level == "WARNING"]
    if key is None:
        assert warnings == []
    else:
        assert len(warnings) == 1, warnings
        assert "per process" in warnings[0]
        assert key in warnings[0], f"the warning does not name {key}: {warnings[0]}"
    # the process that bound the executor is not a forked one: no warning there
    parent.submit("p-1", "give", 1)
    assert parent.value("result", "p-1", STORE_WAIT) == 1
    assert [m for level, m in parent.logs() if level == "WARNING"] == []


# ---------------------------------------------------------------------------
# Security: file modes, SECRET_KEY, signed entries
# ---------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_store_file_and_its_wal_files_are_created_private(store_local, store_path):
    previous = os.umask(0)  # even with an open umask
    try:
        _, executor = store_local()
        assert executor.submit_stored("m", store_square, 2).result(STORE_WAIT) == 4
        assert wait_for_condition(lambda: executor.futures.done("m"))
        files = store_files(store_path)
        assert all(f.exists() for f in files), [f.name for f in files if not f.exists()]
        modes = {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files}
        assert set(modes.values()) == {"0o600"}, modes
    finally:
        os.umask(previous)


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "how", ["world_writable", "group_writable", "wal_world_writable", "owned_by_another_user"]
)
def test_store_file_that_others_can_write_is_refused(store_local, store_path, tmp_path, how):
    if how == "wal_world_writable":
        store_path.write_bytes(b"")  # a private (new) store file, beside a WAL file others can write
        store_path.chmod(0o600)
        wal = Path(str(store_path) + "-wal")
        wal.write_bytes(b"")
        wal.chmod(0o666)
        target = wal
    else:
        store_path.write_bytes(b"")
        target = store_path
        if how == "world_writable":
            store_path.chmod(0o666)
        elif how == "group_writable":
            store_path.chmod(0o620)
        else:
            if os.geteuid() != 0:
                pytest.skip("only root can give a file to another user")
            store_path.chmod(0o600)
            os.chown(store_path, 1, 1)  # uid 1 (daemon) owns it, and can write it
    with pytest.raises(ValueError) as raised:
        store_local()
    message = str(raised.value)
    assert STORE_KEY in message and str(target) in message, message


@pytest.mark.timeout(90)
def test_init_app_refuses_the_store_without_a_secret_key(store_path):
    app = Flask("store_no_secret")
    app.config[STORE_KEY] = str(store_path)
    with pytest.raises(ValueError) as raised:
        Executor(app)
    message = str(raised.value)
    assert STORE_KEY in message and "SECRET_KEY" in message and "signed" in message, message
    assert not store_path.exists()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("field", ["result", "exception", "progress"])
def test_tampered_entry_is_not_unpickled_and_the_reader_gets_a_store_error(
    store_agents, store_local, store_path, tmp_path, caplog, field
):
    caplog.set_level(logging.ERROR)
    owner = store_agents()
    reader_app, reader = store_local()
    key, task, args = {
        "result": ("t-result", "give", [{"fine": True}]),
        "exception": ("t-exception", "fail", ["fine"]),
        "progress": ("t-progress", "progress_then_give", ["fine"]),
    }[field]
    owner.submit(key, task, *args)
    futures = reader.futures
    assert wait_for_condition(lambda: futures.done(key))
    read = {
        "result": lambda: futures.result(key, 1),
        "exception": lambda: futures.exception(key, 1),
        "progress": lambda: futures.progress(key),
    }[field]
    read()  # untampered, it reads
    marker = tmp_path / "unpickled-marker"
    blob = store_evil_blob(marker)
    pickle.loads(blob[32:])  # the payload is live: loading it creates the marker
    assert marker.exists()
    marker.unlink()

    store_tamper(store_path, key, "progress" if field == "progress" else "outcome", blob)
    with pytest.raises(StoreError) as raised:
        read()
    assert not marker.exists(), "a tampered entry was unpickled"
    assert key in str(raised.value) and "signature" in str(raised.value)
    assert store_app_errors(caplog, reader_app, repr(key)), "no ERROR on app.logger about the tampering"


@pytest.mark.timeout(90)
def test_store_written_with_another_secret_key_is_refused(store_agents, store_local, caplog, store_gates):
    caplog.set_level(logging.ERROR)
    owner = store_agents(EXECUTOR_MAX_WORKERS=2)
    reader_app, reader = store_local(SECRET_KEY="another-secret")
    gate = store_gates()
    owner.submit("k-result", "give", 1)
    owner.submit("k-exception", "fail", "x")
    owner.submit("k-progress", "gated", gate)
    futures = reader.futures
    assert wait_for_condition(lambda: futures.done("k-result") and futures.done("k-exception"))
    for read in (lambda: futures.result("k-result", 1), lambda: futures.exception("k-exception", 1)):
        with pytest.raises(StoreError, match="signature"):
            read()

    def progress_refused():
        """Whether the reader's progress() refused the entry; False while none is stored yet."""
        try:
            progress = futures.progress("k-progress")
        except StoreError as error:
            assert "signature" in str(error), error
            return True
        assert progress is None, f"progress signed with another SECRET_KEY was read: {progress}"
        return False

    assert wait_for_condition(progress_refused), "no progress reached the store"
    assert len(store_app_errors(caplog, reader_app, "signature")) >= 3


@pytest.mark.timeout(90)
def test_signed_outcome_copied_to_another_entry_is_refused(store_agents, store_local, store_path, caplog):
    caplog.set_level(logging.ERROR)
    owner = store_agents()
    reader_app, reader = store_local()
    owner.submit("moved-from", "give", "the outcome of another task")
    owner.submit("moved-to", "give", "its own outcome")
    assert wait_for_condition(lambda: reader.futures.done("moved-from") and reader.futures.done("moved-to"))
    db = sqlite3.connect(str(store_path), timeout=10)
    try:
        (signed,) = db.execute("SELECT outcome FROM tasks WHERE key = ?", ("s:moved-from",)).fetchone()
    finally:
        db.close()
    store_tamper(store_path, "moved-to", "outcome", signed)  # a genuine signature, on another entry
    with pytest.raises(StoreError, match="signature"):
        reader.futures.result("moved-to", 1)
    assert store_app_errors(caplog, reader_app, "'moved-to'")
    assert reader.futures.result("moved-from", 1) == "the outcome of another task"


@pytest.mark.timeout(90)
def test_finished_entry_without_an_outcome_gives_a_store_error(store_agents, store_local, store_path):
    owner = store_agents()
    _, reader = store_local()
    owner.submit("no-outcome", "give", 1)
    assert wait_for_condition(lambda: reader.futures.done("no-outcome"))
    store_tamper(store_path, "no-outcome", "outcome", None)
    with pytest.raises(StoreError):
        reader.futures.result("no-outcome", 1)


# ---------------------------------------------------------------------------
# Bad input at init_app
# ---------------------------------------------------------------------------


STORE_INIT_SCRIPT = r"""
import json, sys
from flask import Flask
from flask_executor import Executor
app = Flask("store_init")
app.config.update(SECRET_KEY="s", EXECUTOR_FUTURES_STORE=sys.argv[1])
try:
    Executor(app)
except Exception as error:
    print(json.dumps({"error": type(error).__name__, "message": str(error)}))
else:
    print(json.dumps({"error": None}))
"""


def store_init_without_dac_override(tmp_path, path):
    """init_app as root without the capabilities that bypass permission bits (see the module docstring)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip(
            "running as root, and setpriv is missing to drop CAP_DAC_OVERRIDE: root ignores chmod 500"
        )
    script = tmp_path / "store_init.py"
    script.write_text(STORE_INIT_SCRIPT)
    drop = "-dac_override,-dac_read_search"
    probe = subprocess.run(
        [
            setpriv,
            f"--inh-caps={drop}",
            f"--bounding-set={drop}",
            sys.executable,
            "-c",
            f"import os; print(os.access({str(Path(path).parent)!r}, os.W_OK))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if probe.returncode != 0 or probe.stdout.strip() != "False":
        pytest.skip(f"running as root, and setpriv could not drop CAP_DAC_OVERRIDE: {probe.stderr.strip()}")
    done = subprocess.run(
        [setpriv, f"--inh-caps={drop}", f"--bounding-set={drop}", sys.executable, str(script), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=store_env(),
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "case", ["missing_directory", "read_only_directory", "corrupt_file", "other_programs_sqlite", "text_file"]
)
def test_init_app_refuses_an_unusable_store_file_naming_the_key_and_the_path(tmp_path, case):
    path = tmp_path / "store.db"
    if case == "missing_directory":
        path = tmp_path / "no-such-dir" / "store.db"
    elif case == "read_only_directory":
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o500)
        path = folder / "store.db"
    elif case == "corrupt_file":
        path.write_bytes(random.Random(7).randbytes(8192))
    elif case == "text_file":
        path.write_text("not a database\n" * 100)
    else:
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        db.execute("INSERT INTO users (name) VALUES ('ada')")
        db.commit()
        db.close()
    before = store_sha256(path) if path.exists() else None
    try:
        error, message = store_try_init_app(tmp_path, path, case)
    finally:
        if case == "read_only_directory":
            path.parent.chmod(0o700)
    assert error == "ValueError", (case, error, message)
    assert STORE_KEY in message and str(path) in message, message
    if before is not None:
        assert store_sha256(path) == before, "init_app changed the file it refused"
    if case == "other_programs_sqlite":
        db = sqlite3.connect(path)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        db.close()


def store_try_init_app(tmp_path, path, case):
    """(exception type name or None, message) of binding an Executor to the store at ``path``."""
    if case == "read_only_directory" and os.geteuid() == 0:
        outcome = store_init_without_dac_override(tmp_path, path)
        print("read-only directory checked as root without CAP_DAC_OVERRIDE (setpriv):", outcome)
        return outcome["error"], outcome.get("message", "")
    app = Flask(f"store_bad_{case}")
    app.config.update(SECRET_KEY="s")
    app.config[STORE_KEY] = str(path)
    try:
        executor = Executor(app)
    except Exception as raised:
        return type(raised).__name__, str(raised)
    executor.shutdown()
    return None, ""


# ---------------------------------------------------------------------------
# A stuck writer
# ---------------------------------------------------------------------------


STORE_LOCKER_SCRIPT = r"""
import os, signal, sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
if sys.argv[2] == "sigstop":
    os.kill(os.getpid(), signal.SIGSTOP)
time.sleep(float(sys.argv[3]))
db.execute("COMMIT")
"""


def store_start_locker(tmp_path, path, how, hold=60):
    script = tmp_path / "store_locker.py"
    script.write_text(STORE_LOCKER_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(path), how, str(hold)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    if how == "sigstop":
        assert wait_for_condition(lambda: store_process_state(proc.pid) == "T", timeout=10)
    return proc


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["sleeping", "sigstop"])
def test_store_held_by_a_stuck_writer_fails_submit_stored_after_a_bounded_wait(
    store_local, store_path, tmp_path, how
):
    _, executor = store_local()
    assert executor.submit_stored("before", store_square, 2).result(STORE_WAIT) == 4
    ran = tmp_path / "ran-while-locked"
    locker = store_start_locker(tmp_path, store_path, how)
    try:
        outcome = {}

        def attempt():
            try:
                outcome["future"] = executor.submit_stored("locked", store_append_line, str(ran), "x")
            except BaseException as error:
                outcome["error"] = error

        thread = threading.Thread(target=attempt, daemon=True)
        thread.start()
        # reads never wait for the writer
        assert "before" in executor.futures and executor.futures.keys() == ["before"]
        thread.join(20)
        assert not thread.is_alive(), "submit_stored hung on a locked store"
        assert isinstance(outcome.get("error"), StoreError), outcome
        assert "locked" in str(outcome["error"])
        assert not ran.exists()
    finally:
        locker.kill()
        locker.wait(timeout=10)
    # the writer gone, the store works again
    assert executor.submit_stored("locked", store_square, 5).result(STORE_WAIT) == 25
    assert wait_for_condition(lambda: executor.futures.done("locked"))


@pytest.mark.timeout(60)
def test_store_locked_while_a_task_finishes_leaves_the_pool_working_and_the_task_done(
    store_local, store_agents, store_path, tmp_path
):
    _, executor = store_local(EXECUTOR_MAX_WORKERS=1)
    gate = threading.Event()
    future = executor.submit_stored("finishes-while-locked", gate.wait, STORE_WAIT)
    assert wait_for_condition(lambda: executor.futures.running("finishes-while-locked"))
    locker = store_start_locker(tmp_path, store_path, "sleeping", hold=7)  # a writer stuck for 7 s
    try:
        gate.set()
        assert future.result(STORE_WAIT) is True
        locker.wait(timeout=30)
    finally:
        if locker.poll() is None:
            locker.kill()
            locker.wait(timeout=10)
    # the worker thread survived the failed write, and runs the next task
    try:
        assert executor.submit(store_square, 3).result(15) == 9
    except concurrent.futures.TimeoutError:
        pytest.fail("the pool's worker thread died: the store was locked when its task finished")
    # and no process reads RUNNING forever for a task that finished (its value, or at
    # worst TaskLost, once the owner stops beating for it)
    assert wait_for_condition(lambda: executor.futures.done("finishes-while-locked"), timeout=15), (
        executor.futures._state("finishes-while-locked")
    )
    other = store_agents()
    assert wait_for_condition(lambda: other.value("done", "finishes-while-locked"), timeout=20), other.value(
        "_state", "finishes-while-locked"
    )
    answer = other.futures("result", "finishes-while-locked", 1)
    print("read elsewhere after the stuck writer:", answer.get("ok") or answer.get("raised"))
    assert answer.get("ok") == {"value": True} or answer["raised"]["exception"] == "TaskLost", answer


# ---------------------------------------------------------------------------
# Group commit: the writes of one process's threads share a transaction
# ---------------------------------------------------------------------------


def store_wal_frames(path):
    """Frames in the WAL file since it was last emptied (a checkpoint from another connection)."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        return db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
    finally:
        db.close()


def store_empty_wal(path):
    db = sqlite3.connect(path, isolation_level=None)
    try:
        assert db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0, "the WAL stayed busy"
    finally:
        db.close()


def store_queue_behind_held_lock(backend, calls, while_held=lambda: None):
    """Runs each of ``calls`` in a thread of its own while this thread holds the store's write
    lock, so that all of them queue; calls ``while_held()``, then lets them go. Returns each
    call's result or error."""
    outcomes = [None] * len(calls)

    def run(index, call):
        try:
            outcomes[index] = ("ok", call())
        except Exception as error:
            outcomes[index] = ("error", error)

    threads = [threading.Thread(target=run, args=(i, call)) for i, call in enumerate(calls)]
    with backend._write_lock:
        for thread in threads:
            thread.start()
        assert wait_for_condition(lambda: len(backend._queued) == len(calls), timeout=10), backend._queued
        while_held()
    for thread in threads:
        thread.join(10)
    return outcomes


@pytest.fixture
def store_backend(store_local):
    """(executor, its SQLite backend), after owner "owner-a" beat and claimed "first": the
    first claim of a store object records max_length, in a transaction of its own."""
    _, executor = store_local()
    backend = executor.futures._store.backend
    backend.beat("owner-a", alive=True)
    assert backend.claim("s:first", "owner-a", 0) is not None
    return executor, backend


@pytest.mark.timeout(60)
def test_store_commits_the_writes_that_waited_for_the_write_lock_in_one_transaction(store_local, store_path):
    _, executor = store_local()
    backend = executor.futures._store.backend
    backend.beat("owner-a", alive=True)  # so that no claim below writes a heartbeat first
    store_empty_wal(store_path)
    for i in range(8):
        assert backend.claim(f"s:alone-{i}", "owner-a", 0) is not None
    frames_alone = store_wal_frames(store_path)
    store_empty_wal(store_path)
    outcomes = store_queue_behind_held_lock(
        backend, [lambda i=i: backend.claim(f"s:grouped-{i}", "owner-a", 0) for i in range(8)]
    )
    frames_grouped = store_wal_frames(store_path)
    print(f"WAL frames for 8 claims: {frames_alone} one at a time, {frames_grouped} queued together")
    assert all(kind == "ok" and claimed is not None for kind, claimed in outcomes), outcomes
    ids = [claimed[0] for _, claimed in outcomes]
    assert len(set(ids)) == 8, "two claims were handed the same entry id"
    # every claim is committed, each under the id it was handed
    db = sqlite3.connect(store_path)
    rows = dict(db.execute("SELECT key, id FROM tasks WHERE key LIKE 's:grouped-%'").fetchall())
    db.close()
    assert sorted(rows.values()) == sorted(ids)
    assert all(rows[f"s:grouped-{i}"] == claimed[0] for i, (_, claimed) in enumerate(outcomes))
    # one commit writes each page it changed once; eight commits write them eight times
    assert frames_grouped * 2 < frames_alone


@pytest.mark.timeout(60)
def test_store_claims_of_one_key_queued_together_are_won_by_exactly_one(store_backend):
    executor, backend = store_backend
    outcomes = store_queue_behind_held_lock(backend, [lambda: backend.claim("s:contested", "owner-a", 0)] * 6)
    winners = [claimed for kind, claimed in outcomes if kind == "ok" and claimed is not None]
    assert len(winners) == 1, outcomes
    assert [kind for kind, _ in outcomes] == ["ok"] * 6, outcomes
    assert executor.futures.keys() == ["first", "contested"]


@pytest.mark.timeout(60)
def test_store_group_whose_committing_thread_cannot_open_the_file_fails_every_write_with_store_error(
    store_local, tmp_path
):
    # The directory moved away under a running app: threads that already write have their
    # connection, and a thread that writes for the first time cannot open one. If that
    # thread commits a group, every write of it fails, and none reads as a refused claim.
    directory = tmp_path / "store-dir"
    directory.mkdir()
    _, executor = store_local(path=directory / "futures.db")
    backend = executor.futures._store.backend
    backend.beat("owner-a", alive=True)
    assert backend.claim("s:first", "owner-a", 0) is not None
    outcomes = store_queue_behind_held_lock(
        backend,
        [lambda i=i: backend.claim(f"s:queued-{i}", "owner-a", 0) for i in range(4)],
        while_held=lambda: directory.rename(tmp_path / "moved-away"),
    )
    assert all(kind == "error" and isinstance(error, StoreError) for kind, error in outcomes), outcomes
    assert all("unable to open" in str(error) for _, error in outcomes), outcomes


@pytest.mark.timeout(60)
def test_store_write_whose_parameters_cannot_be_encoded_fails_alone_in_its_group(store_backend):
    # Below the public API's key check: a str that is not valid text fails in the driver,
    # before SQLite sees it; the other writes of the group must not pay for it.
    executor, backend = store_backend
    calls = [lambda i=i: backend.claim(f"s:fine-{i}", "owner-a", 0) for i in range(3)]
    calls.insert(1, lambda: backend.claim("s:broken-\ud800", "owner-a", 0))
    outcomes = store_queue_behind_held_lock(backend, calls)
    kind, error = outcomes[1]
    assert kind == "error" and isinstance(error, StoreError) and "UnicodeEncodeError" in str(error), outcomes
    assert all(kind == "ok" and claimed is not None for kind, claimed in outcomes[:1] + outcomes[2:]), (
        outcomes
    )
    assert sorted(executor.futures.keys()) == ["fine-0", "fine-1", "fine-2", "first"]


@pytest.mark.timeout(60)
def test_store_write_interrupted_while_it_waited_for_the_lock_never_runs_later(store_backend):
    # A signal's exception (a worker's timeout, Ctrl-C) in a thread that waits to write:
    # its caller saw it fail, so the next thread to commit must not run it.
    executor, backend = store_backend
    held, release = threading.Event(), threading.Event()

    def hold():
        with backend._write_lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(10)

    class Interrupted(Exception):
        pass

    def interrupt(signum, frame):
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(Interrupted):
            backend.claim("s:interrupted", "owner-a", 0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        release.set()
        holder.join(10)
    assert backend._queued == []
    assert backend.claim("s:after", "owner-a", 0) is not None
    assert executor.futures.keys() == ["first", "after"]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="sqlite3.Connection.setlimit() is Python 3.11+")
@pytest.mark.timeout(60)
def test_store_write_that_fails_in_a_group_fails_alone_and_the_others_commit(store_local, store_path):
    _, executor = store_local()
    backend = executor.futures._store.backend
    backend.beat("owner-a", alive=True)
    claimed = backend.claim("s:big-progress", "owner-a", 0)
    big_id = claimed[0]

    def limited(call):
        # A blob longer than the connection allows fails in SQLite, as one past SQLite's
        # own limit (a gigabyte) would; whichever thread commits the group uses its connection.
        def run():
            backend._connection().setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 10_000)
            return call()

        return run

    calls = [limited(lambda i=i: backend.claim(f"s:beside-{i}", "owner-a", 0)) for i in range(3)]
    calls.insert(
        1,
        limited(lambda: backend.transition(big_id, "owner-a", ("PENDING",), None, progress=b"x" * 100_000)),
    )
    outcomes = store_queue_behind_held_lock(backend, calls)
    kind, error = outcomes[1]
    assert kind == "error" and isinstance(error, StoreError), outcomes
    assert "too big" in str(error)
    assert all(kind == "ok" and claimed is not None for kind, claimed in outcomes[:1] + outcomes[2:]), (
        outcomes
    )
    assert sorted(executor.futures.keys()) == ["beside-0", "beside-1", "beside-2", "big-progress"]
    assert backend.read("s:big-progress").progress is None, "the failed write was kept"


# ---------------------------------------------------------------------------
# Many processes and threads at once
# ---------------------------------------------------------------------------


STORE_HAMMER_SCRIPT = r"""
import concurrent.futures, json, os, random, sys, threading, time
from flask import Flask
from flask_executor import Executor

path, secret, key_count, seconds, log_path, out_path, seed, start_at = sys.argv[1:9]
app = Flask("hammer_%d" % os.getpid())
app.config.update(
    SECRET_KEY=secret, EXECUTOR_FUTURES_STORE=path, EXECUTOR_MAX_WORKERS=2, EXECUTOR_FUTURES_MAX_LENGTH=0
)
executor = Executor(app)
log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
accepted, pops, errors = [], [], []
counts = {"refused": 0, "cancel_calls": 0}


def note(line):
    os.write(log_fd, (line + "\n").encode())


def work(key, uid, pause):
    note("start %s %s %.9f" % (key, uid, time.monotonic()))
    time.sleep(pause)
    note("end %s %s %.9f" % (key, uid, time.monotonic()))
    return uid


def hammer(thread, stop):
    rng = random.Random("%s-%d-%d" % (seed, os.getpid(), thread))
    n = 0
    while time.monotonic() < stop:
        key = "k%d" % rng.randrange(int(key_count))
        op = rng.random()
        try:
            if op < 0.5:
                n += 1
                uid = "%d-%d-%d" % (os.getpid(), thread, n)
                try:
                    executor.submit_stored(key, work, key, uid, rng.uniform(0, 0.01))
                except ValueError:
                    counts["refused"] += 1
                else:
                    accepted.append([key, uid])
            elif op < 0.8:
                called = time.monotonic()
                popped = executor.futures.pop(key)
                if popped is None:
                    continue
                try:
                    pops.append([key, called, "ok", popped.result(timeout=20)])
                except concurrent.futures.CancelledError:
                    pops.append([key, called, "cancelled", None])
                except BaseException as error:
                    pops.append([key, called, "error", "%s: %s" % (type(error).__name__, error)])
            else:
                executor.futures.cancel(key)
                counts["cancel_calls"] += 1
        except BaseException as error:
            errors.append("%s: %s" % (type(error).__name__, error))


while time.time() < float(start_at):
    time.sleep(0.005)
stop = time.monotonic() + float(seconds)
threads = [threading.Thread(target=hammer, args=(i, stop)) for i in range(4)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
executor.shutdown(wait=True)
with open(out_path, "w") as out:
    json.dump({"accepted": accepted, "pops": pops, "errors": errors, "counts": counts}, out)
"""


@pytest.mark.timeout(120)
def test_eight_processes_hammering_overlapping_keys_lose_no_task_and_run_none_twice(
    tmp_path, store_path, store_local
):
    _, sweeper = store_local()  # creates the store before the hammers start
    script = tmp_path / "store_hammer.py"
    script.write_text(STORE_HAMMER_SCRIPT)
    log_path = tmp_path / "runs.log"
    log_path.write_text("")
    start_at = time.time() + 2.0
    procs = []
    for index in range(8):
        out = tmp_path / f"hammer-{index}.json"
        stderr = open(tmp_path / f"hammer-{index}.stderr", "wb")  # noqa: SIM115 (closed below)
        procs.append(
            (
                subprocess.Popen(
                    [
                        sys.executable,
                        str(script),
                        str(store_path),
                        STORE_SECRET,
                        "20",
                        "4",
                        str(log_path),
                        str(out),
                        "seed",
                        str(start_at),
                    ],
                    stderr=stderr,
                    env=store_env(),
                ),
                out,
                stderr,
            )
        )
    reports = []
    for proc, out, stderr in procs:
        try:
            proc.wait(timeout=90)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            stderr.close()
        stderr_text = Path(stderr.name).read_text(errors="replace")
        assert proc.returncode == 0, stderr_text[-3000:]
        assert "Traceback" not in stderr_text, stderr_text[-3000:]
        reports.append(json.loads(out.read_text()))

    accepted = [tuple(a) for r in reports for a in r["accepted"]]
    pops = [p for r in reports for p in r["pops"]]
    errors = [e for r in reports for e in r["errors"]]
    # what is still stored after every hammer has finished
    remaining = sweeper.futures.keys()
    for key in remaining:
        popped = sweeper.futures.pop(key)
        try:
            pops.append([key, time.monotonic(), "ok", popped.result(STORE_WAIT)])
        except concurrent.futures.CancelledError:
            pops.append([key, time.monotonic(), "cancelled", None])
        except BaseException as error:
            pops.append([key, time.monotonic(), "error", f"{type(error).__name__}: {error}"])

    runs = {}
    for line in log_path.read_text().splitlines():
        what, key, uid, at = line.split()
        runs.setdefault(uid, {"key": key, "start": [], "end": []})[what].append(float(at))
    summary = {
        "accepted": len(accepted),
        "ran": len(runs),
        "popped": len(pops),
        "cancelled": sum(p[2] == "cancelled" for p in pops),
        "refused": sum(r["counts"]["refused"] for r in reports),
        "cancel_calls": sum(r["counts"]["cancel_calls"] for r in reports),
    }
    print("hammer:", summary)
    assert summary["accepted"] > 100 and summary["ran"] > 50, summary
    assert errors == [], errors[:10]
    failed = [p for p in pops if p[2] == "error"]
    assert failed == [], f"{len(failed)} popped tasks failed (lost?): {failed[:10]}"
    accepted_uids = {uid for _, uid in accepted}
    assert len(accepted_uids) == len(accepted)
    twice = {uid: r for uid, r in runs.items() if len(r["start"]) != 1 or len(r["end"]) != 1}
    assert twice == {}, f"tasks run twice or unfinished: {list(twice.items())[:10]}"
    assert set(runs) <= accepted_uids, (
        f"tasks ran that were never accepted: {sorted(set(runs) - accepted_uids)[:10]}"
    )
    results = [p[3] for p in pops if p[2] == "ok"]
    assert sorted(results) == sorted(runs), (
        "results popped differ from the tasks that ran: "
        f"missing {sorted(set(runs) - set(results))[:10]}, extra or repeated "
        f"{sorted(uid for uid in results if results.count(uid) != 1 or uid not in runs)[:10]}"
    )
    assert summary["accepted"] == summary["ran"] + summary["cancelled"], (
        "every accepted task must either run or be cancelled, and be popped once",
        summary,
    )
    # one key, one task: an entry holds its key from its claim to its pop, and a task runs
    # after its claim. Two runs under one key may overlap only when one of the two entries
    # was popped before the other task started (a pop frees the key; the popped task may run
    # on, untracked). Otherwise both entries held the key at once. (A pop is recorded when
    # its call began, which is before it took effect: the rule never blames a legal run.)
    popped_at = {p[3]: p[1] for p in pops if p[2] == "ok"}
    by_key = {}
    for uid, run in runs.items():
        by_key.setdefault(run["key"], []).append((run["start"][0], run["end"][0], uid))
    overlaps = []
    for key, key_runs in by_key.items():
        key_runs.sort()
        for index, (start, end, uid) in enumerate(key_runs):
            for later_start, _, later_uid in key_runs[index + 1 :]:
                if later_start >= end:
                    break
                if not (popped_at[uid] < later_start or popped_at[later_uid] < start):
                    overlaps.append((key, uid, later_uid))
    assert overlaps == [], f"two tasks held one key at once: {overlaps[:10]}"
    assert sweeper.futures.keys() == [] and len(sweeper.futures) == 0
    assert store_raw_row_count(store_path) == 0, "entries left behind in the file"


# ---------------------------------------------------------------------------
# gunicorn
# ---------------------------------------------------------------------------


STORE_GUNICORN_APP = r"""
import os
import time

from flask import Flask, jsonify, request

from flask_executor import Executor, report_progress

app = Flask(__name__)
app.config.update(
    SECRET_KEY=os.environ["STORE_SECRET"],
    EXECUTOR_FUTURES_STORE=os.environ["STORE_PATH"],
    EXECUTOR_MAX_WORKERS=1,
)
executor = Executor(app)


def gated(gate, started, tag):
    with open(started, "a") as file:
        file.write("%s %d\n" % (tag, os.getpid()))
    deadline = time.monotonic() + 60
    count = 0
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError("gate %s never opened" % gate)
        count += 1
        report_progress(count, None, "pid %d" % os.getpid())
        time.sleep(0.02)
    return {"tag": tag, "pid": os.getpid()}


def outcome(get):
    try:
        return {"value": get()}
    except BaseException as error:
        return {"exception": type(error).__name__, "message": str(error)}


@app.before_request
def hold_and_route():
    not_pid, only_pid = request.args.get("not_pid"), request.args.get("only_pid")
    if (not_pid and int(not_pid) == os.getpid()) or (only_pid and int(only_pid) != os.getpid()):
        return jsonify(pid=os.getpid(), skipped=True), 409
    time.sleep(float(request.args.get("hold", 0)))
    return None


@app.get("/pid")
def pid():
    return jsonify(pid=os.getpid())


@app.post("/submit")
def submit():
    data = request.get_json()
    accepted, refused = [], []
    for key in data["keys"]:
        try:
            executor.submit_stored(key, gated, data["gate"], data["started"], data.get("tag") or key)
        except ValueError as error:
            refused.append([key, str(error)])
        else:
            accepted.append(key)
    return jsonify(pid=os.getpid(), accepted=accepted, refused=refused)


@app.get("/query")
def query():
    key = request.args["key"]
    futures = executor.futures
    progress = futures.progress(key)
    return jsonify(
        pid=os.getpid(),
        present=key in futures,
        done=futures.done(key),
        running=futures.running(key),
        cancelled=futures.cancelled(key),
        state=futures._state(key),
        progress=None if progress is None else list(progress),
        keys=futures.keys(),
        length=len(futures),
    )


@app.post("/cancel")
def cancel():
    return jsonify(pid=os.getpid(), value=executor.futures.cancel(request.args["key"]))


@app.post("/pop")
def pop():
    popped = executor.futures.pop(request.args["key"])
    if popped is None:
        return jsonify(pid=os.getpid(), popped=False)
    answer = {"pid": os.getpid(), "popped": True, "done_at_pop": popped.done()}
    if request.args.get("wait"):
        answer.update(outcome(lambda: popped.result(float(request.args["wait"]))))
    return jsonify(answer)


@app.get("/result")
def result():
    key, timeout = request.args["key"], float(request.args.get("timeout", 0))
    return jsonify(pid=os.getpid(), **outcome(lambda: executor.futures.result(key, timeout)))
"""


STORE_SHELL2HTTP_APP = r"""
import os

from flask import Flask, jsonify
from flask_shell2http import Shell2HTTP

from flask_executor import Executor

app = Flask(__name__)
app.config.update(
    SECRET_KEY=os.environ["STORE_SECRET"],
    EXECUTOR_FUTURES_STORE=os.environ["STORE_PATH"],
    EXECUTOR_MAX_WORKERS=4,
)
executor = Executor(app)
shell2http = Shell2HTTP(app, executor, base_url_prefix="/cmd/")
shell2http.register_command(endpoint="echo", command_name="echo")
shell2http.register_command(endpoint="sleep", command_name="sleep")


@app.after_request
def tell_the_worker(response):
    response.headers["X-Worker-Pid"] = str(os.getpid())
    return response


@app.get("/pid")
def pid():
    import time
    time.sleep(0.2)
    return jsonify(pid=os.getpid())
"""


def store_http(port, method, path, payload=None, timeout=30):
    """One request on a fresh connection to 127.0.0.1; returns (status, headers, JSON or None)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        body = None if payload is None else json.dumps(payload)
        headers = {} if payload is None else {"Content-Type": "application/json"}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        raw = response.read()
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = {"raw": raw.decode(errors="replace")[:2000]}
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data
    finally:
        conn.close()


def store_all_at_once(function, items, workers=16):
    with concurrent.futures.ThreadPoolExecutor(workers) as clients:
        return list(clients.map(function, items, timeout=120))


class StoreServer:
    """A gunicorn master started here, serving ``module:app`` on 127.0.0.1 with the store."""

    def __init__(self, directory, app_text, module, workers, store_path):
        self.directory = Path(directory)
        (self.directory / f"{module}.py").write_text(app_text)
        self.module, self.workers, self.store_path = module, workers, store_path
        self.gates = []
        self.log_path = self.directory / f"gunicorn-{uuid.uuid4().hex[:6]}.log"
        self.start()

    def start(self):
        self.port = free_port()
        env = store_env()
        env["PYTHONPATH"] = os.pathsep.join([str(self.directory), env["PYTHONPATH"]])
        env.update(STORE_PATH=str(self.store_path), STORE_SECRET=STORE_SECRET)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gunicorn",
                    "--preload",
                    "-w",
                    str(self.workers),
                    "-b",
                    f"127.0.0.1:{self.port}",
                    "--graceful-timeout",
                    "3",
                    "--timeout",
                    "60",
                    "--chdir",
                    str(self.directory),
                    f"{self.module}:app",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(self.directory),
            )
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, "gunicorn exited:\n" + self.log()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, "gunicorn did not start:\n" + self.log()
                time.sleep(0.1)
        self.pids = self.find_worker_pids()

    def log(self):
        return self.log_path.read_text(errors="replace")[-6000:]

    def find_worker_pids(self):
        """Every worker's pid: concurrent requests that each hold a worker for a while."""
        seen = set()
        for _ in range(10):
            answers = store_all_at_once(
                lambda _: store_http(self.port, "GET", "/pid?hold=0.2"), range(3 * self.workers)
            )
            seen |= {data["pid"] for status, _, data in answers if status == 200}
            if len(seen) >= self.workers:
                break
        assert len(seen) == self.workers, (seen, self.log())
        return seen

    def gate(self):
        gate = self.directory / f"gate-{uuid.uuid4().hex[:8]}"
        self.gates.append(gate)
        return str(gate)

    def open_gates(self):
        for gate in self.gates:
            Path(gate).touch()

    def request(self, method, path, payload=None, timeout=30):
        status, headers, data = store_http(self.port, method, path, payload, timeout)
        return status, data

    def routed(self, method, path, payload=None, tries=60):
        """A request that a worker may skip (409, for not_pid/only_pid), retried until one serves it."""
        for _ in range(tries):
            status, data = self.request(method, path, payload)
            if status != 409:
                assert status == 200, (path, status, data, self.log())
                return data
        raise AssertionError(f"no worker served {path} in {tries} tries")

    def submit(self, keys, gate, started, tag=None, extra=""):
        status, data = self.request(
            "POST", f"/submit{extra}", {"keys": keys, "gate": gate, "started": started, "tag": tag}
        )
        assert status == 200, (status, data, self.log())
        return data

    def every_worker(self, path, check, rounds=10):
        """Sends ``path`` many times at once until every worker answered; checks each answer."""
        answered = {}
        for _ in range(rounds):
            held = f"{path}{'&' if '?' in path else '?'}hold=0.15"
            answers = store_all_at_once(
                lambda _, held=held: store_http(self.port, "GET", held), range(3 * self.workers)
            )
            for status, _, data in answers:
                assert status == 200, (path, status, data, self.log())
                check(data)
                answered[data["pid"]] = answered.get(data["pid"], 0) + 1
            if set(answered) >= self.pids:
                return answered
        raise AssertionError(f"not every worker answered {path}: {answered} of {self.pids}")

    def stop(self):
        self.open_gates()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def store_gunicorn3(tmp_path_factory):
    pytest.importorskip("gunicorn", reason="gunicorn is a test-only dependency (pip install gunicorn)")
    directory = tmp_path_factory.mktemp("gunicorn3")
    server = StoreServer(directory, STORE_GUNICORN_APP, "store_gunicorn_app", 3, directory / "futures.db")
    yield server
    server.stop()


@pytest.fixture
def store_server(store_gunicorn3):
    """The module's gunicorn -w 3, with this test's gates opened at teardown."""
    yield store_gunicorn3
    store_gunicorn3.open_gates()


@pytest.mark.timeout(120)
def test_gunicorn_every_worker_reads_state_and_live_progress_of_a_task_started_in_one(store_server):
    server = store_server
    gate = server.gate()
    started = gate + ".started"
    data = server.submit(["g-run", "g-wait"], gate, started)
    owner = data["pid"]
    assert data["accepted"] == ["g-run", "g-wait"], data
    assert wait_for_condition(lambda: Path(started).exists())

    def running(answer):
        assert answer["present"] is True and answer["running"] is True and answer["done"] is False, answer
        assert answer["cancelled"] is False and answer["state"] == "RUNNING", answer
        assert answer["progress"][0] >= 1 and answer["progress"][2] == f"pid {owner}", answer
        assert {"g-run", "g-wait"} <= set(answer["keys"]) and answer["length"] >= 2, answer

    answered = server.every_worker("/query?key=g-run", running)
    print("answers for g-run by worker pid (owner", owner, "):", answered)

    def waiting(answer):
        assert answer["state"] == "PENDING" and answer["running"] is False and answer["done"] is False, answer

    server.every_worker("/query?key=g-wait", waiting)
    # progress is live, as another worker reads it
    first = server.routed("GET", f"/query?key=g-run&not_pid={owner}")["progress"][0]
    assert wait_for_condition(
        lambda: server.routed("GET", f"/query?key=g-run&not_pid={owner}")["progress"][0] > first
    )

    Path(gate).touch()
    answer = server.routed("GET", f"/result?key=g-run&timeout=20&not_pid={owner}")
    assert answer["value"] == {"tag": "g-run", "pid": owner} and answer["pid"] != owner, answer
    answer = server.routed("GET", f"/result?key=g-wait&timeout=20&not_pid={owner}")
    assert answer["value"] == {"tag": "g-wait", "pid": owner}, answer


@pytest.mark.timeout(120)
def test_gunicorn_task_waiting_for_a_worker_is_cancelled_from_another_worker(store_server):
    server = store_server
    gate = server.gate()
    started = gate + ".started"
    owner = server.submit(["c-run", "c-wait"], gate, started)["pid"]
    assert wait_for_condition(lambda: Path(started).exists())
    answer = server.routed("POST", f"/cancel?key=c-wait&not_pid={owner}")
    assert answer["value"] is True and answer["pid"] != owner, answer
    answer = server.routed("POST", f"/cancel?key=c-run&not_pid={owner}")
    assert answer["value"] is False, answer  # running: cannot be cancelled

    def cancelled(answer):
        assert answer["cancelled"] is True and answer["done"] is True and answer["state"] == "CANCELLED", (
            answer
        )

    server.every_worker("/query?key=c-wait", cancelled)
    Path(gate).touch()
    assert server.routed("GET", "/result?key=c-run&timeout=20")["value"]["tag"] == "c-run"
    # one worker thread, first in first out: a task the owner accepts after c-wait finishing
    # means the owner's worker has passed c-wait
    after = server.routed(
        "POST", f"/submit?only_pid={owner}", {"keys": ["c-after"], "gate": gate, "started": started}
    )
    assert after["accepted"] == ["c-after"], after
    assert server.routed("GET", "/result?key=c-after&timeout=20")["value"]["tag"] == "c-after"
    lines = Path(started).read_text().split()
    assert "c-wait" not in lines, "the cancelled task ran"
    answer = server.routed("GET", f"/result?key=c-wait&timeout=5&only_pid={owner}")
    assert answer["exception"] == "CancelledError", answer


@pytest.mark.timeout(120)
def test_gunicorn_pop_from_another_worker_removes_the_key_everywhere(store_server):
    server = store_server
    gate = server.gate()
    started = gate + ".started"
    owner = server.submit(["p-run"], gate, started)["pid"]
    assert wait_for_condition(lambda: Path(started).exists())

    # another worker pops the unfinished task and waits on it
    with concurrent.futures.ThreadPoolExecutor(1) as popper:
        popping = popper.submit(server.routed, "POST", f"/pop?key=p-run&not_pid={owner}&wait=20")
        assert wait_for_condition(lambda: not server.routed("GET", "/query?key=p-run")["present"])
        assert not popping.done()
        Path(gate).touch()
        answer = popping.result(STORE_WAIT)
    assert answer["popped"] is True and answer["done_at_pop"] is False and answer["pid"] != owner, answer
    assert answer["value"] == {"tag": "p-run", "pid": owner}, answer

    def gone(answer):
        assert answer["present"] is False and "p-run" not in answer["keys"] and answer["state"] is None, (
            answer
        )

    server.every_worker("/query?key=p-run", gone)

    # a finished task, popped by another worker
    owner = server.submit(["p-done"], gate, started)["pid"]
    assert wait_for_condition(lambda: server.routed("GET", "/query?key=p-done")["done"])
    answer = server.routed("POST", f"/pop?key=p-done&not_pid={owner}&wait=5")
    assert answer["popped"] is True and answer["done_at_pop"] is True, answer
    assert answer["value"] == {"tag": "p-done", "pid": owner}, answer
    assert server.routed("POST", "/pop?key=p-done")["popped"] is False
    server.every_worker("/query?key=p-done", lambda answer: answer["present"] is False or pytest.fail(answer))


@pytest.mark.timeout(120)
def test_gunicorn_duplicate_start_is_refused_by_every_worker(store_server):
    server = store_server
    gate = server.gate()
    started = gate + ".started"
    data = server.submit(["d-run"], gate, started)
    assert data["accepted"] == ["d-run"], data
    answers = store_all_at_once(
        lambda _: store_http(
            server.port,
            "POST",
            "/submit?hold=0.15",
            {"keys": ["d-run"], "gate": gate, "started": started, "tag": "duplicate"},
        ),
        range(18),
    )
    accepted_by = sorted({data["pid"] for status, _, data in answers if data["accepted"]})
    refused_by = sorted({data["pid"] for status, _, data in answers if data["refused"]})
    print("duplicate start refused by", refused_by, "accepted by", accepted_by, "of", sorted(server.pids))
    assert all(status == 200 for status, _, _ in answers)
    assert accepted_by == [], f"workers {accepted_by} accepted a key already in use"
    assert set(refused_by) == server.pids
    Path(gate).touch()
    assert server.routed("GET", "/result?key=d-run&timeout=20")["value"]["tag"] == "d-run"
    time.sleep(0.3)
    assert [line.split()[0] for line in Path(started).read_text().splitlines()] == ["d-run"]


@pytest.mark.timeout(120)
def test_gunicorn_sigkill_of_the_worker_running_a_task_reads_task_lost_from_the_others(store_server):
    server = store_server
    gate = server.gate()
    started = gate + ".started"
    owner = server.submit(["k-run"], gate, started)["pid"]
    assert wait_for_condition(lambda: Path(started).exists())
    assert server.routed("GET", f"/query?key=k-run&not_pid={owner}")["running"] is True
    os.kill(owner, signal.SIGKILL)  # a worker of the gunicorn master started by this module
    answer = wait_for_condition(
        lambda: (lambda a: a if a["done"] else None)(server.routed("GET", "/query?key=k-run")), timeout=20
    )
    assert answer, "the task of a killed worker stayed unfinished"
    assert answer["state"] == "FINISHED" and answer["running"] is False, answer
    answer = server.routed("GET", "/result?key=k-run&timeout=5")
    assert answer["exception"] == "TaskLost" and answer["pid"] != owner, answer
    server.pids = server.find_worker_pids()  # gunicorn replaced the killed worker
    assert owner not in server.pids
    server.every_worker(
        "/result?key=k-run&timeout=5", lambda a: a["exception"] == "TaskLost" or pytest.fail(a)
    )


@pytest.mark.timeout(120)
def test_gunicorn_task_running_when_the_whole_server_restarted_reads_task_lost(tmp_path):
    pytest.importorskip("gunicorn", reason="gunicorn is a test-only dependency (pip install gunicorn)")
    server = StoreServer(tmp_path, STORE_GUNICORN_APP, "store_gunicorn_app", 3, tmp_path / "futures.db")
    try:
        gate = server.gate()
        started = gate + ".started"
        owner = server.submit(["r-run"], gate, started)["pid"]
        assert wait_for_condition(lambda: Path(started).exists())
        old_workers = set(server.pids)
        # stop everything (the worker cannot finish its task: a deploy that did not wait)
        server.proc.terminate()
        server.proc.wait(timeout=30)
        assert wait_for_condition(lambda: all(store_gone(pid) for pid in old_workers), timeout=20), (
            old_workers
        )
        server.start()  # the same store, new workers
        assert not (server.pids & old_workers)
        answer = wait_for_condition(
            lambda: (lambda a: a if a["done"] else None)(server.routed("GET", "/query?key=r-run")), timeout=20
        )
        assert answer, "a task running at the restart stayed unfinished"
        assert answer["present"] is True and answer["running"] is False, answer
        server.every_worker(
            "/result?key=r-run&timeout=5", lambda a: a["exception"] == "TaskLost" or pytest.fail(a)
        )
        assert owner in old_workers
    finally:
        server.stop()


@pytest.mark.timeout(120)
def test_flask_shell2http_under_gunicorn_finds_every_report_whichever_worker_answers(tmp_path):
    pytest.importorskip("gunicorn", reason="gunicorn is a test-only dependency (pip install gunicorn)")
    pytest.importorskip("flask_shell2http", reason="pip install --no-deps flask-shell2http (and blinker)")
    server = StoreServer(tmp_path, STORE_SHELL2HTTP_APP, "store_shell2http_app", 4, tmp_path / "futures.db")
    try:
        port = server.port

        def post(command, args):
            status, headers, data = store_http(
                port, "POST", f"/cmd/{command}", {"args": args, "force_unique_key": True}
            )
            assert status == 202, (status, data, server.log())
            assert data["status"] == "running" and data["key"] in data["result_url"], data
            return data["key"], int(headers["x-worker-pid"])

        # 40 jobs, then every report, polled with wait=false from whichever worker answers
        words = [f"job-{i}-{uuid.uuid4().hex[:6]}" for i in range(40)]
        posted = store_all_at_once(lambda word: post("echo", [word]), words)

        def report(job):
            word, (key, poster) = job
            deadline = time.monotonic() + STORE_WAIT
            while True:
                status, headers, data = store_http(port, "GET", f"/cmd/echo?key={key}&wait=false")
                assert status == 200, (word, status, data)
                if data.get("status") != "running":
                    return word, key, poster, int(headers["x-worker-pid"]), data
                assert time.monotonic() < deadline, f"job {key} still running"
                time.sleep(0.02)

        reports = store_all_at_once(report, list(zip(words, posted)), workers=10)
        for word, key, _, _, data in reports:
            assert data["key"] == key and data["report"] == word + "\n" and data["returncode"] == 0, data
            status, _, data = store_http(port, "GET", f"/cmd/echo?key={key}&wait=false")
            assert status == 404, (status, data)  # the report was popped
        served_by = {pid for *_, pid, _ in reports}
        elsewhere = sum(poster != pid for _, _, poster, pid, _ in reports)
        print(f"40 reports served by workers {sorted(served_by)}; {elsewhere} not by the poster's worker")
        assert elsewhere >= 1 and len(served_by) >= 2

        # wait=true, from the worker that runs the job and from others
        outcomes = []
        for _ in range(6):
            jobs = store_all_at_once(lambda _: post("sleep", ["0.4"]), range(8))

            def wait_for(job):
                key, poster = job
                status, headers, data = store_http(port, "GET", f"/cmd/sleep?key={key}&wait=true")
                return key, poster == int(headers["x-worker-pid"]), status, data

            outcomes += store_all_at_once(wait_for, jobs)
            if {same for _, same, _, _ in outcomes} == {True, False}:
                break
        assert {same for _, same, _, _ in outcomes} == {True, False}, "never hit both kinds of worker"
        bad = [
            (key, "owner" if same else "other", status, data)
            for key, same, status, data in outcomes
            if status != 200 or data.get("returncode") != 0 or data.get("key") != key
        ]
        assert bad == [], f"GET wait=true failed: {bad[:5]}"

        # DELETE from a worker other than the one running the job
        for _ in range(20):
            key, poster = post("sleep", ["1"])
            status, headers, data = store_http(port, "DELETE", f"/cmd/sleep?key={key}")
            if int(headers["x-worker-pid"]) != poster:
                break
        assert int(headers["x-worker-pid"]) != poster, "every DELETE reached the poster's worker"
        assert status == 204, (status, data)
        gone = store_all_at_once(
            lambda _: store_http(port, "GET", f"/cmd/sleep?key={key}&wait=false"), range(16)
        )
        assert {status for status, _, _ in gone} == {404}, gone
        assert len({int(headers["x-worker-pid"]) for _, headers, _ in gone}) >= 2
    finally:
        server.stop()


# ================================================================================================
# Real servers and faults: uWSGI, C-level forks, cancel races, configuration, floods
# ================================================================================================
# Tests: real servers (uWSGI, waitress) and the faults a reliability probe found.
#
# - uWSGI reuses the WSGI environ once a response has gone: a task must still see its own
#   request's headers, query, path and body, the body being refused once the view's request
#   has ended unread; a pool warmed in the master runs tasks in the workers (uWSGI forks in
#   C, so no fork hook runs) and the workers stop at once on SIGINT;
# - a C-level fork in general (``ctypes.PyDLL(None).fork()``). Both let the pool's threads settle
#   before the fork: a thread waiting for the GIL at a C-level fork leaves the child's GIL
#   deadlocked, whatever the library (uWSGI's ``--py-call-osafterfork`` avoids that);
# - process pools: a cancelled waiting future is reported at once to ``wait`` and
#   ``as_completed``; ``cancel()`` returning True means the task never runs; a dead worker
#   fails at most the tasks handed to workers;
# - stored futures: eviction order with many unfinished futures, ``None`` keys, and one
#   warning for a flood of evictions;
# - backpressure: a cancelled waiting task frees its ``EXECUTOR_QUEUE_SIZE`` slot at once;
# - configuration: values refused by ``init_app``, ``EXECUTOR_PROCESS_APP`` checked without
#   importing it, misspelt keys named with the closest known key;
# - arguments that cannot be pickled, refused at submit;
# - waitress: what its SIGINT leaves to accepted tasks.
#
# Conventions (to be merged into test_flask_executor.py): module-level helpers and fixtures
# start with ``srv_`` (constants ``SRV_``). Real parts only: real servers started here and
# stopped by their process group, real process pools whose workers really die, real forks;
# network traffic only to 127.0.0.1 on a free port; every wait is bounded. pyuwsgi and
# waitress are test-only dependencies (``pip install pyuwsgi waitress``), like gunicorn.

# Generous bound used whenever a test waits for something to happen.
SRV_WAIT = 30
# Python 3.12+ warns when a multi-threaded process forks; process pools fork on purpose.
SRV_FORK_WARNING = "ignore:.*use of fork\\(\\) may lead to deadlocks:DeprecationWarning"
# The module under test (the one imported above): copied next to the apps that servers load.
SRV_MODULE = Path(flask_executor.__file__).resolve()


# ---------------------------------------------------------------------------------------------
# Helpers and fixtures


def srv_make_app(tag, **config):
    """A Flask app with a name (and so a logger) of its own."""
    app = Flask(f"srv_{tag}_{uuid.uuid4().hex[:8]}", root_path=str(SRV_MODULE.parent))
    app.config.update(config)
    return app


@pytest.fixture
def srv_executors():
    """Factory of executors bound to an app; each is shut down (cancelling what waits) at
    teardown, so a failing test leaves no work behind."""
    made = []

    def make(app, name=""):
        executor = Executor(app, name=name)
        made.append(executor)
        return executor

    yield make
    for executor in made:
        executor.shutdown(wait=False, cancel_futures=True)


@pytest.fixture
def srv_gates():
    """Factory of threading.Events that block thread-pool tasks; all are set at teardown."""
    gates = []

    def make():
        gate = threading.Event()
        gates.append(gate)
        return gate

    yield make
    for gate in gates:
        gate.set()


def srv_app_warnings(caplog, app, text=""):
    """WARNING records of app.logger whose message holds text."""
    return [
        record
        for record in caplog.records
        if record.name == app.logger.name
        and record.levelno == logging.WARNING
        and text in record.getMessage()
    ]


def srv_http(port, method, path, body=None, headers=None, timeout=SRV_WAIT):
    """One request on a fresh connection to 127.0.0.1; returns (status, body bytes)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def srv_start_server(command, folder, log_path, **env_vars):
    """Starts a server in a session of its own (so that its workers can be stopped with it),
    loading apps from folder, which also gets a copy of the module under test."""
    shutil.copy(SRV_MODULE, folder / "flask_executor.py")
    env = dict(os.environ, PYTHONPATH=str(folder), PYTHONUNBUFFERED="1", **env_vars)
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            command, cwd=str(folder), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def srv_wait_for_server(proc, port, log_path, ready_file=None):
    """Waits until the server listens on port and, when given, ready_file exists (the app
    writes it once loaded: uWSGI listens before it loads the app)."""

    def ready():
        return port_open(port) and (ready_file is None or ready_file.exists())

    started = wait_for_condition(lambda: proc.poll() is not None or ready())
    assert started and proc.poll() is None, "the server did not start:\n" + log_path.read_text()


def srv_stop_group(proc):
    """Kills what is left of a server started by srv_start_server: its process group."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=SRV_WAIT)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # workers that outlived their master
    except (ProcessLookupError, PermissionError):
        pass


def srv_wait_for_exit(proc, timeout):
    """The exit code of proc, or None when it is still running after timeout seconds."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


# Task functions, at module level so that process pools can pickle them by reference.


def srv_identity(value):
    return value


def srv_touch(directory, name):
    """Records a run of the task named name, as a file: readable from any process."""
    (Path(directory) / name).touch()
    return name


def srv_wait_for_file(path, value=None):
    """Blocks a worker (thread or process) until path exists, for at most SRV_WAIT seconds."""
    if not wait_for_condition(Path(path).exists, interval=0.005):
        raise TimeoutError(f"{path} was never created")
    return value


def srv_kill_self():
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(SRV_WAIT)  # not reached


# ---------------------------------------------------------------------------------------------
# uWSGI: a reused environ, a pool warmed in the master, and a stop on SIGINT

SRV_UWSGI_APP = """
import functools
import json
import os
import threading
import time
from pathlib import Path

from flask import Flask, request

from flask_executor import Executor

OUT = Path(os.environ["SRV_OUT"])
app = Flask(__name__)
app.config["EXECUTOR_MAX_WORKERS"] = 4
executor = Executor(app)

# Warmed at import, in the uWSGI master, before it forks the workers in C: all four
# threads of the pool exist (the tasks pass the barrier only together), in the master only.
MASTER_PID = os.getpid()
meeting = threading.Barrier(4)
warm = [executor.submit(meeting.wait, 10) for _ in range(4)]
assert sorted(future.result(timeout=10) for future in warm) == [0, 1, 2, 3]
assert executor.submit(os.getpid).result(timeout=10) == MASTER_PID
# Let the pool's threads go back to waiting for work before uWSGI forks. One still waiting
# for the GIL at the fork leaves the workers' GIL deadlocked (uWSGI forks in C and, without
# --py-call-osafterfork, Python never remakes its GIL in the workers): a hazard of any
# thread in the master, which no library can prevent; see the C-level fork test below.
time.sleep(0.2)
(OUT / "master_pid.tmp").write_text(str(MASTER_PID))
(OUT / "master_pid.tmp").rename(OUT / "master_pid")  # whole, or not at all


def wait_for_release(name):
    # The test creates this file once the client has the whole response, so the task
    # reads the request after uWSGI has taken the environ back for other requests.
    release = OUT / "release" / name
    deadline = time.monotonic() + 30
    while not release.exists():
        if time.monotonic() > deadline:
            raise TimeoutError("never released")
        time.sleep(0.005)


def report(name, seen):
    path = OUT / "results" / name
    path.with_suffix(".tmp").write_text(json.dumps(seen))
    path.with_suffix(".tmp").rename(path.with_suffix(".json"))


def read_own_request(name):
    try:
        wait_for_release(name)
        seen = {
            "header": request.headers.get("X-Req-Id"),
            "query": request.args.get("q"),
            "path": request.path,
            "form": request.form.get("f"),
            "pid": os.getpid(),
        }
    except Exception as error:
        seen = {"error": repr(error)}
    report(name, seen)


def read_unread_body(name):
    seen = {"pid": os.getpid()}
    try:
        wait_for_release(name)
        for what, read in (("data", request.get_data), ("form", lambda: request.form.to_dict())):
            try:
                seen[what] = repr(read())
            except RuntimeError as error:
                seen[what] = "refused: " + str(error)
    except Exception as error:
        seen["error"] = repr(error)
    report(name, seen)


def report_failure(name, future):
    # a task that failed before its function ran (its contexts could not be pushed)
    if future.exception() is not None:
        report(name, {"error": repr(future.exception())})


@app.post("/item/<name>")
def item(name):
    executor.submit(read_own_request, name).add_done_callback(functools.partial(report_failure, name))
    # read by the view after submitting, before returning: the task reads it again later
    return {"pid": os.getpid(), "form": request.form["f"]}


@app.post("/unread/<name>")
def unread(name):
    executor.submit(read_unread_body, name).add_done_callback(functools.partial(report_failure, name))
    return {"pid": os.getpid()}
"""


@pytest.mark.timeout(180)
def test_uwsgi_tasks_see_their_own_request_run_in_workers_and_workers_stop_on_sigint(tmp_path):
    out = tmp_path / "out"
    for folder in (out, out / "release", out / "results"):
        folder.mkdir()
    (tmp_path / "srv_uwsgi_app.py").write_text(SRV_UWSGI_APP)
    port = free_port()
    log_path = tmp_path / "uwsgi.log"
    proc = srv_start_server(
        [
            sys.executable,
            "-c",
            "import sys, pyuwsgi; sys.exit(pyuwsgi.run())",
            "--http-socket",
            f"127.0.0.1:{port}",
            "--master",
            "--processes",
            "2",
            "--threads",
            "4",
            "--disable-logging",
            "--module",
            "srv_uwsgi_app:app",
        ],
        tmp_path,
        log_path,
        SRV_OUT=str(out),
    )
    try:
        srv_wait_for_server(proc, port, log_path, ready_file=out / "master_pid")
        master_pid = int((out / "master_pid").read_text())
        assert master_pid == proc.pid

        # Requests of two kinds, each with values of its own in the path, a header, the
        # query and the form; one in nine leaves its body unread.
        requests = []
        for index in range(225):
            name = f"r{index:03d}-{uuid.uuid4().hex[:8]}"
            requests.append(("unread" if index % 9 == 4 else "item", name))

        def send(kind_and_name):
            kind, name = kind_and_name
            body = f"f=form-{name}" if kind == "item" else f"data-{name}"
            status, answer = srv_http(
                port,
                "POST",
                f"/{kind}/{name}?q=query-{name}",
                body=body,
                headers={"X-Req-Id": f"header-{name}", "Content-Type": "application/x-www-form-urlencoded"},
            )
            (out / "release" / name).touch()  # the whole response is here: the task may read
            return status, json.loads(answer) if status == 200 else answer

        with concurrent.futures.ThreadPoolExecutor(8) as clients:
            answers = dict(zip(requests, clients.map(send, requests, timeout=120)))

        for (kind, name), (status, answer) in answers.items():
            assert status == 200, (name, status, answer, log_path.read_text()[-3000:])
            if kind == "item":
                assert answer["form"] == f"form-{name}", (name, answer)
        worker_pids = {answer["pid"] for _, answer in answers.values()}
        assert master_pid not in worker_pids

        # every task ran (in the worker that served its request) and saw its own request
        results = out / "results"
        all_reported = wait_for_condition(
            lambda: len(list(results.glob("*.json"))) == len(requests), timeout=60
        )
        assert all_reported, (
            f"{len(list(results.glob('*.json')))} of {len(requests)} tasks reported: the others never"
            " ran (a pool warmed in the master must run tasks in the workers)\n"
            + log_path.read_text()[-3000:]
        )
        wrong = {}
        for kind, name in requests:
            seen = json.loads((results / f"{name}.json").read_text())
            view_pid = answers[(kind, name)][1]["pid"]
            if kind == "item":
                expected = {
                    "header": f"header-{name}",
                    "query": f"query-{name}",
                    "path": f"/item/{name}",
                    "form": f"form-{name}",
                    "pid": view_pid,
                }
                if seen != expected:
                    wrong[name] = seen
            elif not (
                seen.get("pid") == view_pid
                and str(seen.get("data")).startswith("refused: ")
                and str(seen.get("form")).startswith("refused: ")
            ):
                wrong[name] = seen
        assert not wrong, f"{len(wrong)} of {len(requests)} tasks saw another request: " + repr(
            sorted(wrong.items())[:5]
        )

        # SIGINT to the master: the workers stop at once, none has to be killed
        os.kill(proc.pid, signal.SIGINT)
        code = srv_wait_for_exit(proc, timeout=15)
        log = log_path.read_text()
        assert code is not None, "uWSGI was still stopping 15 s after SIGINT:\n" + log[-3000:]
        assert "taking too much time to die" not in log and "NO MERCY" not in log, log[-3000:]
        assert "Traceback" not in log, log[-3000:]
    finally:
        srv_stop_group(proc)


# ---------------------------------------------------------------------------------------------
# A fork made in C, as uWSGI makes its workers: no fork hook runs

SRV_C_FORK_SCRIPT = """
import ctypes
import os
import signal
import sys
import threading
import time

sys.path.insert(0, sys.argv[1])
from flask import Flask

from flask_executor import Executor

app = Flask("srv_c_fork")
app.config["EXECUTOR_MAX_WORKERS"] = 2
executor = Executor(app)
# both threads of the pool exist before the fork (the tasks pass the barrier only together)
meeting = threading.Barrier(2)
assert sorted(f.result(timeout=10) for f in [executor.submit(meeting.wait, 10) for _ in range(2)]) == [0, 1]
assert executor.submit(os.getpid).result(timeout=10) == os.getpid()

# Give the pool's threads time to go back to waiting for work. A thread still waiting for the
# GIL when a process forks in C leaves the child's GIL unusable (its condition variable
# counts a waiter that does not exist there, and the next thread to release the GIL waits
# for it forever): a hazard of any C-level fork with Python threads, which no library can
# prevent, and which uWSGI's --py-call-osafterfork avoids (Python then remakes its GIL).
time.sleep(0.2)
# PyDLL keeps the GIL across the call, as a server written in C that embeds Python holds
# it when it forks (CDLL would release it, and the child could start without it).
pid = ctypes.PyDLL(None).fork()
if pid == 0:
    if sys.argv[2] == "exit-only":
        sys.exit(0)  # never submits here: the parent's threads on record must not be waited for
    if sys.argv[2] == "threads-first":
        # As a uWSGI worker starts its cores before its first request: new threads here reuse
        # the stacks of the parent's, so nothing may touch what those threads left behind
        # (Python 3.13 crashed waking one of them when the parent's pool was collected).
        idle = threading.Event()
        for _ in range(4):
            threading.Thread(target=idle.wait, args=(5,), daemon=True).start()
    try:
        ran_in = executor.submit(os.getpid).result(timeout=10)
        print("child task ran in", "child" if ran_in == os.getpid() else ran_in, flush=True)
    except BaseException as error:
        print("child task failed:", repr(error), flush=True)
        sys.exit(1)
    sys.exit(0)  # a normal exit: atexit functions run, and must not wait for the parent's threads

deadline = time.monotonic() + 20
while True:
    waited, status = os.waitpid(pid, os.WNOHANG)
    if waited:
        print("child exit code", os.waitstatus_to_exitcode(status), flush=True)
        break
    if time.monotonic() > deadline:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        print("child still running after 20 s: killed", flush=True)
        break
    time.sleep(0.01)
assert executor.submit(os.getpid).result(timeout=10) == os.getpid()
print("parent pool still works", flush=True)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("child", ["submit-then-exit", "threads-first", "exit-only"])
def test_c_level_fork_child_runs_tasks_in_a_pool_used_before_and_exits_promptly(tmp_path, child):
    script = tmp_path / "srv_c_fork.py"
    script.write_text(SRV_C_FORK_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), str(SRV_MODULE.parent), child],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=str(tmp_path),
    )
    lines = result.stdout.splitlines()
    expected = ["child exit code 0", "parent pool still works"]
    if child != "exit-only":
        expected.insert(0, "child task ran in child")
    assert lines == expected, result.stdout + result.stderr
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------
# Process pools: cancelling, and a dead worker


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings(SRV_FORK_WARNING)
@pytest.mark.parametrize("executor_type", ["thread", "process"])
def test_cancelled_waiting_future_is_reported_at_once_to_wait_and_as_completed(
    srv_executors, tmp_path, executor_type
):
    app = srv_make_app(
        "cancel_wait", EXECUTOR_TYPE=executor_type, EXECUTOR_MAX_WORKERS=1, EXECUTOR_MP_CONTEXT="fork"
    )
    executor = srv_executors(app)
    gate = tmp_path / "gate"
    # One worker busy until the gate opens; a process pool also hands the tasks next in line
    # to its executor (2 x workers + 1 in all), so three tasks go ahead of the waiting ones.
    busy = [executor.submit(srv_wait_for_file, str(gate), "busy")]
    busy += [executor.submit(srv_identity, name) for name in ("next", "after next")]
    waiting = [executor.submit(srv_identity, index) for index in range(3)]
    try:
        assert not any(future.running() or future.done() for future in waiting)
        assert waiting[0].cancel() and waiting[2].cancel()
        cancelled = [waiting[0], waiting[2]]

        done, not_done = concurrent.futures.wait(
            cancelled, timeout=5, return_when=concurrent.futures.ALL_COMPLETED
        )
        assert set(done) == set(cancelled) and not not_done, "wait() did not report the cancelled futures"
        assert set(concurrent.futures.as_completed(cancelled, timeout=5)) == set(cancelled)
        done, _ = concurrent.futures.wait(
            [waiting[0], busy[0]], timeout=5, return_when=concurrent.futures.FIRST_COMPLETED
        )
        assert done == {waiting[0]}
        for future in cancelled:
            assert future._state == "CANCELLED_AND_NOTIFIED"
            assert future.cancelled()
        assert not busy[0].done()  # all of that happened while the worker was still busy
    finally:
        gate.touch()
    assert [future.result(timeout=SRV_WAIT) for future in busy] == ["busy", "next", "after next"]
    assert waiting[1].result(timeout=SRV_WAIT) == 1


@pytest.mark.timeout(180)
@pytest.mark.filterwarnings(SRV_FORK_WARNING)
def test_process_pool_cancel_returning_true_means_the_task_never_runs(srv_executors, tmp_path):
    # Each submitting thread has a cancelling partner, which cancels the task by its key from
    # the moment the key is stored, while the submit is still handing the task to the pool
    # (as a later request cancels a task that another request is submitting). Some cancels
    # land on a waiting task, some on one being handed over, some on one running or done.
    app = srv_make_app(
        "cancel_race",
        EXECUTOR_TYPE="process",
        EXECUTOR_MAX_WORKERS=2,
        EXECUTOR_MP_CONTEXT="fork",
        EXECUTOR_FUTURES_MAX_LENGTH=0,
    )
    executor = srv_executors(app)
    runs = tmp_path / "runs"
    runs.mkdir()
    assert executor.submit(srv_identity, "warm").result(timeout=SRV_WAIT) == "warm"

    pairs, per_pair = 8, 250
    barrier = threading.Barrier(2 * pairs)
    futures, cancels, errors = {}, {}, []

    def submit(index, handed, answered):
        try:
            barrier.wait(SRV_WAIT)
            for number in range(per_pair):
                name = f"{index}-{number}"
                handed.put(name)
                futures[name] = executor.submit_stored(name, srv_touch, str(runs), name)
                if not answered.acquire(timeout=SRV_WAIT):
                    raise TimeoutError(f"no cancel of {name}")
        except BaseException as error:
            errors.append(error)
        handed.put(None)

    def cancel(handed, answered):
        try:
            barrier.wait(SRV_WAIT)
            while (name := handed.get(timeout=SRV_WAIT)) is not None:
                deadline = time.monotonic() + SRV_WAIT
                while (was_cancelled := executor.futures.cancel(name)) is None:  # not stored yet
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{name} was never stored")
                cancels[name] = was_cancelled
                answered.release()
        except BaseException as error:
            errors.append(error)

    threads = []
    for index in range(pairs):
        handed, answered = queue.SimpleQueue(), threading.Semaphore(0)
        threads.append(threading.Thread(target=submit, args=(index, handed, answered), daemon=True))
        threads.append(threading.Thread(target=cancel, args=(handed, answered), daemon=True))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(150)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert len(cancels) == len(futures) == pairs * per_pair

    cancelled = {name for name, was_cancelled in cancels.items() if was_cancelled}
    not_cancelled = set(cancels) - cancelled
    _, not_done = concurrent.futures.wait([futures[name] for name in not_cancelled], timeout=120)
    assert not not_done
    executor.shutdown(wait=True)  # every task that was sent has finished

    ran = {path.name for path in runs.iterdir()}
    assert cancelled and not_cancelled, "the race never went both ways"
    assert not cancelled & ran, f"{len(cancelled & ran)} tasks ran although cancel() returned True"
    assert not_cancelled <= ran, (
        f"{len(not_cancelled - ran)} tasks never ran although cancel() returned False"
    )
    assert all(futures[name].cancelled() for name in cancelled)
    assert all(futures[name].result(timeout=0) == name for name in not_cancelled)


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings(SRV_FORK_WARNING)
def test_one_dead_process_worker_fails_at_most_the_tasks_handed_to_workers_of_a_hundred(srv_executors):
    workers = 1
    app = srv_make_app(
        "dead_worker", EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=workers, EXECUTOR_MP_CONTEXT="fork"
    )
    executor = srv_executors(app)
    assert executor.submit(srv_identity, "warm").result(timeout=SRV_WAIT) == "warm"

    doomed = executor.submit(srv_kill_self)
    short = [executor.submit(srv_identity, index) for index in range(100)]
    _, not_done = concurrent.futures.wait([doomed, *short], timeout=60)
    assert not not_done

    assert isinstance(doomed.exception(timeout=0), BrokenProcessPool)
    failed = [future for future in short if future.exception(timeout=0) is not None]
    assert all(isinstance(future.exception(timeout=0), BrokenProcessPool) for future in failed)
    # at most the tasks handed to the executor: those running and those next in line
    # (2 x workers + 1, what the stdlib pool's call queue and its workers hold)
    assert 1 + len(failed) <= 2 * workers + 1, f"{1 + len(failed)} of 101 tasks failed"
    for index, future in enumerate(short):
        if future not in failed:
            assert future.result(timeout=0) == index
    assert executor.submit(srv_identity, "after").result(timeout=SRV_WAIT) == "after"


# ---------------------------------------------------------------------------------------------
# Stored futures: eviction order, None keys, and one warning for a flood


@pytest.mark.timeout(120)
def test_future_collection_of_ten_thousand_evicts_finished_first_oldest_first(caplog):
    caplog.set_level(logging.WARNING)
    collection = FutureCollection(max_length=10_000)
    collection.logger = logging.getLogger(f"srv_collection_{uuid.uuid4().hex[:8]}")
    futures = {key: Future() for key in range(10_000)}
    for key, future in futures.items():
        collection.add(key, future)
    assert len(collection) == 10_000

    # finished in an order other than the one they were stored in
    for key in (7000, 3, 9999, 500):
        futures[key].set_result(key)
    # finished, popped, and its key stored again with an unfinished future: what is left
    # of the old one must not make the new one look finished
    futures[42].set_result(42)
    assert collection.pop(42) is futures[42]
    again = Future()
    collection.add(42, again)
    assert len(collection) == 10_000 and collection.keys()[-1] == 42

    def add_and_see_what_went(key, future):
        before = set(collection.keys())
        collection.add(key, future)
        assert len(collection) == 10_000
        (gone,) = before - set(collection.keys())
        return gone

    # finished ones go first, oldest stored first
    assert [add_and_see_what_went(f"n{i}", Future()) for i in range(4)] == [3, 500, 7000, 9999]
    assert not [r for r in caplog.records if r.name == collection.logger.name]
    # then the oldest unfinished ones, with a warning
    assert [add_and_see_what_went(f"n{i}", Future()) for i in range(4, 8)] == [0, 1, 2, 4]
    assert [r for r in caplog.records if r.name == collection.logger.name]
    # a future finished before it is stored stays at its own add, and goes first after it
    finished_early = Future()
    finished_early.set_result("early")
    assert add_and_see_what_went("early", finished_early) == 5
    assert add_and_see_what_went("late", Future()) == "early"
    # a future that finishes now goes before older unfinished ones
    futures[8000].set_result(8000)
    assert add_and_see_what_went("after", Future()) == 8000
    assert collection.pop(42) is again and again not in [futures[k] for k in futures]


@pytest.mark.timeout(60)
def test_submit_stored_and_futures_add_refuse_a_none_key_and_run_and_store_nothing(srv_executors, srv_gates):
    app = srv_make_app("none_key", EXECUTOR_MAX_WORKERS=1, EXECUTOR_QUEUE_SIZE=0)
    executor = srv_executors(app)
    ran = []

    with pytest.raises(ValueError, match="None"):
        executor.submit_stored(None, ran.append, "submit_stored")
    with pytest.raises(ValueError, match="None"):
        executor.futures.add(None, Future())
    assert len(executor.futures) == 0 and executor.futures.keys() == []
    assert None not in executor.futures

    # the refused task holds no slot: the one slot (1 worker, no queue) is still free
    gate = srv_gates()
    blocker = executor.submit(gate.wait, SRV_WAIT)
    with pytest.raises(QueueFull):
        executor.submit(ran.append, "over the bound")
    gate.set()
    assert blocker.result(timeout=SRV_WAIT) is True
    executor.shutdown(wait=True)  # whatever was accepted has run by now
    assert ran == []


@pytest.mark.timeout(60)
def test_eviction_flood_of_two_thousand_logs_one_warning(srv_executors, srv_gates, caplog):
    caplog.set_level(logging.WARNING)
    app = srv_make_app("evict_flood", EXECUTOR_MAX_WORKERS=1, EXECUTOR_FUTURES_MAX_LENGTH=10)
    executor = srv_executors(app)
    gate = srv_gates()
    first = executor.submit_stored("k0", gate.wait, SRV_WAIT)  # the one worker waits: nothing finishes
    futures = [first] + [executor.submit_stored(f"k{i}", srv_identity, i) for i in range(1, 10)]
    assert srv_app_warnings(caplog, app) == []

    futures += [executor.submit_stored(f"k{i}", srv_identity, i) for i in range(10, 2010)]
    assert executor.futures.keys() == [f"k{i}" for i in range(2000, 2010)]
    warnings = srv_app_warnings(caplog, app)
    assert len(warnings) == 1, f"{len(warnings)} warnings for one flood: {warnings[-1].getMessage()}"
    assert "'k0'" in warnings[0].getMessage()

    gate.set()
    _, not_done = concurrent.futures.wait(futures, timeout=SRV_WAIT)
    assert not not_done
    assert [future.result() for future in futures[1:]] == list(range(1, 2010))


# ---------------------------------------------------------------------------------------------
# Backpressure: a cancelled waiting task frees its slot


@pytest.mark.timeout(60)
def test_cancelled_waiting_tasks_free_their_queue_slots_at_once(srv_executors, srv_gates):
    app = srv_make_app("queue_cancel", EXECUTOR_MAX_WORKERS=1, EXECUTOR_QUEUE_SIZE=2)
    executor = srv_executors(app)
    gate, started = srv_gates(), threading.Event()
    ran = []

    def busy():
        started.set()
        gate.wait(SRV_WAIT)
        return "busy"

    worker = executor.submit(busy)
    assert started.wait(SRV_WAIT)
    waiting = [executor.submit(ran.append, "cancelled-1"), executor.submit(ran.append, "cancelled-2")]
    with pytest.raises(QueueFull):
        executor.submit(ran.append, "over the bound")

    assert all(future.cancel() for future in waiting)
    # the worker is still busy, and the two slots are free again
    accepted = [executor.submit(ran.append, "accepted-1"), executor.submit(ran.append, "accepted-2")]
    with pytest.raises(QueueFull):
        executor.submit(ran.append, "over the bound again")
    assert not worker.done()

    gate.set()
    assert worker.result(timeout=SRV_WAIT) == "busy"
    assert [future.result(timeout=SRV_WAIT) for future in accepted] == [None, None]
    assert ran == ["accepted-1", "accepted-2"]


# ---------------------------------------------------------------------------------------------
# Configuration: values refused by init_app, EXECUTOR_PROCESS_APP, misspelt keys


@pytest.fixture
def srv_package(tmp_path, monkeypatch):
    """A package on sys.path, srv_pkg_<random>, whose import writes a file: imported, it shows."""
    name = f"srv_pkg_{uuid.uuid4().hex[:8]}"
    package = tmp_path / name
    package.mkdir()
    marker = tmp_path / f"{name}.imported"
    (package / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, marker
    for module in [module for module in sys.modules if module == name or module.startswith(name + ".")]:
        del sys.modules[module]


SRV_REFUSED_CONFIG = [
    ("EXECUTOR_QUEUE_TIMEOUT", threading.TIMEOUT_MAX * 10, {}),
    ("EXECUTOR_QUEUE_TIMEOUT", float("inf"), {}),
    ("EXECUTOR_MAX_WORKERS", 2**31, {"EXECUTOR_TYPE": "process"}),
    ("EXECUTOR_PROCESS_APP", " ", {"EXECUTOR_TYPE": "process"}),
    ("EXECUTOR_PROCESS_APP", "srv_no_such_module_anywhere:app", {"EXECUTOR_TYPE": "process"}),
    ("EXECUTOR_PROCESS_APP", "srv_no_such_package.sub:app", {"EXECUTOR_TYPE": "process"}),
    ("EXECUTOR_PROCESS_APP", "PACKAGE.missing:app", {"EXECUTOR_TYPE": "process"}),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "key,value,extra", SRV_REFUSED_CONFIG, ids=[f"{key}={value!r}" for key, value, _ in SRV_REFUSED_CONFIG]
)
def test_init_app_refuses_config_with_a_value_error_naming_key_and_value(srv_package, key, value, extra):
    package, marker = srv_package
    if isinstance(value, str):
        value = value.replace("PACKAGE", package)
    app = srv_make_app("refused", **extra)
    app.config[key] = value
    executor = Executor()
    with pytest.raises(ValueError) as refused:
        executor.init_app(app)
    message = str(refused.value)
    assert key in message and repr(value) in message, message
    assert "executor" not in app.extensions  # nothing changed
    assert not marker.exists() and package not in sys.modules  # looked for, not imported


@pytest.mark.timeout(60)
def test_init_app_accepts_process_app_without_importing_it(tmp_path, monkeypatch, srv_executors):
    # The module named may be the very one whose import is calling init_app: init_app must
    # find it without running it, nor the package that holds it.
    name = f"srv_lazy_{uuid.uuid4().hex[:8]}"
    (tmp_path / name).mkdir()
    package_marker, module_marker = tmp_path / "package imported", tmp_path / "module imported"
    (tmp_path / name / "__init__.py").write_text(f"open({str(package_marker)!r}, 'w').close()\n")
    (tmp_path / name / "web.py").write_text(
        f"open({str(module_marker)!r}, 'w').close()\nfrom flask import Flask\napp = Flask(__name__)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for process_app in (f"{name}.web:app", f"{name}.web", f"{name}.web:create_app()", name):
        app = srv_make_app("lazy", EXECUTOR_TYPE="process", EXECUTOR_PROCESS_APP=process_app)
        executor = srv_executors(app)  # accepted
        assert app.extensions["executor"] is executor
        assert not package_marker.exists() and not module_marker.exists(), (
            f"init_app imported {process_app!r}"
        )
        assert name not in sys.modules and f"{name}.web" not in sys.modules


@pytest.mark.timeout(30)
def test_misspelt_config_key_logs_one_warning_naming_the_closest_key(srv_executors, caplog):
    caplog.set_level(logging.DEBUG)
    app = srv_make_app("typo", EXECUTOR_MAX_WORKER=4, EXECUTOR_TYPE="thread")
    srv_executors(app)
    warnings = srv_app_warnings(caplog, app)
    assert len(warnings) == 1, [record.getMessage() for record in warnings]
    message = warnings[0].getMessage()
    assert "EXECUTOR_MAX_WORKER " in message + " " and "EXECUTOR_MAX_WORKERS" in message, message


@pytest.mark.timeout(30)
def test_correct_config_keys_log_no_warning(srv_executors, caplog):
    caplog.set_level(logging.DEBUG)
    app = srv_make_app(
        "no_typo",
        EXECUTOR_TYPE="thread",
        EXECUTOR_MAX_WORKERS=2,
        EXECUTOR_FUTURES_MAX_LENGTH=10,
        EXECUTOR_PROPAGATE_EXCEPTIONS=False,
        EXECUTOR_PUSH_APP_CONTEXT=True,
        EXECUTOR_QUEUE_SIZE=5,
        EXECUTOR_QUEUE_TIMEOUT=1,
        EXECUTOR_LOG_EXCEPTIONS=True,
        CPU_EXECUTOR_TYPE="thread",  # another executor's keys are not this one's business
        CPU_EXECUTOR_MAX_WORKERS=3,
    )
    executor = srv_executors(app)
    srv_executors(app, name="cpu")
    assert executor.submit(srv_identity, 1).result(timeout=SRV_WAIT) == 1
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []


@pytest.mark.timeout(30)
def test_named_executor_checks_its_keys_against_its_own_prefix(srv_executors, caplog):
    caplog.set_level(logging.DEBUG)
    app = srv_make_app(
        "typo_named", CPU_EXECUTOR_MAX_WORKER=4, CPU_EXECUTOR_TYPE="thread", EXECUTOR_TYPE="thread"
    )
    srv_executors(app)  # the default executor: CPU_EXECUTOR_ keys are not its own
    assert srv_app_warnings(caplog, app) == []
    srv_executors(app, name="cpu")
    warnings = srv_app_warnings(caplog, app)
    assert len(warnings) == 1, [record.getMessage() for record in warnings]
    message = warnings[0].getMessage()
    assert "CPU_EXECUTOR_MAX_WORKER " in message + " " and "CPU_EXECUTOR_MAX_WORKERS" in message, message


# ---------------------------------------------------------------------------------------------
# Arguments that cannot be pickled, refused at submit


@pytest.mark.timeout(60)
@pytest.mark.filterwarnings(SRV_FORK_WARNING)
@pytest.mark.parametrize("how", ["positional", "keyword"])
def test_unpicklable_argument_fails_at_submit_naming_function_and_argument(srv_executors, tmp_path, how):
    app = srv_make_app(
        "unpicklable", EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=1, EXECUTOR_MP_CONTEXT="fork"
    )
    executor = srv_executors(app)
    runs = tmp_path / "runs"
    runs.mkdir()
    gate = tmp_path / "gate"
    # the worker is busy: what is refused is refused at submit, not when a worker is free
    busy = executor.submit(srv_wait_for_file, str(gate), "busy")
    args, kwargs = (
        ((str(runs), threading.Lock()), {})
        if how == "positional"
        else ((str(runs),), {"lock": threading.Lock()})
    )
    try:
        with pytest.raises(TypeError) as refused:
            executor.submit_stored("refused", srv_touch_with, *args, **kwargs)
        message = str(refused.value)
        assert "srv_touch_with" in message, message
        assert ("argument 1 " in message) if how == "positional" else ("'lock'" in message), message
        assert "refused" not in executor.futures and len(executor.futures) == 0
        with pytest.raises(TypeError):
            executor.submit(srv_touch_with, *args, **kwargs)
    finally:
        gate.touch()
    assert busy.result(timeout=SRV_WAIT) == "busy"
    executor.shutdown(wait=True)
    assert list(runs.iterdir()) == []


def srv_touch_with(directory, lock=None):
    """A task that records its run, and takes an argument it does not need."""
    return srv_touch(directory, "ran")


# ---------------------------------------------------------------------------------------------
# waitress: what SIGINT leaves to accepted tasks

SRV_WAITRESS_APP = """
import os
import time
from pathlib import Path

from flask import Flask

from flask_executor import Executor

OUT = Path(os.environ["SRV_OUT"])
app = Flask(__name__)
app.config["EXECUTOR_MAX_WORKERS"] = 2
executor = Executor(app)


def slow_task(name):
    deadline = time.monotonic() + 30
    while not (OUT / "release").exists():
        if time.monotonic() > deadline:
            return
        time.sleep(0.005)
    (OUT / "results" / name).touch()


@app.post("/task/<name>")
def task(name):
    executor.submit(slow_task, name)
    return "accepted"


@app.get("/ping")
def ping():
    return "pong"
"""

# waitress-serve, with Python's own SIGINT handler installed whatever the test runner's
# process had (a process started in the background by a shell ignores SIGINT, and Python
# then leaves it ignored).
SRV_WAITRESS_SERVE = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler);"
    " from waitress.runner import run; sys.exit(run(argv=['waitress-serve', *sys.argv[1:]]))"
)


def srv_start_waitress(tmp_path):
    """A real waitress serving SRV_WAITRESS_APP with 4 threads on a free port, ready; the
    process, its port, the folder its tasks write to, and its log."""
    out = tmp_path / "out"
    (out / "results").mkdir(parents=True)
    (tmp_path / "srv_waitress_app.py").write_text(SRV_WAITRESS_APP)
    port = free_port()
    log_path = tmp_path / "waitress.log"
    command = [sys.executable, "-c", SRV_WAITRESS_SERVE, f"--listen=127.0.0.1:{port}", "--threads=4"]
    proc = srv_start_server([*command, "srv_waitress_app:app"], tmp_path, log_path, SRV_OUT=str(out))
    try:
        srv_wait_for_server(proc, port, log_path)
    except BaseException:
        srv_stop_group(proc)
        raise
    return proc, port, out, log_path


@pytest.mark.timeout(120)
def test_waitress_sigterm_exits_at_once_and_loses_accepted_tasks(tmp_path):
    # A limit, documented rather than wanted: waitress dies on SIGTERM without running
    # Python's exit handlers, so the tasks it accepted never run. Stop it with SIGINT.
    proc, port, out, log_path = srv_start_waitress(tmp_path)
    try:
        for index in range(4):
            assert srv_http(port, "POST", f"/task/task-{index}") == (200, b"accepted")
        proc.send_signal(signal.SIGTERM)
        code = srv_wait_for_exit(proc, timeout=SRV_WAIT)
        assert code in (-signal.SIGTERM, 128 + signal.SIGTERM), f"exit code {code}:\n" + log_path.read_text()
        (out / "release").touch()  # too late: nothing is left to run them
        time.sleep(0.5)
        assert list((out / "results").iterdir()) == []
    finally:
        srv_stop_group(proc)


@pytest.mark.timeout(120)
def test_waitress_sigint_stops_serving_and_exits_once_accepted_tasks_complete(tmp_path):
    proc, port, out, log_path = srv_start_waitress(tmp_path)
    try:
        names = [f"task-{index}" for index in range(6)]  # 2 running, 4 waiting for a worker
        for name in names:
            assert srv_http(port, "POST", f"/task/{name}") == (200, b"accepted")

        assert srv_http(port, "GET", "/ping") == (200, b"pong")

        def serves_no_more():
            try:
                srv_http(port, "GET", "/ping", timeout=1)
            except OSError:  # refused, reset, or left unanswered in the listen backlog
                return True
            return proc.poll() is not None

        proc.send_signal(signal.SIGINT)
        assert wait_for_condition(serves_no_more), (
            "waitress still serves after SIGINT:\n" + log_path.read_text()
        )
        assert proc.poll() is None, "waitress exited before its accepted tasks ran:\n" + log_path.read_text()
        assert list((out / "results").iterdir()) == []  # they wait for the release, still

        (out / "release").touch()
        code = srv_wait_for_exit(proc, timeout=SRV_WAIT)
        assert code == 0, f"exit code {code}:\n" + log_path.read_text()
        assert sorted(path.name for path in (out / "results").iterdir()) == names
    finally:
        srv_stop_group(proc)


# ---------------------------------------------------------------------------------------------
# A store the user passes, a store that fails, and what runs while a pool holds its lock


class DictStore:
    """A store of the user's own, in this process's memory: the methods of
    flask_executor.FuturesStore and nothing else, as the docs describe them."""

    def __init__(self):
        self.lock = threading.Lock()
        self.entries = {}  # id -> dict of the fields of a StoredTask
        self.by_key = {}  # key -> id
        self.next_id = 0

    def _task(self, entry):
        return flask_executor.StoredTask(**entry)

    def claim(self, key, owner, max_length):
        with self.lock:
            if key in self.by_key:
                return None
            self.next_id += 1
            entry = {
                "id": self.next_id,
                "key": key,
                "state": "PENDING",
                "owner": owner,
                "owner_alive": True,
                "outcome": None,
                "progress": None,
            }
            self.entries[self.next_id], self.by_key[key] = entry, self.next_id
            return self.next_id, []  # max_length is not this test store's concern

    def transition(self, entry_id, owner, from_states, to_state, outcome=None, progress=None):
        with self.lock:
            entry = self.entries.get(entry_id)
            if entry is None or entry["owner"] != owner or entry["state"] not in from_states:
                return False
            if to_state is not None:
                entry["state"] = to_state
            if outcome is not None:
                entry["outcome"] = outcome
            if progress is not None:
                entry["progress"] = progress
            return True

    def cancel(self, key, entry_id):
        with self.lock:
            entry = self.entries.get(entry_id)
            if entry is None or entry["state"] != "PENDING" or entry["key"] != key:
                return False
            entry["state"] = "CANCELLED"
            return True

    def read(self, key):
        with self.lock:
            entry = self.entries.get(self.by_key.get(key))
            return None if entry is None else self._task(entry)

    def read_entry(self, entry_id):
        with self.lock:
            entry = self.entries.get(entry_id)
            return None if entry is None else self._task(entry)

    def pop(self, key):
        with self.lock:
            entry_id = self.by_key.pop(key, None)
            if entry_id is None:
                return None
            entry = self.entries[entry_id]
            unseen_cancel = entry["state"] == "CANCELLED" and entry.get("outcome") is None
            if entry["state"] in ("PENDING", "RUNNING") or unseen_cancel:
                entry["key"] = None  # for the popper, or for the owner to see the cancel
            else:
                del self.entries[entry_id]
            return self._task(entry)

    def delete(self, entry_id):
        with self.lock:
            entry = self.entries.pop(entry_id, None)
            if entry is not None and entry["key"] is not None:
                self.by_key.pop(entry["key"], None)

    def keys(self):
        with self.lock:
            return list(self.by_key)

    def count(self):
        with self.lock:
            return len(self.by_key)

    def beat(self, owner, alive):
        pass

    def after_fork(self):
        pass


class StoreDownAtTheEnd(DictStore):
    """A store that cannot be told that a task ended, failing as a driver would: not with
    flask_executor.StoreError."""

    def transition(self, entry_id, owner, from_states, to_state, outcome=None, progress=None):
        if to_state == "FINISHED":
            raise ConnectionError("the database went away")
        return super().transition(entry_id, owner, from_states, to_state, outcome, progress)


@pytest.mark.timeout(60)
def test_a_store_object_the_user_passes_keeps_stored_futures_for_every_executor_on_it(srv_gates):
    store = DictStore()
    apps = [
        srv_make_app(
            f"own_store_{side}", SECRET_KEY=STORE_SECRET, EXECUTOR_FUTURES_STORE=store, EXECUTOR_MAX_WORKERS=1
        )
        for side in "ab"
    ]
    owner, reader = (Executor(app) for app in apps)
    gate = srv_gates()
    try:
        with apps[0].app_context():
            running = owner.submit_stored("running", gate.wait, SRV_WAIT)
            owner.submit_stored("waiting", srv_identity, "never")
            with pytest.raises(ValueError, match="already in use"):
                owner.submit_stored("running", srv_identity, "twice")
        assert wait_for_condition(running.running)
        assert sorted(store.keys()) == ["s:running", "s:waiting"]

        # the other executor sees both through the store, and cancels the waiting one there
        assert "running" in reader.futures and reader.futures.running("running")
        assert reader.futures.cancel("waiting") is True
        assert reader.futures.cancelled("waiting")
        gate.set()
        assert reader.futures.result("running", timeout=SRV_WAIT) is True
        assert reader.futures._state("waiting") == "CANCELLED"
        assert reader.futures.pop("running").done() and "running" not in owner.futures
        assert store.keys() == ["s:waiting"]
    finally:
        gate.set()
        for executor in (owner, reader):
            executor.shutdown(wait=True)


@pytest.mark.timeout(60)
def test_a_store_failing_with_any_error_when_a_task_ends_loses_neither_the_result_nor_the_worker(caplog):
    app = srv_make_app(
        "store_down",
        SECRET_KEY=STORE_SECRET,
        EXECUTOR_FUTURES_STORE=StoreDownAtTheEnd(),
        EXECUTOR_MAX_WORKERS=1,
    )
    executor = Executor(app)
    try:
        with app.app_context():
            stored = executor.submit_stored("a", srv_identity, "result")
            assert stored.result(timeout=SRV_WAIT) == "result"  # this process has the outcome
            # the one worker thread is alive: the next task runs
            assert executor.submit(srv_identity, "next").result(timeout=SRV_WAIT) == "next"
        errors = srv_app_warnings(caplog, app) + [
            record
            for record in caplog.records
            if record.name == app.logger.name and record.levelno == logging.ERROR
        ]
        assert any("could not be written to the store" in record.getMessage() for record in errors), errors
        assert any(
            "the database went away" in str(record.exc_info[1]) for record in errors if record.exc_info
        )
    finally:
        executor.shutdown(wait=True)


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings(SRV_FORK_WARNING)
def test_process_pool_task_cancelled_from_elsewhere_may_resubmit_from_its_done_callback(
    store_local, tmp_path
):
    _, owner = store_local(EXECUTOR_TYPE="process", EXECUTOR_MAX_WORKERS=1, EXECUTOR_MP_CONTEXT="fork")
    _, other = store_local()
    gate = tmp_path / "gate"
    # one task runs and two more are handed to the pool (2 x workers + 1); "b" waits here
    ahead = [owner.submit(srv_wait_for_file, str(gate), index) for index in range(3)]
    cancelled_b = owner.submit_stored("b", srv_identity, "b")
    resubmitted = []
    cancelled_b.add_done_callback(
        lambda future: resubmitted.append(owner.submit(srv_identity, "again")) if future.cancelled() else None
    )
    try:
        assert other.futures.cancel("b") is True  # from another executor, through the store
    finally:
        gate.touch()
    # the pool reaches "b", finds it cancelled, and its callback submits to the same pool
    assert [future.result(timeout=SRV_WAIT) for future in ahead] == [0, 1, 2]
    assert wait_for_condition(lambda: resubmitted and resubmitted[0].done(), timeout=SRV_WAIT)
    assert cancelled_b.cancelled() and resubmitted[0].result() == "again"
    assert owner.submit(srv_identity, "still works").result(timeout=SRV_WAIT) == "still works"


@pytest.mark.timeout(60)
def test_cancelling_a_waiting_task_with_propagate_exceptions_logs_no_error(srv_executors, srv_gates, caplog):
    app = srv_make_app("propagate_cancel", EXECUTOR_PROPAGATE_EXCEPTIONS=True, EXECUTOR_MAX_WORKERS=1)
    executor = srv_executors(app)
    gate = srv_gates()
    with app.app_context():
        busy = executor.submit(gate.wait, SRV_WAIT)
        waiting = executor.submit(srv_identity, "never")
        assert waiting.cancel()
        gate.set()
        assert busy.result(timeout=SRV_WAIT) is True
    assert waiting.cancelled()
    assert [record for record in caplog.records if record.levelno >= logging.ERROR] == []


@pytest.mark.timeout(60)
def test_shared_store_finishes_a_future_stored_under_two_keys_and_one_added_when_done(store_local, srv_gates):
    _, owner = store_local(EXECUTOR_MAX_WORKERS=2)
    _, reader = store_local()
    gate = srv_gates()
    running = owner.submit_stored("first", gate.wait, SRV_WAIT)
    owner.futures.add("second", running)  # the same future, under another key too
    done = owner.submit(srv_identity, "done")
    assert done.result(timeout=SRV_WAIT) == "done"
    owner.futures.add("already done", done)
    assert reader.futures.done("already done") and reader.futures.result("already done") == "done"
    gate.set()
    for key in ("first", "second"):
        assert reader.futures.result(key, timeout=SRV_WAIT) is True, key
        assert reader.futures._state(key) == "FINISHED"


SRV_THREAD_START_FAILS_SCRIPT = """
import sys
import threading

sys.path.insert(0, sys.argv[1])
from flask import Flask

from flask_executor import Executor

app = Flask("srv_thread_start")
app.config.update(SECRET_KEY="x", EXECUTOR_MAX_WORKERS=2)
executor = Executor(app)
ran = []
with app.app_context():
    first = executor.submit(ran.append, "first")
    first.result(timeout=10)
    start = threading.Thread.start

    def cannot_start(thread):
        raise RuntimeError("can't start new thread")

    threading.Thread.start = cannot_start  # as when the process has run out of threads
    try:
        executor.submit_stored("k", ran.append, "refused")
    except RuntimeError as error:
        print("refused:", error, flush=True)
    threading.Thread.start = start
    print("key free:", "k" not in executor.futures, flush=True)
    executor.submit_stored("k", ran.append, "second").result(timeout=10)
print("ran:", ran, flush=True)
"""


@pytest.mark.timeout(60)
def test_a_worker_thread_that_cannot_start_refuses_its_task_whole_and_exit_stays_clean(tmp_path):
    script = tmp_path / "srv_thread_start.py"
    script.write_text(SRV_THREAD_START_FAILS_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), str(SRV_MODULE.parent)], capture_output=True, text=True, timeout=50
    )
    assert result.stdout.splitlines() == [
        "refused: can't start new thread",
        "key free: True",
        "ran: ['first', 'second']",
    ], result.stdout + result.stderr
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr


class RecordingThreadPool(concurrent.futures.ThreadPoolExecutor):
    """A configured executor that remembers being made and shut down."""

    made = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.shut_down = False
        RecordingThreadPool.made.append(self)

    def shutdown(self, wait=True, *, cancel_futures=False):
        self.shut_down = True
        super().shutdown(wait=wait, cancel_futures=cancel_futures)


@pytest.mark.timeout(60)
def test_init_app_refusing_the_store_shuts_down_the_configured_executor_it_made_to_check(tmp_path):
    RecordingThreadPool.made.clear()
    app = srv_make_app(
        "store_refused",
        EXECUTOR_TYPE=RecordingThreadPool,
        EXECUTOR_FUTURES_STORE=str(tmp_path / "futures.db"),
    )
    with pytest.raises(ValueError, match="SECRET_KEY"):
        Executor(app)
    assert len(RecordingThreadPool.made) == 1 and RecordingThreadPool.made[0].shut_down
    assert "executor" not in app.extensions
