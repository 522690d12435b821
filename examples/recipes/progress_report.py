"""Recipe: a long computation that reports its progress, polled by later requests.

``POST /reports`` starts the computation and answers at once with a key; ``GET
/reports/<key>`` says how far it has got (``report_progress()`` in the task,
``executor.futures.progress(key)`` in the view) and, once it is done, its result. ``GET /``
is a page with a form and a progress bar that polls that status endpoint.

With several worker processes, set ``EXECUTOR_FUTURES_STORE`` to a SQLite file (and a
``SECRET_KEY``): then any worker answers for a task that another one runs::

    FLASK_EXECUTOR_FUTURES_STORE=/tmp/futures.db gunicorn -w 2 "progress_report:create_app()"
"""

import os
import time
import uuid

from flask import Flask, render_template_string, request, url_for

from flask_executor import Executor, TaskLost, report_progress

executor = Executor()


def create_app(config=None):
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="change-me",  # signs what a shared store holds; the same in every process
        EXECUTOR_MAX_WORKERS=2,
        EXECUTOR_FUTURES_TTL=3600,  # a finished report's result is kept for an hour
    )
    app.config.from_prefixed_env()  # FLASK_EXECUTOR_FUTURES_STORE=/path/to/futures.db, ...
    app.config.update(config or {})
    executor.init_app(app)

    @app.post("/reports")
    def start_report():
        data = request.get_json(silent=True) or request.form
        try:
            items = int(data.get("items", 20))
            pause = float(data.get("pause", 0.1))
        except (TypeError, ValueError):
            return {"error": "items must be a whole number and pause a number of seconds"}, 400
        if not (1 <= items <= 1000 and 0 <= pause <= 5):
            return {"error": "items must be from 1 to 1000, pause from 0 to 5 seconds"}, 400
        key = f"report-{uuid.uuid4().hex}"
        executor.submit_stored(key, build_report, items, pause)
        status_url = url_for("report_status", key=key)
        return {"key": key, "status_url": status_url}, 202, {"Location": status_url}

    @app.get("/reports/<key>")
    def report_status(key):
        futures = executor.futures
        done = futures.done(key)  # None: no task under this key (never, or forgotten)
        if done is None:
            return {"error": f"no report {key!r}"}, 404
        status = {"key": key, "state": "done" if done else "running" if futures.running(key) else "waiting"}
        progress = futures.progress(key)
        if progress is not None:
            status["progress"] = {
                "done": progress.done,
                "total": progress.total,
                "percent": None if progress.fraction is None else round(100 * progress.fraction),
                "message": progress.message,
            }
        if done:
            if futures.cancelled(key):
                status["state"] = "cancelled"
            elif (error := futures.exception(key)) is not None:
                status["state"] = "failed"
                status["error"] = (
                    "the server stopped while it ran: start it again"
                    if isinstance(error, TaskLost)
                    else f"{type(error).__name__}: {error}"
                )
            else:
                status["result"] = futures.result(key)
        return status

    @app.get("/")
    def report_page():
        return render_template_string(PAGE)

    @app.after_request
    def served_by(response):
        response.headers["X-Worker-Pid"] = str(os.getpid())  # which process answered
        return response

    return app


def build_report(items, pause):
    """The long computation: one step per item, each reported as it ends."""
    total = 0
    for number in range(1, items + 1):
        time.sleep(pause)  # stands for real work on one item
        total += number * number
        report_progress(number, items, f"item {number} of {items}")
    return {"items": items, "sum_of_squares": total, "pid": os.getpid()}


PAGE = """<!doctype html>
<title>Report</title>
<form id="start">
  <label>Items <input name="items" type="number" value="20" min="1" max="1000"></label>
  <label>Pause per item (s) <input name="pause" type="number" value="0.1" min="0" max="5" step="0.05"></label>
  <button>Start</button>
</form>
<p><progress id="bar" max="100" value="0"></progress> <span id="percent"></span>
  <span id="message"></span></p>
<p id="outcome"></p>
<script>
const show = (id, text) => { document.getElementById(id).textContent = text; };

async function poll(url) {
  const status = await (await fetch(url)).json();
  if (status.progress && status.progress.percent !== null) {
    document.getElementById("bar").value = status.progress.percent;
    show("percent", status.progress.percent + "%");
    show("message", status.progress.message || "");
  }
  document.body.dataset.state = status.state;
  if (status.state === "done") {
    show("outcome", "Sum of squares: " + status.result.sum_of_squares);
  } else if (status.state === "failed" || status.state === "cancelled") {
    show("outcome", status.error || status.state);
  } else {
    setTimeout(() => poll(url), 250);
  }
}

document.getElementById("start").addEventListener("submit", async event => {
  event.preventDefault();
  const response = await fetch("/reports", {method: "POST", body: new FormData(event.target)});
  const started = await response.json();
  if (!response.ok) return show("outcome", started.error);
  document.body.dataset.key = started.key;
  poll(started.status_url);
});
</script>
"""
