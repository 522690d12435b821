"""End-to-end tests of the demo app (examples/demo.py).

* Browser tests: the demo runs as a real server (``python examples/demo.py`` in
  a subprocess, werkzeug, 127.0.0.1, free port; and ``gunicorn -w 2`` with the
  workers sharing stored futures) and headless Chromium is driven with
  Playwright.  They are skipped - with the reason printed - only when no
  browser is available: Playwright not importable or no Chromium executable
  (``/usr/bin/chromium``, or ``CHROMIUM_PATH``).  Playwright's own browser
  downloads are not used.
* API tests: the same scenarios through Flask's test client, no browser needed.

Run from the repository root::

    python -m pip install -r examples/requirements.txt playwright pytest pytest-timeout
    python -m pytest examples/test_demo.py -rs
"""

import contextlib
import html
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
for folder in (HERE, os.path.join(HERE, "recipes")):  # the demo; the helpers the recipes' tests share
    if folder not in sys.path:
        sys.path.insert(0, folder)

from servers import CHROMIUM_ARGS, find_chromium, free_port, no_control_socket, wait_until  # noqa: E402

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    sync_playwright = expect = None

# Every test is bounded (pytest-timeout); every wait inside a test has its own bound.
pytestmark = pytest.mark.timeout(180)

WAIT_MS = 30_000  # default bound of every Playwright wait

CSV_TEXT = "city,temperature,rain\nOslo,4.5,10\nRome,18,2\nCairo,30.5,0\nLima,12,\n"
# Expected statistics of CSV_TEXT, as the result page displays them.
CSV_EXPECTED = {
    "temperature": ["temperature", "4", "16.25", "4.5", "30.5"],
    "rain": ["rain", "3", "4", "0", "10"],
}
# Values that a formatter can get wrong: whole and fractional parts of 6+ digits, tiny and
# huge magnitudes, negatives, and float noise (0.1 + 0.2 is 0.30000000000000004).
CSV_NUMBERS = (
    "big,small,tiny,negative,noise,huge\n"
    "100000.2,0.5,0.0000001,-3,0.1,1234567.891\n"
    "100000,0.25,2e-7,-1.5,0.2,2.5e21\n"
)
CSV_NUMBERS_EXPECTED = {  # name, count, mean, min, max
    "big": ["big", "2", "100000.1", "100000", "100000.2"],
    "small": ["small", "2", "0.375", "0.25", "0.5"],
    "tiny": ["tiny", "2", "1.5e-7", "1e-7", "2e-7"],
    "negative": ["negative", "2", "-2.25", "-3", "-1.5"],
    "noise": ["noise", "2", "0.15", "0.1", "0.2"],
    "huge": ["huge", "2", "1.25e+21", "1234567.891", "2.5e+21"],
}
# Columns whose sorted order (and JavaScript's own key order: "10" and "2021" first) differs
# from the file's order.
CSV_ORDER_TEXT = "zeta,alpha,2021,name,10,mid\n1,2,3,x,4,5\n6,7,8,y,9,10\n"
CSV_ORDER_NUMERIC = ["zeta", "alpha", "2021", "10", "mid"]


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def browser_missing_reason():
    if sync_playwright is None:
        return "Playwright for Python is not installed (pip install playwright)"
    if find_chromium() is None:
        return (
            "no Chromium executable: install Debian's chromium package "
            "(apt-get install chromium) or set CHROMIUM_PATH"
        )
    return None


class DemoServer:
    """``python examples/demo.py`` in a subprocess, on a free port; with ``workers``, the
    demo under ``gunicorn -w WORKERS`` instead, as the README runs it, its workers sharing
    stored futures through a store in ``workdir``."""

    def __init__(self, workdir, workers=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(workdir, "demo-server.log")
        self.workers = workers
        env = dict(
            os.environ,
            PORT=str(self.port),
            HOST="127.0.0.1",
            PYTHONUNBUFFERED="1",
            DATABASE_URL="sqlite:///" + os.path.join(workdir, "demo.db"),
        )
        for key in ("MAIL_SERVER", "MAIL_PORT"):  # always use the built-in SMTP sink
            env.pop(key, None)
        if workers is None:
            command = [sys.executable, os.path.join(HERE, "demo.py")]
        else:
            env["DEMO_FUTURES_STORE"] = os.path.join(workdir, "futures.db")
            env["DEMO_MAIL_LOG"] = os.path.join(workdir, "mails.jsonl")
            command = [sys.executable, "-m", "gunicorn", "-w", str(workers), "-b", f"127.0.0.1:{self.port}"]
            command += [
                "--chdir",
                HERE,
                "--graceful-timeout",
                "20",
                *no_control_socket(),
                "demo:create_worker_app()",
            ]
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            command,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def worker_pids(self):
        """The pids of the workers gunicorn has booted."""
        with open(self.log_path) as f:
            return {int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", f.read())}

    def wait_ready(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"demo server exited with {self.proc.returncode}:\n{self.tail()}")
            if self.workers is not None and len(self.worker_pids()) < self.workers:
                time.sleep(0.1)
                continue
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"demo server not ready after {timeout}s:\n{self.tail()}")

    def tail(self, lines=60):
        with open(self.log_path) as f:
            return "".join(f.readlines()[-lines:])

    def stop(self):
        if self.proc.poll() is None:
            # the demo shuts down cleanly on SIGTERM
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # our own process group only
                self.proc.wait(timeout=10)
        if self.workers is not None:
            try:  # a gunicorn worker left behind by its master: the group is ours to end
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()


# --------------------------------------------------------------------------
# browser fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(request):
    reason = browser_missing_reason()
    if reason:
        # Printed on the terminal even with output capturing on (and -ra/-rs lists it too).
        plugins = request.config.pluginmanager
        reporter = plugins.get_plugin("terminalreporter")
        capture = plugins.get_plugin("capturemanager")
        if reporter is not None and capture is not None:
            with capture.global_and_fixture_disabled():
                reporter.write_line("")
                reporter.write_line(f"SKIPPING the browser tests of the demo: {reason}", yellow=True)
        pytest.skip(f"no browser: {reason}")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=find_chromium(),
            args=CHROMIUM_ARGS,
            headless=True,
            timeout=60_000,
        )
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(browser, tmp_path_factory):
    srv = DemoServer(str(tmp_path_factory.mktemp("demo-server")))
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()
        print("---- demo server log ----\n" + srv.tail(200))


@contextlib.contextmanager
def demo_page(browser, server):
    """A fresh browser context on the server's pages; yields the page and the list of
    JavaScript errors seen on it."""
    context = browser.new_context(viewport={"width": 1000, "height": 700}, base_url=server.url)
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield page, errors
    finally:
        context.close()


@pytest.fixture
def page(browser, server):
    with demo_page(browser, server) as (page, errors):
        yield page
    print("---- demo server log (tail) ----\n" + server.tail())
    assert not errors, f"JavaScript errors on the page: {errors}"


def task_json(page, key):
    response = page.request.get(f"/api/tasks/{key}")
    assert response.ok, response.text()
    return response.json()


def start_long_task(page, limit, steps, delay):
    """Start a long task through the form; return the key of the new row."""
    rows = page.locator("#tasks tbody tr")
    before = rows.count()
    page.fill("input[name=limit]", str(limit))
    page.fill("input[name=steps]", str(steps))
    page.fill("input[name=delay]", str(delay))
    page.click("#start")
    expect(rows).to_have_count(before + 1)
    key = rows.first.get_attribute("data-key")
    assert key and key.startswith("primes-")
    return key


# --------------------------------------------------------------------------
# browser scenarios
# --------------------------------------------------------------------------


def test_signup_sends_mail_and_marks_user(page, tmp_path):
    address = f"grace-{uuid.uuid4().hex[:6]}@example.com"
    page.goto("/signup")
    page.fill("input[name=name]", "Grace Hopper")
    page.fill("input[name=email]", address)
    page.click("#signup-form button[type=submit]")
    expect(page.locator(".flash.ok")).to_contain_text("Welcome Grace Hopper")
    row = page.locator(f'#users tr[data-email="{address}"]')
    expect(row).to_have_count(1)
    # The background task sends the mail, then sets mailed=True in the database;
    # the page picks it up by polling /api/users.
    expect(row.locator("td.mailed")).to_have_text("yes")
    page.screenshot(path=str(tmp_path / "signup.png"))

    users = page.request.get("/api/users").json()
    assert [u["mailed"] for u in users if u["email"] == address] == [True]

    page.goto("/mails")
    mail_row = page.locator("#mails tbody tr", has_text=address)
    expect(mail_row).to_have_count(1)
    expect(mail_row.locator("td.subject")).to_have_text("Welcome to the Flask-Executor demo")
    expect(mail_row).to_contain_text("Hello Grace Hopper")
    page.screenshot(path=str(tmp_path / "mails.png"))
    mails = [m for m in page.request.get("/api/mails").json() if address in m["to"]]
    assert len(mails) == 1 and mails[0]["mail_from"] == "demo@localhost"

    # the stored future of the mail task finished with the task's return value
    status = page.request.get("/api/tasks").json()
    mail_tasks = [t for t in status if t["executor"] == "default" and t["state"] == "finished"]
    assert mail_tasks, status


def test_csv_statistics_on_process_pool(page, server, tmp_path):
    page.goto("/csv")
    page.set_input_files(
        "input[type=file]",
        files=[
            {
                "name": "weather.csv",
                "mimeType": "text/csv",
                "buffer": CSV_TEXT.encode(),
            },
        ],
    )
    page.click("#csv-form button[type=submit]")
    page.wait_for_url("**/csv/csv-*")
    expect(page.locator("#state")).to_have_text("finished")
    for column, cells in CSV_EXPECTED.items():
        expect(page.locator(f'#stats tr[data-column="{column}"] td')).to_have_text(cells)
    expect(page.locator("#stats tbody tr")).to_have_count(2)
    expect(page.locator("#summary")).to_contain_text("4 rows, 2 numeric columns (not numeric: city)")
    page.screenshot(path=str(tmp_path / "csv.png"))

    key = page.url.rsplit("/csv/", 1)[1].split("?")[0]
    info = task_json(page, key)
    assert info["executor"] == "cpu" and info["state"] == "finished"
    assert info["result"]["columns"][0] == {
        "name": "temperature",
        "count": 4,
        "mean": 16.25,
        "min": 4.5,
        "max": 30.5,
    }
    # computed in a worker process, not in the web server's process
    assert info["result"]["pid"] != server.proc.pid
    # report_progress is a no-op in process workers
    assert info["progress"] is None


def test_long_task_progress_bar(page, tmp_path):
    page.goto("/long")
    key = start_long_task(page, limit=1_000_000, steps=20, delay=0.2)
    row = page.locator(f'#tasks tr[data-key="{key}"]')

    seen, states = [], []
    deadline = time.monotonic() + 60
    while True:
        state = row.get_attribute("data-state")
        percent = row.get_attribute("data-percent")
        if state and (not states or states[-1] != state):
            states.append(state)
        if percent is not None and (not seen or seen[-1] != int(percent)):
            seen.append(int(percent))
        if state in ("finished", "failed", "cancelled", "unknown"):
            break
        assert time.monotonic() < deadline, f"task still {state} after 60s; progress seen: {seen}"
        time.sleep(0.05)

    assert states[-1] == "finished", (states, seen)
    assert "running" in states, states
    intermediate = [p for p in seen if 0 < p < 100]
    assert len(intermediate) >= 3, f"expected several intermediate progress values, saw {seen}"
    assert seen == sorted(seen), f"progress went backwards: {seen}"
    assert seen[-1] == 100
    expect(row.locator(".pct")).to_have_text("100%")
    assert row.locator("progress.bar").evaluate("el => el.value") == 100
    expect(row.locator(".result")).to_have_text("78,498 primes")
    expect(row.locator(".message")).to_have_text("78,498 primes below 1,000,000")
    page.screenshot(path=str(tmp_path / "long.png"))

    info = task_json(page, key)
    assert info["state"] == "finished" and info["result"] == 78498
    assert info["progress"]["done"] == 20 and info["progress"]["total"] == 20
    assert info["progress"]["fraction"] == 1.0


def test_cancel_waiting_task(page, tmp_path):
    page.goto("/long")
    # LONG_EXECUTOR_MAX_WORKERS=2: two tasks of ~2.5 s occupy both workers...
    first = start_long_task(page, limit=100_000, steps=10, delay=0.25)
    second = start_long_task(page, limit=100_000, steps=10, delay=0.25)
    # ...so the third waits for a worker and can still be cancelled.
    third = start_long_task(page, limit=100_000, steps=10, delay=0.25)
    rows = {key: page.locator(f'#tasks tr[data-key="{key}"]') for key in (first, second, third)}

    expect(rows[third].locator(".state")).to_have_text("pending")
    expect(rows[third].locator("button.cancel")).to_be_enabled()
    for key in (first, second):
        expect(rows[key].locator(".state")).to_have_text("running")
        expect(rows[key].locator("button.cancel")).to_be_disabled()

    rows[third].locator("button.cancel").click()
    expect(rows[third].locator(".state")).to_have_text("cancelled")
    expect(rows[third].locator(".result")).to_have_text("cancelled: never ran")

    # the two running tasks were not affected and finish normally
    for key in (first, second):
        expect(rows[key].locator(".state")).to_have_text("finished")
        expect(rows[key].locator(".result")).to_have_text("9,592 primes")
    info = task_json(page, third)
    assert info["state"] == "cancelled"
    assert info["progress"] is None, "a cancelled task must never have run"
    # cancelling again is refused politely: it is already cancelled, nothing runs
    again = page.request.post(f"/api/tasks/{third}/cancel").json()
    assert again["state"] == "cancelled"
    # a finished task cannot be cancelled
    late = page.request.post(f"/api/tasks/{first}/cancel").json()
    assert late == {"key": first, "cancelled": False, "state": "finished"}
    page.screenshot(path=str(tmp_path / "cancel.png"))

    page.goto("/status")
    expect(page.locator(f'#status tr[data-key="{third}"] td.state')).to_have_text("cancelled")
    for key in (first, second):
        expect(page.locator(f'#status tr[data-key="{key}"] td.state')).to_have_text("finished")
    page.screenshot(path=str(tmp_path / "status.png"))


def test_status_page_lists_stored_tasks(page, tmp_path):
    response = page.request.post("/api/long", data={"limit": 1000, "steps": 2, "delay": 0})
    assert response.status == 202, response.text()
    key = response.json()["key"]
    wait_until(lambda: task_json(page, key)["state"] == "finished", 30, what=f"{key} to finish")
    page.goto("/status")
    row = page.locator(f'#status tr[data-key="{key}"]')
    expect(row.locator("td").first).to_have_text("long")
    expect(row.locator("td.state")).to_have_text("finished")
    expect(row).to_contain_text("2/2")
    keys = {t["key"] for t in page.request.get("/api/tasks").json()}
    rendered = set(
        page.locator("#status tbody tr[data-key]").evaluate_all("rows => rows.map(r => r.dataset.key)")
    )
    assert key in rendered and rendered <= keys | {key}
    page.screenshot(path=str(tmp_path / "status.png"))


def upload_in_browser(page, name, data, mime="text/csv"):
    page.goto("/csv")
    page.set_input_files("input[type=file]", files=[{"name": name, "mimeType": mime, "buffer": data}])
    page.click("#csv-form button[type=submit]")


def test_csv_page_shows_numbers_in_full(page, tmp_path):
    upload_in_browser(page, "numbers.csv", CSV_NUMBERS.encode())
    page.wait_for_url("**/csv/csv-*")
    expect(page.locator("#state")).to_have_text("finished")
    for column, cells in CSV_NUMBERS_EXPECTED.items():
        expect(page.locator(f'#stats tr[data-column="{column}"] td')).to_have_text(cells)
    page.screenshot(path=str(tmp_path / "csv-numbers.png"))
    # the page's formatter on more values than a small CSV file holds
    values = [100000.2, 100000, 0.5, -3, 1e-7, 0, -0.000123, 0.1 + 0.2, 1 / 3, 123456789.125, 1e21, -2.5e-300]
    shown = page.evaluate("values => values.map(fmt)", values)
    assert shown == [
        "100000.2",
        "100000",
        "0.5",
        "-3",
        "1e-7",
        "0",
        "-0.000123",
        "0.3",
        "0.333333333333333",
        "123456789.125",
        "1e+21",
        "-2.5e-300",
    ]


def test_csv_page_lists_columns_in_file_order(page):
    upload_in_browser(page, "order.csv", CSV_ORDER_TEXT.encode())
    page.wait_for_url("**/csv/csv-*")
    expect(page.locator("#state")).to_have_text("finished")
    rows = page.locator("#stats tbody tr")
    expect(rows).to_have_count(len(CSV_ORDER_NUMERIC))
    assert rows.evaluate_all("rows => rows.map(r => r.dataset.column)") == CSV_ORDER_NUMERIC
    expect(page.locator("#summary")).to_contain_text("(not numeric: name)")


def test_csv_form_shows_why_an_upload_is_refused(page):
    upload_in_browser(page, "photo.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", mime="image/png")
    expect(page.locator(".flash.error")).to_have_text(
        "photo.png is not a CSV file: expected a .csv or .txt file"
    )
    upload_in_browser(page, "empty.csv", b"")
    expect(page.locator(".flash.error")).to_have_text("empty.csv is empty")
    assert "/csv/" not in page.url  # no task, no result page


# --------------------------------------------------------------------------
# the demo under gunicorn -w 2, its workers sharing stored futures
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gunicorn_server(browser, tmp_path_factory):
    srv = DemoServer(str(tmp_path_factory.mktemp("demo-gunicorn")), workers=2)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()
        print("---- gunicorn log ----\n" + srv.tail(200))


@pytest.fixture
def gunicorn_page(browser, gunicorn_server):
    with demo_page(browser, gunicorn_server) as (page, errors):
        yield page
    assert not errors, f"JavaScript errors on the page: {errors}"


def worker_pid(response):
    return int(response.headers["x-worker-pid"])


def is_post_to(path):
    return lambda response: response.request.method == "POST" and response.url.split("?")[0].endswith(path)


def test_status_page_of_either_gunicorn_worker_lists_the_tasks_of_both(
    gunicorn_page, gunicorn_server, tmp_path
):
    page, workers = gunicorn_page, gunicorn_server.worker_pids()
    assert len(workers) == 2
    accepted = {}  # task key -> pid of the worker that accepted the request, and so runs the task
    signups = {}  # address -> pid of the worker that served the sign-up
    # Each request comes on a connection of its own (gunicorn's sync workers close them), and
    # either worker may take it: go on until each has taken some of each kind.
    for round_number in range(20):
        address = f"worker-{round_number}-{uuid.uuid4().hex[:6]}@example.com"
        page.goto("/signup")
        page.fill("input[name=name]", f"Worker test {round_number}")
        page.fill("input[name=email]", address)
        with page.expect_response(is_post_to("/signup")) as posted:
            page.click("#signup-form button[type=submit]")
        signups[address] = worker_pid(posted.value)
        expect(page.locator(".flash.ok")).to_contain_text("A confirmation mail is on its way")

        page.goto("/csv")
        page.set_input_files(
            "input[type=file]",
            files=[{"name": "weather.csv", "mimeType": "text/csv", "buffer": CSV_TEXT.encode()}],
        )
        with page.expect_response(is_post_to("/csv")) as posted:
            page.click("#csv-form button[type=submit]")
        key = posted.value.headers["location"].split("/csv/", 1)[1].split("?")[0]
        accepted[key] = worker_pid(posted.value)
        # The result page polls the task, whichever worker answers each poll.
        expect(page.locator("#state")).to_have_text("finished")

        page.goto("/long")
        with page.expect_response(is_post_to("/api/long")) as posted:
            start_long_task(page, limit=20_000, steps=2, delay=0)
        accepted[posted.value.json()["key"]] = worker_pid(posted.value)

        kinds = [set(signups.values()), set(accepted.values())]
        if round_number >= 1 and all(pids == workers for pids in kinds):
            break
    assert set(signups.values()) == workers, f"one worker took every sign-up: {signups}"
    assert set(accepted.values()) == workers, f"one worker took every task: {accepted}"

    # The mail tasks, by their keys (mail-<user id>-...), accepted by the worker that signed up.
    users = {u["email"]: u["id"] for u in page.request.get("/api/users").json()}
    keys = [t["key"] for t in page.request.get("/api/tasks").json()]
    for address, pid in signups.items():
        (key,) = [k for k in keys if k.startswith(f"mail-{users[address]}-")]
        accepted[key] = pid
    for key in accepted:
        wait_until(lambda key=key: task_json(page, key)["state"] == "finished", 30, what=f"{key} to finish")

    # Whichever worker renders the status page, it lists every task of both, finished.
    rendered_by = set()
    for _ in range(40):
        page.goto("/status")
        rendered_by.add(int(page.locator("#served-by").text_content()))
        states = dict(
            page.locator("#status tbody tr[data-key]").evaluate_all(
                "rows => rows.map(r => [r.dataset.key, r.querySelector('td.state').textContent])"
            )
        )
        assert {key: states.get(key) for key in accepted} == dict.fromkeys(accepted, "finished")
        expect(page.locator("#status")).to_contain_text("long")
        if rendered_by == workers:
            break
    assert rendered_by == workers, f"the status page was always rendered by {rendered_by}"
    page.screenshot(path=str(tmp_path / "status-two-workers.png"))

    # The mails of both workers' tasks, whichever worker renders the mail page.
    rendered_by = set()
    for _ in range(40):
        page.goto("/mails")
        rendered_by.add(int(page.locator("#served-by").text_content()))
        for address in signups:
            expect(page.locator("#mails tbody tr", has_text=address)).to_have_count(1)
        if rendered_by == workers:
            break
    assert rendered_by == workers, f"the mail page was always rendered by {rendered_by}"


# --------------------------------------------------------------------------
# API tests with Flask's test client (no browser, no subprocess)
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_app(tmp_path_factory):
    import demo

    controller = demo.start_mail_sink()
    db_path = tmp_path_factory.mktemp("demo-api") / "demo.db"
    app = demo.create_app(
        {
            "TESTING": True,
            "SQLALCHEMY_DATABASE_URI": f"sqlite:///{db_path}",
            "MAIL_SERVER": controller.hostname,
            "MAIL_PORT": controller.port,
            "MAIL_SINK": controller.sink,
        }
    )
    try:
        yield app
    finally:
        for ex in demo.EXECUTORS.values():
            ex.shutdown(wait=True, cancel_futures=True)
        controller.stop()


@pytest.fixture
def client(demo_app):
    return demo_app.test_client()


def poll_task(client, key, states=("finished", "failed", "cancelled"), timeout=30):
    def check():
        info = client.get(f"/api/tasks/{key}").get_json()
        return info if info.get("state") in states else None

    return wait_until(check, timeout, what=f"{key} in {states}")


def upload_csv(client, text, name="data.csv"):
    """POST a CSV file as the form does; the key of the task it started."""
    data = text.encode() if isinstance(text, str) else text
    response = client.post(
        "/csv", data={"file": (io.BytesIO(data), name)}, content_type="multipart/form-data"
    )
    assert response.status_code == 302, response.get_data(as_text=True)
    return response.headers["Location"].split("/csv/", 1)[1].split("?")[0]


def task_count(client, executor):
    return len([t for t in client.get("/api/tasks").get_json() if t["executor"] == executor])


def flash_errors(response):
    """The error messages an HTML page shows."""
    found = re.findall(r'<div class="flash error">(.*?)</div>', response.get_data(as_text=True), re.S)
    return [html.unescape(message) for message in found]


def status_detail(client, key):
    """The Detail cell of ``key`` on the status page."""
    page = client.get("/status").get_data(as_text=True)
    row = re.search(rf'<tr data-key="{re.escape(key)}">(.*?)</tr>', page, re.S)
    assert row, f"{key} is not on the status page"
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row.group(1), re.S)
    return html.unescape(cells[-1]).strip()


def test_api_pages_render(client):
    for path in ("/", "/signup", "/csv", "/long", "/status", "/mails"):
        response = client.get(path)
        assert response.status_code == 200, path
    assert client.get("/api/tasks/nope").status_code == 404
    assert client.post("/api/tasks/nope/cancel").status_code == 404
    assert client.get("/csv/nope").status_code == 404


def test_api_signup_mails_in_background(client):
    address = f"ada-{uuid.uuid4().hex[:6]}@example.com"
    response = client.post("/signup", data={"name": "Ada", "email": address})
    assert response.status_code == 302

    def mailed():
        return [u for u in client.get("/api/users").get_json() if u["email"] == address and u["mailed"]]

    wait_until(mailed, 20, what="the user to be marked mailed")
    mails = [m for m in client.get("/api/mails").get_json() if address in m["to"]]
    assert len(mails) == 1 and "Hello Ada" in mails[0]["body"]
    # a second sign-up with the same address is refused, no second mail
    client.post("/signup", data={"name": "Ada", "email": address})
    assert len([u for u in client.get("/api/users").get_json() if u["email"] == address]) == 1


def test_api_csv_stats(client):
    response = client.post(
        "/csv",
        data={"file": (io.BytesIO(CSV_TEXT.encode()), "w.csv")},
        content_type="multipart/form-data",
    )
    assert response.status_code == 302
    key = response.headers["Location"].split("/csv/", 1)[1].split("?")[0]
    info = poll_task(client, key)
    assert info["state"] == "finished", info
    result = info["result"]
    assert result["rows"] == 4 and result["non_numeric"] == ["city"]
    assert result["columns"][1] == {
        "name": "rain",
        "count": 3,
        "mean": 4.0,
        "min": 0.0,
        "max": 10.0,
    }
    assert result["pid"] != os.getpid()


def test_api_csv_error_in_worker_fails_task_cleanly(client):
    # The view checks the header row only; a malformed later row fails in the worker process.
    text = "a,b\n1," + "x" * 200_000 + "\n"  # a field longer than csv.field_size_limit()
    key = upload_csv(client, text, "long-field.csv")
    info = poll_task(client, key)
    assert info["state"] == "failed", info
    assert info["error"] == "Error: field larger than field limit (131072)", info
    # csv_stats itself still refuses empty text (the view no longer submits it)
    from demo_tasks import csv_stats

    with pytest.raises(ValueError, match="empty"):
        csv_stats("")


def test_api_long_progress_and_cancel(client):
    keys = [
        client.post("/api/long", json={"limit": 50_000, "steps": 8, "delay": 0.2}).get_json()["key"]
        for _ in range(3)
    ]
    wait_until(
        lambda: all(client.get(f"/api/tasks/{k}").get_json()["state"] == "running" for k in keys[:2]),
        10,
        what="two running tasks",
    )
    assert client.get(f"/api/tasks/{keys[2]}").get_json()["state"] == "pending"
    assert client.post(f"/api/tasks/{keys[2]}/cancel").get_json() == {
        "key": keys[2],
        "cancelled": True,
        "state": "cancelled",
    }

    seen = set()

    def finished():
        info = client.get(f"/api/tasks/{keys[0]}").get_json()
        if info["progress"]:
            seen.add(info["progress"]["done"])
        return info if info["state"] == "finished" else None

    info = wait_until(finished, 30, interval=0.02, what="the first task to finish")
    assert info["result"] == 5133
    assert info["progress"]["done"] == info["progress"]["total"] == 8
    assert any(0 < d < 8 for d in seen), seen
    assert poll_task(client, keys[1])["result"] == 5133
    assert client.get(f"/api/tasks/{keys[2]}").get_json()["progress"] is None
    bad = client.post("/api/long", json={"limit": "many"})
    assert bad.status_code == 400


# ---- bad input: a 4xx answer saying what was wrong, never a 500 ---------------


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("[1, 2]", "the request body must be a JSON object, not an array"),
        ("[]", "the request body must be a JSON object, not an array"),
        ("null", "the request body must be a JSON object, not null"),
        ("0", "the request body must be a JSON object, not a number"),
        ('"limit=5"', "the request body must be a JSON object, not a string"),
        ("true", "the request body must be a JSON object, not a boolean"),
        ("{limit: 5}", "the request body is not valid JSON"),
        ("", "the request body is not valid JSON"),
        ('{"limit": 1' + "0" * 5000 + "}", "the request body is not valid JSON"),  # over int's digit limit
    ],
)
def test_api_long_rejects_json_that_is_not_an_object(client, body, error):
    before = task_count(client, "long")
    response = client.post("/api/long", data=body, content_type="application/json")
    assert response.status_code == 400, response.get_data(as_text=True)
    assert response.get_json() == {"error": error}
    assert task_count(client, "long") == before, "bad input must not start a task"


@pytest.mark.parametrize(
    ("body", "field", "error"),
    [
        ('{"limit": "many"}', "limit", "limit must be a whole number, not 'many'"),
        ('{"limit": null}', "limit", "limit must be a whole number, not null"),
        ('{"limit": true}', "limit", "limit must be a whole number, not a boolean"),
        ('{"limit": [1000]}', "limit", "limit must be a whole number, not an array"),
        ('{"limit": {"value": 1000}}', "limit", "limit must be a whole number, not an object"),
        ('{"limit": 2.5}', "limit", "limit must be a whole number, not 2.5"),
        ('{"limit": -5}', "limit", "limit must be from 2 to 50,000,000, not -5"),
        ('{"limit": 1e30}', "limit", "limit must be from 2 to 50,000,000, not 1e+30"),
        ('{"limit": 1e400}', "limit", "limit must be from 2 to 50,000,000, not inf"),
        (
            '{"limit": 1' + "0" * 400 + "}",
            "limit",
            "limit must be from 2 to 50,000,000, not 1" + "0" * 38 + "…",  # cut to 40 characters
        ),
        ('{"limit": "Infinity"}', "limit", "limit must be from 2 to 50,000,000, not 'Infinity'"),
        ('{"steps": 0}', "steps", "steps must be from 1 to 200, not 0"),
        ('{"steps": 201}', "steps", "steps must be from 1 to 200, not 201"),
        ('{"delay": -0.5}', "delay", "delay must be from 0 to 5, not -0.5"),
        ('{"delay": NaN}', "delay", "delay must be from 0 to 5, not nan"),
        ('{"delay": "nan"}', "delay", "delay must be from 0 to 5, not 'nan'"),
        ('{"delay": 1e9}', "delay", "delay must be from 0 to 5, not 1000000000.0"),
        ('{"limt": 1000}', "limt", "unknown field 'limt': the fields are limit, steps, delay"),
    ],
)
def test_api_long_rejects_bad_values(client, body, field, error):
    before = task_count(client, "long")
    response = client.post("/api/long", data=body, content_type="application/json")
    assert response.status_code == 400, response.get_data(as_text=True)
    assert response.get_json() == {"error": error, "field": field}
    assert task_count(client, "long") == before, "bad input must not start a task"


def test_api_long_checks_form_fields_too(client):
    response = client.post("/api/long", data={"limit": "", "steps": "2", "delay": "0"})
    assert response.status_code == 400
    assert response.get_json() == {"error": "limit must be a whole number, not ''", "field": "limit"}
    response = client.post("/api/long", data={"limit": "1000", "steps": "-1", "delay": "0"})
    assert response.get_json() == {"error": "steps must be from 1 to 200, not '-1'", "field": "steps"}
    # numbers as JSON numbers or as strings (what the page sends), whole floats for integers
    response = client.post("/api/long", json={"limit": "1e3", "steps": 2.0, "delay": "0"})
    assert response.status_code == 202, response.get_data(as_text=True)
    body = response.get_json()
    assert (body["limit"], body["steps"], body["delay"]) == (1000, 2, 0.0)
    assert poll_task(client, body["key"])["result"] == 168


def test_api_errors_are_json(client):
    response = client.get("/api/long")
    assert response.status_code == 405
    assert response.get_json()["error"].startswith("Method Not Allowed")
    response = client.get("/api/nothing-here")
    assert response.status_code == 404 and response.get_json()["error"].startswith("Not Found")


def users_named(client, email):
    return [u for u in client.get("/api/users").get_json() if u["email"] == email]


@pytest.mark.parametrize(
    ("form", "field", "error"),
    [
        ({"email": "x@example.com"}, "name", "name is missing"),
        ({"name": "X"}, "email", "email is missing"),
        ({"name": "   ", "email": "x@example.com"}, "name", "name is empty"),
        ({"name": "X" * 101, "email": "x@example.com"}, "name", "name is longer than 100 characters"),
        (
            {"name": "X", "email": "x" * 190 + "@example.com"},
            "email",
            "email is longer than 200 characters",
        ),
        ({"name": "X", "email": "no-at-sign"}, "email", "'no-at-sign' is not an email address"),
        ({"name": "X", "email": "x@"}, "email", "'x@' is not an email address"),
        ({"name": "X", "email": "@example.com"}, "email", "'@example.com' is not an email address"),
        ({"name": "X", "email": "x y@example.com"}, "email", "'x y@example.com' is not an email address"),
        (  # a line break would add a header to the mail
            {"name": "X", "email": "x@example.com\r\nBcc: y@example.com"},
            "email",
            "'x@example.com\\r\\nBcc: y@example.com' is not an email address",
        ),
        (
            {"name": "X", "email": "x@example.com", "admin": "1"},
            "admin",
            "unknown field 'admin': the fields are name, email",
        ),
    ],
)
def test_api_signup_rejects_bad_input(client, form, field, error):
    before = client.get("/api/users").get_json()
    # a browser posting the form: the sign-up page, status 400, with the message and what was typed
    response = client.post("/signup", data=form)
    assert response.status_code == 400, response.status
    assert flash_errors(response) == [error]
    if field == "name" and form.get("name", "").strip():
        assert f'value="{form["name"]}"' in response.get_data(as_text=True)
    # a client asking for JSON gets the message as JSON
    response = client.post("/signup", data=form, headers={"Accept": "application/json"})
    assert response.status_code == 400
    assert response.get_json() == {"error": error, "field": field}
    assert client.get("/api/users").get_json() == before, "bad input must not store a user"


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ('["Ada", "ada@example.com"]', "the request body must be a JSON object, not an array"),
        ('"Ada"', "the request body must be a JSON object, not a string"),
        ("not json", "the request body is not valid JSON"),
    ],
)
def test_api_signup_rejects_json_that_is_not_an_object(client, body, error):
    response = client.post("/signup", data=body, content_type="application/json")
    assert response.status_code == 400
    assert response.get_json() == {"error": error}


def test_api_signup_wrong_types_and_duplicates(client):
    response = client.post("/signup", json={"name": ["Ada"], "email": "ada@example.com"})
    assert response.status_code == 400
    assert response.get_json() == {"error": "name must be a string, not an array", "field": "name"}
    address = f"lin-{uuid.uuid4().hex[:6]}@example.com"
    response = client.post("/signup", json={"name": "Lin", "email": address})
    assert response.status_code == 201, response.get_data(as_text=True)
    assert response.get_json()["user"]["email"] == address
    again = client.post("/signup", json={"name": "Lin", "email": address})
    assert again.status_code == 409
    assert again.get_json() == {"error": f"{address} is already signed up", "field": "email"}
    again = client.post("/signup", data={"name": "Lin", "email": address})
    assert again.status_code == 409 and flash_errors(again) == [f"{address} is already signed up"]
    assert len(users_named(client, address)) == 1


PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01"


@pytest.mark.parametrize(
    ("upload", "error"),
    [
        (None, "no file: choose a CSV file"),
        ((b"a,b\n1,2\n", ""), "no file: choose a CSV file"),
        ((b"", "empty.csv"), "empty.csv is empty"),
        ((b"\n  \r\n\n", "blank.csv"), "blank.csv is empty"),
        ((b"\xef\xbb\xbf", "bom.csv"), "bom.csv is empty"),
        ((PNG, "photo.png"), "photo.png is not a CSV file: expected a .csv or .txt file"),
        ((b'{"a": 1}', "data.json"), "data.json is not a CSV file: expected a .csv or .txt file"),
        ((PNG, "photo.csv"), "photo.csv is not a CSV file: it holds binary data"),
        (("prix,été\n1,2\n".encode("latin-1"), "latin1.csv"), "latin1.csv is not UTF-8 text"),
    ],
)
def test_api_csv_rejects_bad_uploads(client, upload, error):
    def post(**kwargs):  # the test client closes the file it sends: a new one each time
        data = {} if upload is None else {"file": (io.BytesIO(upload[0]), upload[1])}
        return client.post("/csv", data=data, content_type="multipart/form-data", **kwargs)

    before = task_count(client, "cpu")
    # a browser posting the form: the upload page, status 400, with the message
    response = post()
    assert response.status_code == 400, response.status
    assert flash_errors(response) == [error]
    # a client asking for JSON gets the message as JSON
    response = post(headers={"Accept": "application/json"})
    assert response.status_code == 400
    assert response.get_json() == {"error": error, "field": "file"}
    assert task_count(client, "cpu") == before, "bad input must not start a task"


def test_api_csv_too_large_upload_answers_413_with_message(client):
    def post(**kwargs):
        big = io.BytesIO(b"a\n" + b"1\n" * (1024 * 1024 + 1))  # over the 2 MiB MAX_CONTENT_LENGTH
        return client.post(
            "/csv", data={"file": (big, "big.csv")}, content_type="multipart/form-data", **kwargs
        )

    response = post(headers={"Accept": "application/json"})
    assert response.status_code == 413
    assert response.get_json() == {"error": "the request is larger than the limit of 2 MiB"}
    response = post()
    assert response.status_code == 413
    assert flash_errors(response) == ["the request is larger than the limit of 2 MiB"]


def test_api_csv_huge_values_keep_their_mean(client):
    info = poll_task(client, upload_csv(client, "x\n1e308\n1.5e308\n-2\n"))
    assert info["state"] == "finished", info  # the sum overflows a float; the mean does not
    column = info["result"]["columns"][0]
    assert column["mean"] == pytest.approx(1e308 / 3 + 1.5e308 / 3 - 2 / 3)
    assert (column["min"], column["max"]) == (-2, 1.5e308)


# ---- CSV columns in the file's order --------------------------------------


def test_api_csv_columns_in_file_order(client):
    info = poll_task(client, upload_csv(client, CSV_ORDER_TEXT, "order.csv"))
    assert info["state"] == "finished", info
    result = info["result"]
    assert [column["name"] for column in result["columns"]] == CSV_ORDER_NUMERIC
    assert result["non_numeric"] == ["name"]
    # the JSON text itself lists them in that order (the page reads it as it comes)
    raw = client.get(f"/api/tasks/{info['key']}").get_data(as_text=True)
    positions = [raw.index(f'"name":{json.dumps(name)}') for name in CSV_ORDER_NUMERIC]
    assert positions == sorted(positions)


def test_api_csv_duplicate_column_names_stay_apart(client):
    info = poll_task(client, upload_csv(client, "a,b,a\n1,2,30\n3,4,50\n"))
    columns = info["result"]["columns"]
    assert [(c["name"], c["min"], c["max"]) for c in columns] == [("a", 1, 3), ("b", 2, 4), ("a", 30, 50)]


# ---- the status page says what each task did -------------------------------


def test_status_detail_describes_finished_and_failed_tasks(client):
    # a mail task: the address it went to
    address = f"mary-{uuid.uuid4().hex[:6]}@example.com"
    response = client.post("/signup", data={"name": "Mary", "email": address})
    assert response.status_code == 302
    wait_until(lambda: [u for u in users_named(client, address) if u["mailed"]], 20, what="the mail")
    (user,) = users_named(client, address)
    tasks = client.get("/api/tasks").get_json()
    (mail_key,) = [t["key"] for t in tasks if t["key"].startswith(f"mail-{user['id']}-")]
    poll_task(client, mail_key)
    assert status_detail(client, mail_key) == f"mailed {address}"

    # a CSV task: the file name, rows and columns
    csv_key = upload_csv(client, CSV_TEXT, "weather.csv")
    assert poll_task(client, csv_key)["state"] == "finished"
    assert status_detail(client, csv_key) == "weather.csv: 4 rows, 3 columns (2 numeric)"

    # a failed task: its error
    failed_key = upload_csv(client, "a,b\n1," + "x" * 200_000 + "\n", "long-field.csv")
    assert poll_task(client, failed_key)["state"] == "failed"
    assert status_detail(client, failed_key) == "Error: field larger than field limit (131072)"

    # /api/tasks carries the same text
    details = {t["key"]: t.get("detail") for t in client.get("/api/tasks").get_json()}
    assert details[mail_key] == f"mailed {address}"
    assert details[csv_key] == "weather.csv: 4 rows, 3 columns (2 numeric)"
