"""Test matrix, type check and lint for Flask-Executor.

    nox -l                     # list the sessions
    nox -t ci                  # what CI runs: the oldest and the newest corner, mypy, lint
    nox -s "tests(3.12-flask3.0)"
    nox -s tests -- -k "sync or dask" -x     # arguments after -- go to pytest

The tests session runs the suite on Python 3.10 to 3.13 against Flask 2.2, 2.3, 3.0 and 3.1,
each with the Werkzeug its era was released with; tests_flask32 runs it on Python 3.13 against
Flask 3.2, a development build not yet on the package index (its wheel is in ../shared/wheels).
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.options.error_on_missing_interpreters = True  # a missing Python fails, it is not skipped
nox.options.sessions = ["tests", "mypy", "lint"]

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
# Flask release line -> the pins that install it with a Werkzeug it works with. Flask 2.2 imports
# werkzeug.urls.url_quote, which Werkzeug 3.0 removed; Flask 2.3 needs Werkzeug >= 2.3.7.
FLASKS = {
    "2.2": ["flask>=2.2.5,<2.3", "werkzeug>=2.2.3,<2.3"],
    "2.3": ["flask>=2.3.3,<2.4", "werkzeug>=2.3.7,<3"],
    "3.0": ["flask>=3.0.3,<3.1", "werkzeug>=3.0.6,<3.1"],
    "3.1": ["flask>=3.1,<3.2", "werkzeug>=3.1,<3.2"],
}
# The library suite's own test dependencies (examples/ has its own requirements and needs Flask 3).
TEST_DEPS = [
    *("pytest>=8", "pytest-timeout>=2.3", "distributed", "gunicorn", "docutils"),
    # the real servers, the Redis client and the dependent library the suite runs
    *("pyuwsgi", "waitress", "redis", "flask-shell2http", "blinker"),
]
CORNERS = {(PYTHONS[0], "2.2"), (PYTHONS[-1], "3.1")}
# Flask 3.2 merges the request context into the app context; it needs Werkzeug 3.1 or later. The
# wheel is shared with the project in ../shared/wheels; .ci/wheels keeps a copy for clean clones.
_WHEEL = "flask-3.2.0.dev0-py3-none-any.whl"
_HERE = Path(__file__).resolve().parent
FLASK_32_WHEEL = next(
    (
        path
        for path in (_HERE.parent / "shared/wheels" / _WHEEL, _HERE / ".ci/wheels" / _WHEEL)
        if path.exists()
    ),
    _HERE / ".ci/wheels" / _WHEEL,
)
RUFF = "ruff==0.17.6"
MYPY = "mypy>=1.11"


def _find_interpreters() -> None:
    """Puts pyenv's interpreters on PATH: its shims for python3.X answer only for the versions
    pyenv has selected, so nox would find a shim that refuses to run."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"), "versions")
    found = []
    for version in PYTHONS:
        candidates = sorted(
            root.glob(f"{version}.*/bin/python{version}"),
            key=lambda path: [int(part) for part in path.parent.parent.name.split(".") if part.isdigit()],
        )
        if candidates:
            found.append(str(candidates[-1].parent))
    if found:
        os.environ["PATH"] = os.pathsep.join([*found, os.environ.get("PATH", "")])


_find_interpreters()


@nox.session
@nox.parametrize(
    ("python", "flask"),
    [
        nox.param(
            python, flask, id=f"{python}-flask{flask}", tags=["ci"] if (python, flask) in CORNERS else []
        )
        for python in PYTHONS
        for flask in FLASKS
    ],
)
def tests(session: nox.Session, flask: str) -> None:
    """The test suite, on one Python with one Flask release line."""
    session.install(".", *FLASKS[flask], *TEST_DEPS)
    session.run("python", "-m", "pip", "list", "--format=freeze", silent=False)
    session.run("python", "-m", "pytest", "test_flask_executor.py", *session.posargs)


@nox.session(python=PYTHONS[-1], tags=["ci"])
def tests_flask32(session: nox.Session) -> None:
    """The test suite on Flask 3.2, with DeprecationWarning as an error: Flask 3.2 deprecates
    RequestContext and request_ctx, which the module must not touch there."""
    if not FLASK_32_WHEEL.exists():
        session.error(f"the Flask 3.2 wheel is missing: {FLASK_32_WHEEL}")
    session.install("-e", ".[test]", "werkzeug>=3.1")
    # After the rest, so that it replaces the released Flask that .[test] brought in.
    session.install(str(FLASK_32_WHEEL))
    session.run("python", "-m", "pip", "list", "--format=freeze", silent=False)
    deprecations_fail = ("-W", "error::DeprecationWarning")
    session.run("python", "-m", "pytest", *deprecations_fail, "test_flask_executor.py", *session.posargs)


@nox.session(python=PYTHONS[-1], tags=["ci"])
def mypy(session: nox.Session) -> None:
    """mypy --strict on the module, then what users of the wheel see (typing_check/)."""
    session.install(".", MYPY)
    session.run("mypy", "--strict", "flask_executor.py")
    session.run("python", "typing_check/check_types.py")


@nox.session(python=PYTHONS[-1], tags=["ci"])
def lint(session: nox.Session) -> None:
    """ruff's lint rules and formatting (configured in pyproject.toml)."""
    session.install(RUFF)
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
