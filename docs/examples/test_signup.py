"""Tests of signup_app in test mode: each task has run when submit() returns."""

import pytest
from signup_app import create_app


@pytest.fixture
def app():
    return create_app(
        {
            "TESTING": True,
            "EXECUTOR_TYPE": "sync",  # tasks run inline, in the test's thread
            "EXECUTOR_PROPAGATE_EXCEPTIONS": True,  # a failing task fails the request
        }
    )


def test_signup_sends_the_welcome_mail(app):
    response = app.test_client().post("/signup", data={"email": "ada@example.com"})
    assert response.status_code == 202
    assert app.config["OUTBOX"] == ["ada@example.com"]  # no sleeping, no polling


def test_a_failing_task_fails_the_test(app):
    with pytest.raises(ValueError, match="not an email address"):
        app.test_client().post("/signup", data={"email": "nobody"})
