"""Recipe: analyse an uploaded file in the background, without blocking the page.

``POST /analyses`` reads the uploaded CSV file in the view, submits the analysis of its text
and redirects at once to ``/analyses/<key>``, a page that polls ``/api/analyses/<key>`` until
the result is there. The analysis computes, for each numeric column, its count, mean,
median, standard deviation, minimum and maximum.
"""

import csv
import io
import math
import statistics
import uuid

from flask import Flask, abort, redirect, render_template_string, request, url_for

from flask_executor import Executor

executor = Executor()


def create_app(config=None):
    app = Flask(__name__)
    app.config.update(
        MAX_CONTENT_LENGTH=8 * 1024 * 1024,  # refuse uploads over 8 MiB before reading them
        EXECUTOR_MAX_WORKERS=2,
        EXECUTOR_FUTURES_MAX_LENGTH=100,  # the oldest finished analyses make room for new ones
    )
    app.config.from_prefixed_env()
    app.config.update(config or {})
    executor.init_app(app)

    @app.get("/")
    def upload_form():
        return render_template_string(FORM_PAGE)

    @app.post("/analyses")
    def upload():
        upload = request.files.get("file")
        if upload is None or not upload.filename:
            return {"error": "choose a CSV file to upload"}, 400
        try:
            # Read it here: the uploaded file belongs to the request, and is closed when the
            # request ends, when the task may not even have started.
            text = upload.read().decode("utf-8-sig")
        except UnicodeDecodeError:
            return {"error": f"{upload.filename} is not UTF-8 text"}, 400
        key = f"analysis-{uuid.uuid4().hex}"
        executor.submit_stored(key, analyse_csv, text)
        return redirect(url_for("result_page", key=key, name=upload.filename), 303)

    @app.get("/analyses/<key>")
    def result_page(key):
        if key not in executor.futures:
            abort(404)
        return render_template_string(RESULT_PAGE, key=key, name=request.args.get("name", ""))

    @app.get("/api/analyses/<key>")
    def analysis(key):
        futures = executor.futures
        if key not in futures:
            return {"error": f"no analysis {key!r}"}, 404
        if not futures.done(key):
            return {"state": "running" if futures.running(key) else "waiting"}
        error = futures.exception(key)
        if error is not None:
            return {"state": "failed", "error": str(error)}
        return {"state": "done", "result": futures.result(key)}

    return app


def analyse_csv(text):
    """Statistics of each numeric column of a CSV text whose first row names the columns."""
    rows = csv.reader(io.StringIO(text))
    names = next(rows, None)
    if not names:
        raise ValueError("the file is empty")
    columns = [[] for _ in names]
    row_count = 0
    for row in rows:
        row_count += 1
        for values, cell in zip(columns, row):
            values.append(cell.strip())
    numeric = []  # a list, in the file's order (a JSON object's keys may be reordered)
    for name, cells in zip(names, columns):
        try:
            values = [float(cell) for cell in cells if cell]
        except ValueError:
            continue  # not a numeric column
        if values and all(map(math.isfinite, values)):  # JSON has no NaN nor infinity
            numeric.append(
                {
                    "name": name,
                    "count": len(values),
                    "mean": statistics.fmean(values),
                    "median": statistics.median(values),
                    "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "min": min(values),
                    "max": max(values),
                }
            )
    return {"rows": row_count, "columns": names, "numeric": numeric}


FORM_PAGE = """<!doctype html>
<title>Analyse a CSV file</title>
<form method="post" action="/analyses" enctype="multipart/form-data">
  <input type="file" name="file" accept=".csv,text/csv"> <button>Analyse</button>
</form>
"""

RESULT_PAGE = """<!doctype html>
<title>Analysis of {{ name }}</title>
<h1>Analysis of {{ name }}</h1>
<p id="state">waiting</p>
<table id="stats"></table>
<script>
const url = {{ url_for("analysis", key=key)|tojson }};
const cell = (row, text) => { row.insertCell().textContent = text; };

async function poll() {
  const answer = await (await fetch(url)).json();
  document.getElementById("state").textContent = answer.error || answer.state;
  if (answer.state === "done") {
    const table = document.getElementById("stats");
    const head = table.createTHead().insertRow();
    for (const title of ["column", "count", "mean", "median", "stdev", "min", "max"]) cell(head, title);
    const fields = ["name", "count", "mean", "median", "stdev", "min", "max"];
    const body = table.createTBody();
    for (const column of answer.result.numeric) {
      const row = body.insertRow();
      row.dataset.column = column.name;
      for (const field of fields) cell(row, column[field]);
    }
  } else if (answer.state !== "failed") {
    setTimeout(poll, 300);
  }
}
poll();
</script>
"""
