"""Flask-Executor demo app.

Run it from a clone of the repository (it imports ``flask_executor`` from the
repository root)::

    python -m pip install -r examples/requirements.txt && python examples/demo.py

and open http://127.0.0.1:5000/ (set ``PORT`` to use another port).

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
``MAIL_SENDER``; any Flask or Flask-Executor setting with a ``FLASK_`` prefix
(``FLASK_LONG_EXECUTOR_MAX_WORKERS=4``, ``FLASK_CPU_EXECUTOR_MP_CONTEXT=spawn``).
"""

import email
import email.policy
import os
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
from sqlalchemy.exc import IntegrityError

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
    """An aiosmtpd handler that keeps the received messages in memory."""

    def __init__(self):
        self.messages = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):
        raw = envelope.original_content or envelope.content
        if isinstance(raw, str):
            raw = raw.encode("utf-8")
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        body = msg.get_body(preferencelist=("plain",))
        with self.lock:
            self.messages.append(
                {
                    "mail_from": envelope.mail_from,
                    "to": list(envelope.rcpt_tos),
                    "subject": str(msg["Subject"] or ""),
                    "body": body.get_content() if body is not None else "",
                    "received": utcnow().isoformat(timespec="seconds"),
                }
            )
        return "250 Message accepted for delivery"

    def received(self):
        with self.lock:
            return list(self.messages)


def start_mail_sink(host="127.0.0.1"):
    """Start an SMTP sink on a free port; returns the running controller."""
    from aiosmtpd.controller import Controller

    sink = MailSink()
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
    if with_result and info["state"] == "finished":
        info["result"] = futures.result(key, timeout=0)
    elif info["state"] == "failed":
        exc = futures.exception(key, timeout=0)
        info["error"] = f"{type(exc).__name__}: {exc}"
    return info


def all_tasks(with_result=False):
    tasks = []
    for ex in EXECUTORS.values():
        for key in ex.futures.keys():  # noqa: SIM118 - a snapshot, not a view
            info = task_info(key, with_result=with_result)
            if info is not None:
                tasks.append(info)
    return tasks


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
        db.create_all()

    @app.context_processor
    def inject_nav():
        return {"mail_sink": app.config["MAIL_SINK"] is not None}

    @app.get("/")
    def index():
        return render_template("index.html")

    @app.get("/healthz")
    def healthz():
        return {"ok": True}

    # ---- sign-up ---------------------------------------------------------
    @app.get("/signup")
    def signup_page():
        users = db.session.scalars(db.select(User).order_by(User.id)).all()
        return render_template("signup.html", users=users)

    @app.post("/signup")
    def signup():
        name = request.form.get("name", "").strip()
        address = request.form.get("email", "").strip()
        if not name or "@" not in address:
            flash("Please give a name and an email address.", "error")
            return redirect(url_for("signup_page"))
        user = User(name=name, email=address)
        db.session.add(user)
        try:
            db.session.commit()
        except IntegrityError:
            db.session.rollback()
            flash(f"{address} is already signed up.", "error")
            return redirect(url_for("signup_page"))
        if app.config["MAIL_SERVER"]:
            executor.submit_stored(f"mail-{user.id}", send_confirmation, user.id)
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
    def csv_page():
        return render_template("csv.html")

    @app.post("/csv")
    def csv_upload():
        upload = request.files.get("file")
        if upload is None or not upload.filename:
            flash("Choose a CSV file first.", "error")
            return redirect(url_for("csv_page"))
        try:
            text = upload.read().decode("utf-8-sig")
        except UnicodeDecodeError:
            flash("The file is not UTF-8 text.", "error")
            return redirect(url_for("csv_page"))
        key = new_key("csv")
        # Only the text travels to the worker process, never request.files.
        cpu_executor.submit_stored(key, csv_stats, text)
        return redirect(url_for("csv_result", key=key, name=upload.filename))

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
        data = request.get_json(silent=True) or request.form
        try:
            limit = min(max(int(data.get("limit", 2_000_000)), 2), 50_000_000)
            steps = min(max(int(data.get("steps", 20)), 1), 200)
            delay = min(max(float(data.get("delay", 0.25)), 0.0), 5.0)
        except (TypeError, ValueError):
            return {"error": "limit, steps and delay must be numbers"}, 400
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
        return render_template("status.html", tasks=all_tasks(), executors=EXECUTORS)

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
