"""Reports built in the background, whose stored futures every process shares
(docs: stored futures).

Each process that serves this app (a gunicorn worker, say) names the same store, so
a request answered by one process can ask about a report that another one is
building. Run as a script, it plays such a process: it starts one report and
stays alive until the report is built::

    SECRET_KEY=... python reports_app.py STORE_PATH KEY SECONDS
"""

import os
import sys
import time

from flask import Flask, abort

from flask_executor import Executor, TaskLost, report_progress

executor = Executor()


def create_app(store):
    app = Flask(__name__)
    # Entries are signed with it: the same key in every process that shares the store.
    app.config["SECRET_KEY"] = os.environ["SECRET_KEY"]
    app.config["EXECUTOR_FUTURES_STORE"] = store
    executor.init_app(app)

    @app.post("/reports/<key>/<int:seconds>")
    def start_report(key, seconds):
        try:
            executor.submit_stored(key, build_report, key, seconds)
        except ValueError:  # the key is in use, in this process or another
            return {"error": f"report {key} is already being built"}, 409
        return {"key": key}, 202

    @app.get("/reports/<key>")
    def report_status(key):
        if key not in executor.futures:
            abort(404)
        if not executor.futures.done(key):
            progress = executor.futures.progress(key)
            return {"state": "building", "steps done": progress.done if progress else 0}
        future = executor.futures.pop(key)
        try:
            return {"state": "done", "report": future.result()}
        except TaskLost:
            return {"state": "lost: start it again"}, 503

    return app


def build_report(key, seconds):
    for step in range(seconds):
        report_progress(step, seconds)
        time.sleep(1)
    return f"report {key}, built in {seconds} s by process {os.getpid()}"


if __name__ == "__main__":
    store, key, seconds = sys.argv[1:]
    app = create_app(store)
    response = app.test_client().post(f"/reports/{key}/{seconds}")
    print(response.status_code, response.json, flush=True)
    executor.shutdown(wait=True)  # a server would go on serving; this one waits for its task
    print("finished", flush=True)
