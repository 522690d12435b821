"""Tests of the sign-up recipe (signup_email.py): the sign-up is answered before its mail
goes out, and a real SMTP server (aiosmtpd, on a free port of 127.0.0.1) receives it."""

import asyncio
import email
import email.policy
import threading

import pytest
import signup_email
from aiosmtpd.controller import Controller
from servers import free_port, wait_until

pytestmark = pytest.mark.timeout(60)


class Inbox:
    """An aiosmtpd handler that keeps what it receives; while ``open`` is clear, it holds
    each mail back before accepting it, as a slow mail server would."""

    def __init__(self):
        self.mails = []
        self.open = threading.Event()
        self.open.set()

    async def handle_DATA(self, server, session, envelope):
        await asyncio.get_running_loop().run_in_executor(None, self.open.wait, 20)
        self.mails.append(email.message_from_bytes(envelope.content, policy=email.policy.default))
        return "250 Message accepted for delivery"


@pytest.fixture
def inbox():
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield inbox, controller.port
    finally:
        inbox.open.set()
        controller.stop()


def make_app(tmp_path, mail_port):
    return signup_email.create_app(
        {
            "TESTING": True,
            "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'signup.db'}",
            "MAIL_SERVER": "127.0.0.1",
            "MAIL_PORT": mail_port,
        }
    )


def test_signup_is_answered_before_its_mail_is_sent(tmp_path, inbox):
    inbox, port = inbox
    client = make_app(tmp_path, port).test_client()
    inbox.open.clear()  # the mail server takes its time
    response = client.post("/signup", data={"name": "Ada", "email": "ada@example.com"})
    assert response.status_code == 201
    user = response.get_json()
    assert user["mailed"] is False
    assert inbox.mails == []
    assert client.get(f"/users/{user['id']}").get_json()["mailed"] is False

    inbox.open.set()
    wait_until(lambda: client.get(f"/users/{user['id']}").get_json()["mailed"], 20, what="the mail")
    (mail,) = inbox.mails
    assert (mail["To"], mail["From"], mail["Subject"]) == (
        "ada@example.com",
        "welcome@example.com",
        "Welcome!",
    )
    assert mail.get_body().get_content().splitlines() == ["Hello Ada,", "", "thanks for signing up."]


def test_mail_that_cannot_be_sent_is_logged_and_the_user_stays_unmailed(tmp_path, caplog):
    closed_port = free_port()  # nothing listens there
    app = make_app(tmp_path, closed_port)
    client = app.test_client()
    with caplog.at_level("ERROR", logger=app.logger.name):
        user = client.post("/signup", data={"name": "Lin", "email": "lin@example.com"}).get_json()
        failure = wait_until(
            lambda: [r for r in caplog.records if "send_confirmation" in r.getMessage()], 20, what="the log"
        )
    assert failure[0].getMessage().endswith("failed")
    assert isinstance(failure[0].exc_info[1], ConnectionRefusedError)
    assert client.get(f"/users/{user['id']}").get_json()["mailed"] is False
