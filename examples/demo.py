"""Flask-Executor demo app.

Run it from a clone of the repository (it imports ``flask_executor`` from the
repository root)::

    python -m pip install -r examples/requirements.txt && python examples/demo.py

and open http://127.0.0.1:5000/ (set ``PORT`` to use another port).

Under gunicorn with several worker processes, which share stored futures through a SQLite
store (``instance/futures.db``), so that any worker shows the tasks of all of them::

    gunicorn -w 2 -b 127.0.0.1:8000 --chdir examples "demo:create_worker_app()"

(see create_worker_app() for what changes there).

Scenarios:

* ``/signup``  - store a user with Flask-SQLAlchemy, send a confirmation mail in
  the background (smtplib) and mark the user as mailed from the task;
* ``/csv``     - upload a CSV file, compute its statistics on a *process* pool;
* ``/long``    - a long computation with a live progress bar (report_progress),
  run on a 2-worker thread pool so that a third task waits and can be cancelled;
* ``/status``  - every stored task of every executor and its state;
* ``/mails``   - the mails received by the local SMTP sink.

Environment variables: ``PORT`` (5000), ``HOST`` (127.0.0.1), ``DATABASE_URL``
(``sqlite:///demo.db`` in the instance folder), ``MAIL_SERVER``/``MAIL_PORT``
(when unset the demo starts its own SMTP sink with aiosmtpd on a free port),
``MAIL_SENDER``, ``DEMO_FUTURES_STORE`` (a SQLite file that the three executors share
stored futures through, across processes; ``instance/futures.db`` under gunicorn),
``DEMO_MAIL_LOG`` (where the SMTP sinks of gunicorn's workers write what they receive,
``instance/mails.jsonl``); any Flask or Flask-Executor setting with a ``FLASK_`` prefix
(``FLASK_LONG_EXECUTOR_MAX_WORKERS=4``, ``FLASK_CPU_EXECUTOR_MP_CONTEXT=spawn``).
"""

import atexit
import csv
import email
import email.policy
import io
import json
import os
import re
import signal
import smtplib
import socket
import sys
import threading
import uuid
from datetime import datetime, timezone
from email.message import EmailMessage

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
# Use the flask_executor.py of this checkout, and make demo_tasks importable.
for path in (REPO_ROOT, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

from demo_tasks import count_primes, csv_stats
from flask import (
    Flask,
    abort,
    current_app,
    flash,
    jsonify,
    redirect,
    render_template,
    request,
    url_for,
)
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.exc import IntegrityError, OperationalError
from werkzeug.exceptions import BadRequest, HTTPException

from flask_executor import Executor, report_progress

db = SQLAlchemy()

# Three executors, configured from app.config by init_app():
#   executor        EXECUTOR_*       thread pool: confirmation mails
#   long_executor   LONG_EXECUTOR_*  2 threads: long computations (a 3rd waits)
#   cpu_executor    CPU_EXECUTOR_*   process pool: CSV statistics
executor = Executor()
long_executor = Executor(name="long")
cpu_executor = Executor(name="cpu")
EXECUTORS = {"default": executor, "long": long_executor, "cpu": cpu_executor}


def utcnow():
    return datetime.now(timezone.utc)


class User(db.Model):
    id = db.Column(db.Integer, primary_key=True)
    name = db.Column(db.String(100), nullable=False)
    email = db.Column(db.String(200), nullable=False, unique=True)
    mailed = db.Column(db.Boolean, nullable=False, default=False)
    created = db.Column(db.DateTime, default=utcnow)

    def to_dict(self):
        return {
            "id": self.id,
            "name": self.name,
            "email": self.email,
            "mailed": self.mailed,
        }


# --------------------------------------------------------------------------
# Local SMTP sink
# --------------------------------------------------------------------------


def free_port(host="127.0.0.1"):
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class MailSink:
    """An aiosmtpd handler that keeps the received messages in memory or, given ``log_path``,
    appends them to that file (one JSON object a line), where the sinks of several processes
    can write and any process read them."""

    def __init__(self, log_path=None):
        self.messages = []
        self.lock = threading.Lock()
        self.log_path = log_path

    async def handle_DATA(self, server, session, envelope):
        raw = envelope.original_content or envelope.content
        if isinstance(raw, str):
            raw = raw.encode("utf-8")
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        body = msg.get_body(preferencelist=("plain",))
        mail = {
            "mail_from": envelope.mail_from,
            "to": list(envelope.rcpt_tos),
            "subject": str(msg["Subject"] or ""),
            "body": body.get_content() if body is not None else "",
            "received": utcnow().isoformat(timespec="seconds"),
        }
        if self.log_path is None:
            with self.lock:
                self.messages.append(mail)
        else:
            # One write of one line to a file opened for appending: the lines of two
            # processes never interleave.
            line = (json.dumps(mail) + "\n").encode()
            fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        return "250 Message accepted for delivery"

    def received(self):
        if self.log_path is None:
            with self.lock:
                return list(self.messages)
        try:
            with open(self.log_path, encoding="utf-8") as log:
                return [json.loads(line) for line in log if line.endswith("\n")]
        except FileNotFoundError:
            return []


def start_mail_sink(host="127.0.0.1", log_path=None):
    """Start an SMTP sink on a free port; returns the running controller."""
    from aiosmtpd.controller import Controller

    sink = MailSink(log_path)
    controller = Controller(sink, hostname=host, port=free_port(host))
    controller.start()
    controller.sink = sink
    return controller


# --------------------------------------------------------------------------
# Background tasks
# --------------------------------------------------------------------------


def send_confirmation(user_id):
    """Runs on `executor` inside an app context: mail the user, mark them mailed."""
    user = db.session.get(User, user_id)
    if user is None:
        return "unknown user"
    cfg = current_app.config
    msg = EmailMessage()
    msg["From"] = cfg["MAIL_SENDER"]
    msg["To"] = user.email
    msg["Subject"] = "Welcome to the Flask-Executor demo"
    msg.set_content(
        f"Hello {user.name},\n\nthanks for signing up! This mail was sent from a background task.\n"
    )
    with smtplib.SMTP(cfg["MAIL_SERVER"], int(cfg["MAIL_PORT"]), timeout=10) as smtp:
        smtp.send_message(msg)
    user.mailed = True
    db.session.commit()
    return f"mailed {user.email}"


# Set when the server stops, so that running long tasks end early instead of
# keeping the process alive (a running task cannot be cancelled from outside).
STOPPING = threading.Event()


def prime_task(limit, steps, delay):
    """Runs on `long_executor`; report_progress() feeds the progress bar."""

    def report(done, total, message):
        report_progress(done, total, message)
        if STOPPING.is_set():
            raise RuntimeError("the server is shutting down")

    return count_primes(limit, steps, delay, report=report)


# --------------------------------------------------------------------------
# Task inspection helpers (built on executor.futures)
# --------------------------------------------------------------------------


def new_key(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def find_executor(key):
    for name, ex in EXECUTORS.items():
        # `in` is true for a key in use (and for a stored future).
        if key in ex.futures:
            return name, ex
    return None, None


def task_state(futures, key):
    if futures.cancelled(key):
        return "cancelled"
    if futures.done(key):
        return "failed" if futures.exception(key, timeout=0) is not None else "finished"
    if futures.running(key):
        return "running"
    if futures.done(key) is None:  # evicted meanwhile
        return "unknown"
    return "pending"


def task_info(key, with_result=True):
    name, ex = find_executor(key)
    if ex is None:
        return None
    futures = ex.futures
    info = {
        "key": key,
        "executor": name,
        "state": task_state(futures, key),
        "progress": None,
    }
    progress = futures.progress(key)
    if progress is not None:
        fraction = progress.fraction
        info["progress"] = {
            "done": progress.done,
            "total": progress.total,
            "message": progress.message,
            "fraction": fraction,
            "percent": None if fraction is None else round(fraction * 100),
        }
    result = None
    if info["state"] == "finished":
        result = futures.result(key, timeout=0)
        if with_result:
            info["result"] = result
    elif info["state"] == "failed":
        exc = futures.exception(key, timeout=0)
        info["error"] = f"{type(exc).__name__}: {exc}"
    info["detail"] = task_detail(info, result)
    return info


def plural(count, word):
    return f"{count:,} {word}{'' if count == 1 else 's'}"


def task_detail(info, result):
    """One line for the status page: what the task did, or why it did not."""
    state, key, progress = info["state"], info["key"], info["progress"]
    if state == "failed":
        return info["error"]
    if state == "cancelled":
        return "cancelled before it ran"
    if state == "finished":
        if key.startswith("csv-") and isinstance(result, dict):
            columns = len(result["columns"]) + len(result["non_numeric"])
            return (
                f"{result['name'] or 'CSV file'}: {plural(result['rows'], 'row')}, "
                f"{plural(columns, 'column')} ({len(result['columns'])} numeric)"
            )
        if key.startswith("primes-") and progress is None and isinstance(result, int):
            return f"{result:,} primes"
        if progress is not None and progress["message"]:
            return progress["message"]
        return "" if result is None else str(result)  # send_confirmation: "mailed <address>"
    if progress is not None and progress["message"]:
        return progress["message"]
    return "waiting for a worker" if state == "pending" else ""


def all_tasks(with_result=False):
    tasks = []
    for ex in EXECUTORS.values():
        for key in ex.futures.keys():  # noqa: SIM118 - a snapshot, not a view
            info = task_info(key, with_result=with_result)
            if info is not None:
                tasks.append(info)
    return tasks


# --------------------------------------------------------------------------
# Validation of what clients send
# --------------------------------------------------------------------------


class InputError(Exception):
    """Bad input: answered with ``status`` (400) and ``{"error": message}``, or with the form
    page showing the message when a browser posted the form."""

    def __init__(self, message, field=None, status=400):
        super().__init__(message)
        self.message = message
        self.field = field
        self.status = status


def json_kind(value):
    """The JSON name of the type of ``value``, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def shown(value, width=40):
    text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def request_fields(allowed):
    """The fields of the request: a JSON object, or form fields. Raises InputError for a body
    that is not a JSON object, and for fields not in ``allowed``."""
    if request.is_json:
        try:
            data = request.get_json()
        except BadRequest:
            raise InputError("the request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise InputError(f"the request body must be a JSON object, not {json_kind(data)}")
    else:
        data = request.form.to_dict()  # the first value of each field
    unknown = [name for name in data if name not in allowed]
    if unknown:
        raise InputError(
            f"unknown field {', '.join(map(repr, unknown))}: the fields are {', '.join(allowed)}",
            field=unknown[0],
        )
    return data


def number_field(data, name, default, low, high, integer=False):
    """``data[name]`` (or ``default``) as a number from ``low`` to ``high``; a JSON number or
    a string (form fields are strings). Raises InputError when it is not."""
    value = data.get(name, default)
    kind = "a whole number" if integer else "a number"
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise InputError(f"{name} must be {kind}, not {shown(value)}", field=name) from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = value
    else:
        raise InputError(f"{name} must be {kind}, not {json_kind(value)}", field=name)
    # Also refuses NaN and infinities: float() accepts "nan" and "inf", and JSON NaN, Infinity
    # and 1e400 arrive as floats. (No math.isfinite(): it overflows on a 400-digit JSON integer.)
    if not low <= number <= high:
        raise InputError(f"{name} must be from {low:,} to {high:,}, not {shown(value)}", field=name)
    if integer:
        if number != int(number):
            raise InputError(f"{name} must be a whole number, not {shown(value)}", field=name)
        return int(number)
    return float(number)


def text_field(data, name, max_length):
    """``data[name]`` as a non-empty string of at most ``max_length`` characters, stripped."""
    value = data.get(name)
    if value is None:
        raise InputError(f"{name} is missing", field=name)
    if not isinstance(value, str):
        raise InputError(f"{name} must be a string, not {json_kind(value)}", field=name)
    value = value.strip()
    if not value:
        raise InputError(f"{name} is empty", field=name)
    if len(value) > max_length:
        raise InputError(f"{name} is longer than {max_length} characters", field=name)
    return value


# One "@", something on each side, no spaces or control characters (they would end up in a
# mail header). Deliverability is the mail server's business.
EMAIL_RE = re.compile(r"[^@\s\x00-\x1f\x7f]+@[^@\s\x00-\x1f\x7f]+")
CSV_EXTENSIONS = (".csv", ".txt")


def read_csv_upload(upload):
    """The text of an uploaded CSV file; InputError for no file, an empty, binary or non-UTF-8
    file, and a file that is not CSV."""
    if upload is None or not upload.filename:
        raise InputError("no file: choose a CSV file", field="file")
    name = upload.filename
    if not name.lower().endswith(CSV_EXTENSIONS):
        raise InputError(f"{name} is not a CSV file: expected a .csv or .txt file", field="file")
    raw = upload.read()
    if b"\x00" in raw:
        raise InputError(f"{name} is not a CSV file: it holds binary data", field="file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{name} is not UTF-8 text", field="file") from None
    if not text.strip():
        raise InputError(f"{name} is empty", field="file")
    try:
        next(csv.reader(io.StringIO(text)))  # the header row; the rest is the worker's job
    except csv.Error as exc:
        raise InputError(f"{name} is not a CSV file: {exc}", field="file") from None
    return name, text


def wants_json():
    accept = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return request.is_json or accept == "application/json"


# --------------------------------------------------------------------------
# App factory
# --------------------------------------------------------------------------


def create_app(config=None):
    # The instance folder (home of the default SQLite file) is examples/instance,
    # however the demo is started.
    app = Flask(__name__, instance_path=os.path.join(HERE, "instance"))
    app.config.update(
        SECRET_KEY=os.environ.get("SECRET_KEY", "demo-only-not-secret"),
        SQLALCHEMY_DATABASE_URI=os.environ.get("DATABASE_URL", "sqlite:///demo.db"),
        MAX_CONTENT_LENGTH=2 * 1024 * 1024,
        MAIL_SERVER=os.environ.get("MAIL_SERVER"),
        MAIL_PORT=int(os.environ.get("MAIL_PORT", "25")),
        MAIL_SENDER=os.environ.get("MAIL_SENDER", "demo@localhost"),
        MAIL_SINK=None,  # set when the demo runs its own SMTP sink
        EXECUTOR_MAX_WORKERS=4,
        EXECUTOR_FUTURES_MAX_LENGTH=200,
        LONG_EXECUTOR_MAX_WORKERS=2,
        CPU_EXECUTOR_TYPE="process",
        CPU_EXECUTOR_MAX_WORKERS=2,
    )
    store = os.environ.get("DEMO_FUTURES_STORE")
    if store:
        # One file for the three executors: each keeps its futures under its own prefix
        # there. The store signs what it holds with SECRET_KEY, the same in every process.
        app.config.update(
            EXECUTOR_FUTURES_STORE=store, LONG_EXECUTOR_FUTURES_STORE=store, CPU_EXECUTOR_FUTURES_STORE=store
        )
    # Any setting can be overridden from the environment with a FLASK_ prefix,
    # e.g. FLASK_LONG_EXECUTOR_MAX_WORKERS=4 or FLASK_CPU_EXECUTOR_MP_CONTEXT=spawn.
    app.config.from_prefixed_env()
    if config:
        app.config.update(config)
    os.makedirs(app.instance_path, exist_ok=True)

    db.init_app(app)
    for ex in EXECUTORS.values():
        ex.init_app(app)
    with app.app_context():
        create_tables()

    @app.context_processor
    def inject_nav():
        return {"mail_sink": app.config["MAIL_SINK"] is not None, "server_pid": os.getpid()}

    @app.after_request
    def served_by(response):
        # Which process answered: with several workers (gunicorn -w 2), any of them may.
        response.headers["X-Worker-Pid"] = str(os.getpid())
        return response

    # The form endpoints answer bad input with their page (status 400) showing what was wrong,
    # or, for a JSON request or one that accepts JSON rather than HTML, with {"error": ...}.
    # Every /api/ endpoint answers with JSON.
    def error_response(message, status, field=None, form=None):
        render_page = form_pages.get(request.endpoint)
        if render_page is None or wants_json():
            body = {"error": message}
            if field is not None:
                body["field"] = field
            return body, status
        flash(message, "error")
        return render_page(form), status

    @app.errorhandler(InputError)
    def input_error(exc):
        # The form was read before the error, so the page can show what was typed.
        form = None if request.is_json else request.form
        return error_response(exc.message, exc.status, exc.field, form)

    @app.errorhandler(HTTPException)
    def http_error(exc):
        if not (request.path.startswith("/api/") or request.endpoint in form_pages or wants_json()):
            return exc
        if exc.code == 413:
            limit = app.config["MAX_CONTENT_LENGTH"]
            message = f"the request is larger than the limit of {limit / 2**20:g} MiB"
        else:
            message = f"{exc.name}: {exc.description}"
        return error_response(message, exc.code)

    @app.get("/")
    def index():
        return render_template("index.html")

    @app.get("/healthz")
    def healthz():
        return {"ok": True}

    # ---- sign-up ---------------------------------------------------------
    @app.get("/signup")
    def signup_page(form=None):
        users = db.session.scalars(db.select(User).order_by(User.id)).all()
        return render_template("signup.html", users=users, form=form or {})

    @app.post("/signup")
    def signup():
        data = request_fields(("name", "email"))
        name = text_field(data, "name", User.name.type.length)
        address = text_field(data, "email", User.email.type.length)
        if not EMAIL_RE.fullmatch(address):
            raise InputError(f"{shown(address)} is not an email address", field="email")
        user = User(name=name, email=address)
        db.session.add(user)
        try:
            db.session.commit()
        except IntegrityError:
            db.session.rollback()
            raise InputError(f"{address} is already signed up", field="email", status=409) from None
        mail_task = None
        if app.config["MAIL_SERVER"]:
            # Unique even when a persistent store outlives the database (and so a user id).
            mail_task = new_key(f"mail-{user.id}")
            executor.submit_stored(mail_task, send_confirmation, user.id)
        if wants_json():
            return {"user": user.to_dict(), "mail_task": mail_task}, 201
        if mail_task:
            flash(f"Welcome {name}! A confirmation mail is on its way.", "ok")
        else:
            flash("No MAIL_SERVER configured: no mail sent.", "error")
        return redirect(url_for("signup_page"))

    @app.get("/api/users")
    def api_users():
        users = db.session.scalars(db.select(User).order_by(User.id)).all()
        return jsonify([u.to_dict() for u in users])

    @app.get("/mails")
    def mails_page():
        return render_template("mails.html", mails=_received_mails())

    @app.get("/api/mails")
    def api_mails():
        return jsonify(_received_mails())

    def _received_mails():
        sink = app.config["MAIL_SINK"]
        return sink.received() if sink is not None else []

    # ---- CSV statistics on the process pool -----------------------------
    @app.get("/csv")
    def csv_page(form=None):
        return render_template("csv.html")

    @app.post("/csv")
    def csv_upload():
        name, text = read_csv_upload(request.files.get("file"))
        key = new_key("csv")
        # Only the text travels to the worker process, never request.files.
        cpu_executor.submit_stored(key, csv_stats, text, name)
        if wants_json():
            return {"key": key, "name": name}, 202
        return redirect(url_for("csv_result", key=key, name=name))

    @app.get("/csv/<key>")
    def csv_result(key):
        if task_info(key, with_result=False) is None:
            abort(404)
        return render_template(
            "csv_result.html",
            key=key,
            name=request.args.get("name", ""),
            server_pid=os.getpid(),
        )

    # ---- long computation with progress ------------------------------------
    @app.get("/long")
    def long_page():
        keys = list(long_executor.futures.keys())
        return render_template("long.html", keys=keys)

    @app.post("/api/long")
    def api_long_start():
        data = request_fields(("limit", "steps", "delay"))  # each optional
        limit = number_field(data, "limit", 2_000_000, 2, 50_000_000, integer=True)
        steps = number_field(data, "steps", 20, 1, 200, integer=True)
        delay = number_field(data, "delay", 0.25, 0, 5)
        key = new_key("primes")
        long_executor.submit_stored(key, prime_task, limit, steps, delay)
        return {"key": key, "limit": limit, "steps": steps, "delay": delay}, 202

    # ---- generic task API ----------------------------------------------------
    @app.get("/api/tasks")
    def api_tasks():
        return jsonify(all_tasks())

    @app.get("/api/tasks/<key>")
    def api_task(key):
        info = task_info(key)
        if info is None:
            return {"error": f"no stored task {key!r}"}, 404
        return jsonify(info)

    @app.post("/api/tasks/<key>/cancel")
    def api_task_cancel(key):
        _name, ex = find_executor(key)
        if ex is None:
            return {"error": f"no stored task {key!r}"}, 404
        cancelled = bool(ex.futures.cancel(key))
        return {
            "key": key,
            "cancelled": cancelled,
            "state": task_state(ex.futures, key),
        }

    @app.get("/status")
    def status_page():
        shared = bool(app.config.get("EXECUTOR_FUTURES_STORE"))
        return render_template("status.html", tasks=all_tasks(), executors=EXECUTORS, shared_store=shared)

    # The pages that show the errors of the forms posted to these endpoints.
    form_pages = {"signup": signup_page, "csv_upload": csv_page}
    return app


def create_tables():
    """db.create_all(), which several worker processes may call at once: one of them sees a
    table missing and then fails to create it, because another has just done so."""
    for attempt in range(3):
        try:
            db.create_all()
            return
        except OperationalError as error:
            if "already exists" not in str(error) or attempt == 2:
                raise


def create_worker_app():
    """The app of one worker process of a server that runs several, such as::

        gunicorn -w 2 -b 127.0.0.1:8000 --chdir examples "demo:create_worker_app()"

    gunicorn calls it in each worker. There:

    * the three executors share stored futures through ``DEMO_FUTURES_STORE``
      (``instance/futures.db`` by default), so that a request served by any worker sees the
      tasks of all of them: the status page, a task's progress, cancelling;
    * the SQLite database (``DATABASE_URL``) is one file that the workers share;
    * unless ``MAIL_SERVER`` is set, each worker runs an SMTP sink of its own, on a port of
      its own, and they all append what they receive to one file (``DEMO_MAIL_LOG``,
      ``instance/mails.jsonl``), which the mail page of any worker reads. (A sink started
      once in gunicorn's master process would keep the mails in the master's memory, which
      no worker can read.)
    """
    instance = os.path.join(HERE, "instance")
    os.makedirs(instance, exist_ok=True)
    os.environ.setdefault("DEMO_FUTURES_STORE", os.path.join(instance, "futures.db"))
    config = {}
    controller = None
    if not os.environ.get("MAIL_SERVER"):
        log_path = os.environ.get("DEMO_MAIL_LOG", os.path.join(instance, "mails.jsonl"))
        controller = start_mail_sink(log_path=log_path)
        config.update(MAIL_SERVER=controller.hostname, MAIL_PORT=controller.port, MAIL_SINK=controller.sink)
    app = create_app(config)

    # When the worker exits; before Flask-Executor's own exit handler (registered earlier,
    # so run later), which waits for the tasks still running.
    @atexit.register
    def stop_worker():
        STOPPING.set()  # long computations stop at their next step
        for ex in EXECUTORS.values():
            ex.shutdown(wait=True, cancel_futures=True)
        if controller is not None:
            controller.stop()

    return app


def main():
    host = os.environ.get("HOST", "127.0.0.1")
    port = int(os.environ.get("PORT", "5000"))
    config = {}
    controller = None
    if not os.environ.get("MAIL_SERVER"):
        controller = start_mail_sink()
        config.update(
            MAIL_SERVER=controller.hostname,
            MAIL_PORT=controller.port,
            MAIL_SINK=controller.sink,
        )
        print(
            f" * SMTP sink listening on {controller.hostname}:{controller.port}",
            flush=True,
        )
    app = create_app(config)

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # `kill` shuts down as cleanly as Ctrl-C
    try:
        app.run(host=host, port=port, threaded=True, use_reloader=False, debug=False)
    except KeyboardInterrupt:
        pass
    finally:
        # Waiting tasks are cancelled; running ones finish (a mail being sent is
        # sent), long computations stop at their next step (STOPPING).
        STOPPING.set()
        for ex in EXECUTORS.values():
            ex.shutdown(wait=True, cancel_futures=True)
        if controller is not None:
            controller.stop()


if __name__ == "__main__":
    main()
