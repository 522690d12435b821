"""Test helpers for the recipes: a real gunicorn on 127.0.0.1, and bounded waits.

Not a test module: the tests import it. Every process it starts is started in a session of
its own and stopped by its pid (or that session's process group), never by name.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))


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


def find_chromium():
    """Debian's Chromium (or CHROMIUM_PATH): Playwright drives it, and never downloads one."""
    candidates = (
        os.environ.get("CHROMIUM_PATH"),
        "/usr/bin/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    )
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout, interval=0.05, what="the condition"):
    """Calls ``predicate`` until it returns something true, and returns that; fails the test
    after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def recipe_env(**settings):
    """The environment for a recipe's process: this checkout's flask_executor on the path
    (after any PYTHONPATH already set), and ``settings`` as FLASK_-prefixed variables (values
    as JSON, as Flask reads them)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), REPO_ROOT, HERE]))
    for name, value in settings.items():
        env["FLASK_" + name] = value if isinstance(value, str) else json.dumps(value)
    return env


def no_control_socket():
    """gunicorn's option not to open its control socket (a file in the home directory, one
    path for every gunicorn of the user), where this gunicorn has one."""
    from gunicorn.config import KNOWN_SETTINGS

    return ["--no-control-socket"] if any(s.name == "control_socket_disable" for s in KNOWN_SETTINGS) else []


class Gunicorn:
    """``gunicorn -w WORKERS`` serving ``app`` (a gunicorn app string) on a free port of
    127.0.0.1, from examples/recipes/, with its log in ``log_path``."""

    def __init__(self, app, log_path, workers=2, env=None, cwd=HERE):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.workers = workers
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        command = [sys.executable, "-m", "gunicorn", "-w", str(workers), "-b", f"127.0.0.1:{self.port}"]
        command += ["--graceful-timeout", "20", *no_control_socket(), app]
        self.proc = subprocess.Popen(
            command,
            cwd=cwd,
            env=env if env is not None else recipe_env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self):
        with open(self.log_path) as log:
            return log.read()

    def worker_pids(self):
        """The pids of the workers gunicorn has booted so far."""
        return {int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", self.log())}

    def wait_ready(self, timeout=30):
        """Waits until every worker has booted and the server answers."""

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"gunicorn exited with {self.proc.returncode}:\n{self.log()}")
            if len(self.worker_pids()) < self.workers:
                return False
            try:
                with urllib.request.urlopen(self.url + "/", timeout=2):
                    return True
            except (OSError, urllib.error.HTTPError):
                return False

        wait_until(ready, timeout, interval=0.1, what=f"gunicorn with {self.workers} workers at {self.url}")

    def get(self, path, timeout=5):
        """GET ``path``: (status, headers, body as JSON)."""
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return response.status, response.headers, json.loads(response.read())

    def post(self, path, data, timeout=5):
        """POST ``data`` as JSON to ``path``: (status, headers, body as JSON)."""
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(data).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, json.loads(response.read())

    def stop(self):
        """SIGTERM to gunicorn's master, which stops its workers; SIGKILL to the process group
        of this server alone if that takes more than 30 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        try:  # a worker left behind by its master: this server's process group is ours to end
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()
        return self.proc.returncode
