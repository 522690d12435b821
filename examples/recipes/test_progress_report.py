"""Tests of the long-task recipe (progress_report.py): progress polled by later requests, in
one process and across the two workers of a real gunicorn sharing a store."""

import progress_report
import pytest
from servers import Gunicorn, recipe_env, wait_until

try:
    from playwright.sync_api import expect
except ImportError:  # pragma: no cover - the browser fixture skips then
    expect = None

pytestmark = pytest.mark.timeout(120)

ITEMS = 12
SUM_OF_SQUARES = sum(n * n for n in range(1, ITEMS + 1))


@pytest.fixture
def client():
    return progress_report.create_app({"TESTING": True}).test_client()


def test_status_reports_progress_then_the_result(client):
    response = client.post("/reports", json={"items": ITEMS, "pause": 0.05})
    assert response.status_code == 202
    started = response.get_json()
    assert response.headers["Location"] == started["status_url"] == f"/reports/{started['key']}"

    seen = []

    def finished():
        status = client.get(started["status_url"]).get_json()
        if "progress" in status:
            seen.append(status["progress"]["done"])
        return status if status["state"] == "done" else None

    status = wait_until(finished, 20, interval=0.01, what="the report")
    assert status["result"]["sum_of_squares"] == SUM_OF_SQUARES
    assert status["progress"] == {"done": ITEMS, "total": ITEMS, "percent": 100, "message": "item 12 of 12"}
    assert any(0 < done < ITEMS for done in seen), seen  # progress was visible while it ran
    assert seen == sorted(seen), f"progress went backwards: {seen}"


def test_status_of_an_unknown_report_is_404(client):
    response = client.get("/reports/report-nothing")
    assert response.status_code == 404
    assert response.get_json() == {"error": "no report 'report-nothing'"}


@pytest.mark.parametrize("body", [{"items": "many"}, {"items": 0}, {"pause": None}, {"pause": "nan"}])
def test_bad_input_starts_nothing(client, body):
    before = progress_report.executor.futures.keys()
    response = client.post("/reports", json=body)
    assert response.status_code == 400
    assert "error" in response.get_json()
    assert progress_report.executor.futures.keys() == before


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The recipe under ``gunicorn -w 2``, its workers sharing a SQLite store."""
    tmp = tmp_path_factory.mktemp("progress")
    env = recipe_env(EXECUTOR_FUTURES_STORE=str(tmp / "futures.db"))
    server = Gunicorn("progress_report:create_app()", str(tmp / "gunicorn.log"), workers=2, env=env)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_any_worker_reports_the_progress_of_a_task_another_worker_runs(server):
    status, headers, started = server.post("/reports", {"items": 30, "pause": 0.1})
    assert status == 202
    runner = int(headers["X-Worker-Pid"])  # the worker that accepted the task runs it
    answers = []  # (worker, state, done) for each poll, each on a connection of its own

    def finished_and_both_workers_answered():
        _, headers, status = server.get(started["status_url"])
        answers.append(
            (int(headers["X-Worker-Pid"]), status["state"], status.get("progress", {}).get("done"))
        )
        workers = {worker for worker, _, _ in answers}
        return status if status["state"] == "done" and len(workers) == 2 else None

    final = wait_until(finished_and_both_workers_answered, 30, interval=0.02, what="the report, from both")
    assert final["result"]["sum_of_squares"] == sum(n * n for n in range(1, 31))
    assert final["result"]["pid"] == runner
    assert {worker for worker, _, _ in answers} == server.worker_pids()
    # The other worker saw the task running, with its progress, through the store.
    from_other = [(state, done) for worker, state, done in answers if worker != runner]
    assert any(state == "running" and done and 0 < done < 30 for state, done in from_other), answers
    dones = [done for _, _, done in answers if done is not None]
    assert dones == sorted(dones), f"progress went backwards: {answers}"


def test_page_shows_progress_until_the_result(server, page):
    page.goto(server.url + "/")
    page.fill("input[name=items]", "10")
    page.fill("input[name=pause]", "0.15")
    page.click("button")
    percents = set()

    def outcome():
        value = page.locator("#bar").evaluate("bar => bar.value")
        percents.add(value)
        return page.locator("body").get_attribute("data-state") == "done"

    wait_until(outcome, 30, interval=0.05, what="the page to show the result")
    expect(page.locator("#outcome")).to_have_text(f"Sum of squares: {sum(n * n for n in range(1, 11))}")
    expect(page.locator("#percent")).to_have_text("100%")
    assert any(0 < value < 100 for value in percents), percents
