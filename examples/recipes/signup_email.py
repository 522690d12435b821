"""Recipe: send the confirmation mail of a sign-up in the background.

``POST /signup`` stores the user and answers at once; a background task sends the mail
(smtplib, to ``MAIL_SERVER``:``MAIL_PORT``) and then marks the user as mailed. The demo app
(examples/demo.py) does the same with a page around it.
"""

import smtplib
from email.message import EmailMessage

from flask import Flask, current_app, request
from flask_sqlalchemy import SQLAlchemy

from flask_executor import Executor

db = SQLAlchemy()
executor = Executor()


class User(db.Model):
    id = db.Column(db.Integer, primary_key=True)
    name = db.Column(db.String(100), nullable=False)
    email = db.Column(db.String(200), nullable=False, unique=True)
    mailed = db.Column(db.Boolean, nullable=False, default=False)


def create_app(config=None):
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI="sqlite:///signup.db",  # in the instance folder
        MAIL_SERVER="localhost",
        MAIL_PORT=25,
        MAIL_SENDER="welcome@example.com",
        EXECUTOR_MAX_WORKERS=4,
    )
    app.config.from_prefixed_env()
    app.config.update(config or {})
    db.init_app(app)
    executor.init_app(app)
    with app.app_context():
        db.create_all()

    @app.post("/signup")
    def signup():
        user = User(name=request.form["name"], email=request.form["email"])
        db.session.add(user)
        db.session.commit()  # first: the task reads the user from the database
        # The id, not the User: the request's database session ends with the request, and
        # the task has a session of its own.
        executor.submit(send_confirmation, user.id)
        return {"id": user.id, "mailed": user.mailed}, 201

    @app.get("/users/<int:user_id>")
    def show_user(user_id):
        user = db.get_or_404(User, user_id)
        return {"id": user.id, "email": user.email, "mailed": user.mailed}

    return app


def send_confirmation(user_id):
    """Runs in a worker thread, inside the app context: current_app and db.session work."""
    user = db.session.get(User, user_id)
    message = EmailMessage()
    message["From"] = current_app.config["MAIL_SENDER"]
    message["To"] = user.email
    message["Subject"] = "Welcome!"
    message.set_content(f"Hello {user.name},\n\nthanks for signing up.\n")
    config = current_app.config
    with smtplib.SMTP(config["MAIL_SERVER"], config["MAIL_PORT"], timeout=30) as smtp:
        smtp.send_message(message)
    user.mailed = True
    db.session.commit()
