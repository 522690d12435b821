"""Tests of the upload recipe (upload_analysis.py): the upload is answered before its
analysis runs, and the result page polls until the analysis is done."""

import io
import statistics
import threading

import pytest
import upload_analysis
from servers import free_port, wait_until
from werkzeug.serving import make_server

try:
    from playwright.sync_api import expect
except ImportError:  # pragma: no cover - the browser fixture skips then
    expect = None

pytestmark = pytest.mark.timeout(120)

CSV = "city,temperature,rain\nOslo,4.5,10\nRome,18,2\nCairo,30.5,0\nLima,12,\n"


@pytest.fixture
def app():
    # One worker thread, so that a test can keep it busy and see an upload wait for it.
    return upload_analysis.create_app({"TESTING": True, "EXECUTOR_MAX_WORKERS": 1})


def upload(client, data, name="weather.csv"):
    return client.post(
        "/analyses", data={"file": (io.BytesIO(data), name)}, content_type="multipart/form-data"
    )


def poll(client, url):
    def done():
        answer = client.get(url).get_json()
        return answer if answer["state"] in ("done", "failed") else None

    return wait_until(done, 20, what=f"{url} to finish")


def test_upload_is_answered_before_its_analysis_runs(app):
    client = app.test_client()
    release = threading.Event()
    with app.app_context():
        busy = upload_analysis.executor.submit(release.wait, 20)  # keeps the only worker busy
    try:
        response = upload(client, CSV.encode())
        assert response.status_code == 303
        page_url = response.headers["Location"]
        key = page_url.split("/analyses/", 1)[1].split("?")[0]
        # The view has answered, and the analysis has not even started: it waits for the worker.
        assert client.get(f"/api/analyses/{key}").get_json() == {"state": "waiting"}
        assert client.get(page_url).status_code == 200
    finally:
        release.set()
    assert busy.result(timeout=10) is True
    answer = poll(client, f"/api/analyses/{key}")
    assert answer["state"] == "done", answer
    result = answer["result"]
    assert result["rows"] == 4 and result["columns"] == ["city", "temperature", "rain"]
    temperature, rain = result["numeric"]
    assert temperature == {
        "name": "temperature",
        "count": 4,
        "mean": 16.25,
        "median": 15.0,
        "stdev": statistics.stdev([4.5, 18, 30.5, 12]),
        "min": 4.5,
        "max": 30.5,
    }
    assert (rain["name"], rain["count"], rain["mean"]) == ("rain", 3, 4.0)


def test_an_analysis_that_fails_says_why(app):
    client = app.test_client()
    response = upload(client, b"")
    key = response.headers["Location"].split("/analyses/", 1)[1].split("?")[0]
    assert poll(client, f"/api/analyses/{key}") == {"state": "failed", "error": "the file is empty"}


@pytest.mark.parametrize(
    ("data", "error"),
    [(None, "choose a CSV file to upload"), (b"caf\xe9,1\n", "latin1.csv is not UTF-8 text")],
)
def test_a_bad_upload_is_refused_in_the_view(app, data, error):
    client = app.test_client()
    before = upload_analysis.executor.futures.keys()
    if data is None:
        response = client.post("/analyses", data={}, content_type="multipart/form-data")
    else:
        response = upload(client, data, "latin1.csv")
    assert response.status_code == 400
    assert response.get_json() == {"error": error}
    assert upload_analysis.executor.futures.keys() == before, "no analysis may start"


def test_unknown_analysis_is_404(app):
    client = app.test_client()
    assert client.get("/analyses/analysis-nothing").status_code == 404
    assert client.get("/api/analyses/analysis-nothing").status_code == 404


@pytest.fixture
def live_server(app):
    """The app served by werkzeug on a free port of 127.0.0.1, in a thread of this process."""
    server = make_server("127.0.0.1", free_port(), app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)


def test_result_page_fills_in_when_the_analysis_is_done(live_server, page):
    page.goto(live_server + "/")
    page.set_input_files(
        "input[type=file]", files=[{"name": "weather.csv", "mimeType": "text/csv", "buffer": CSV.encode()}]
    )
    page.click("button")
    page.wait_for_url("**/analyses/analysis-*")
    expect(page.locator("h1")).to_have_text("Analysis of weather.csv")
    expect(page.locator("#state")).to_have_text("done")
    expect(page.locator("#stats tbody tr")).to_have_count(2)
    expect(page.locator('tr[data-column="temperature"] td')).to_have_text(
        ["temperature", "4", "16.25", "15", str(statistics.stdev([4.5, 18, 30.5, 12])), "4.5", "30.5"]
    )
