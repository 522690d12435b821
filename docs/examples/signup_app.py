"""A sign-up app built by a factory, as the test-mode page tests it (docs: test mode)."""

from flask import Flask, current_app, request

from flask_executor import Executor

executor = Executor()


def create_app(config=None):
    app = Flask(__name__)
    app.config["OUTBOX"] = []  # stands in for a mail server
    app.config.update(config or {})  # before init_app, which reads EXECUTOR_TYPE
    executor.init_app(app)

    @app.post("/signup")
    def signup():
        executor.submit(send_welcome, request.form["email"])
        return "Welcome! Check your inbox.", 202

    return app


def send_welcome(address):
    if "@" not in address:
        raise ValueError(f"not an email address: {address!r}")
    current_app.config["OUTBOX"].append(address)
