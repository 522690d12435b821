"""End-to-end tests of the demo app (examples/demo.py).

* Browser tests: the demo runs as a real server (``python examples/demo.py`` in
  a subprocess, werkzeug, 127.0.0.1, free port) and headless Chromium is driven
  with Playwright.  They are skipped - with the reason printed - only when no
  browser is available: Playwright not importable or no Chromium executable
  (``/usr/bin/chromium``, or ``CHROMIUM_PATH``).  Playwright's own browser
  downloads are not used.
* API tests: the same scenarios through Flask's test client, no browser needed.

Run from the repository root::

    python -m pip install -r examples/requirements.txt playwright pytest pytest-timeout
    python -m pytest examples/test_demo.py -rs
"""

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    sync_playwright = expect = None

# Every test is bounded (pytest-timeout); every wait inside a test has its own bound.
pytestmark = pytest.mark.timeout(180)

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 30_000  # default bound of every Playwright wait

CSV_TEXT = "city,temperature,rain\nOslo,4.5,10\nRome,18,2\nCairo,30.5,0\nLima,12,\n"
# Expected statistics of CSV_TEXT, as the result page displays them.
CSV_EXPECTED = {
    "temperature": ["temperature", "4", "16.25", "4.5", "30.5"],
    "rain": ["rain", "3", "4", "0", "10"],
}


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def find_chromium():
    candidates = [
        os.environ.get("CHROMIUM_PATH"),
        "/usr/bin/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def browser_missing_reason():
    if sync_playwright is None:
        return "Playwright for Python is not installed (pip install playwright)"
    if find_chromium() is None:
        return (
            "no Chromium executable: install Debian's chromium package "
            "(apt-get install chromium) or set CHROMIUM_PATH"
        )
    return None


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout, interval=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class DemoServer:
    """``python examples/demo.py`` in a subprocess, on a free port."""

    def __init__(self, workdir):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(workdir, "demo-server.log")
        env = dict(
            os.environ,
            PORT=str(self.port),
            HOST="127.0.0.1",
            PYTHONUNBUFFERED="1",
            DATABASE_URL="sqlite:///" + os.path.join(workdir, "demo.db"),
        )
        for key in ("MAIL_SERVER", "MAIL_PORT"):  # always use the built-in SMTP sink
            env.pop(key, None)
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "demo.py")],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"demo server exited with {self.proc.returncode}:\n{self.tail()}")
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
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # our own process group only
                self.proc.wait(timeout=10)
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


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1000, "height": 700}, base_url=server.url)
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
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
    assert info["result"]["columns"]["temperature"] == {
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
    assert result["columns"]["rain"] == {
        "count": 3,
        "mean": 4.0,
        "min": 0.0,
        "max": 10.0,
    }
    assert result["pid"] != os.getpid()


def test_api_csv_bad_input_fails_cleanly(client):
    response = client.post(
        "/csv",
        data={"file": (io.BytesIO(b""), "empty.csv")},
        content_type="multipart/form-data",
    )
    key = response.headers["Location"].split("/csv/", 1)[1].split("?")[0]
    info = poll_task(client, key)
    assert info["state"] == "failed" and "empty" in info["error"], info


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
