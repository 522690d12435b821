#!/usr/bin/env python3
"""Check what a user of the installed flask_executor sees through mypy.

    python typing_check/check_types.py [--python PATH]

PATH is an interpreter with mypy and flask_executor installed (default: this one). Both user
files are copied to an empty temporary folder and checked from there with ``mypy --strict``,
so flask_executor is found only as installed in that interpreter's site-packages (its types
come from the flask_executor-stubs package in the wheel), never from the source tree.

- user_code.py must be clean.
- user_code_errors.py must give exactly the errors its ``# E: <code>`` marks name: one error per
  mark, ``# E: a, b`` for two errors on a line, ``# E: a|b`` for one error with either code (an
  overloaded signature reports ``call-overload`` where a plain one reports ``arg-type``).

Exits 0 when both hold, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
GOOD = "user_code.py"
BAD = "user_code_errors.py"
CODE = r"[a-z][a-z0-9-]*(?:\|[a-z][a-z0-9-]*)*"
MARK = re.compile(rf"#\s*E:\s*(?P<codes>{CODE}(?:\s*,\s*{CODE})*)\s*$")
ERROR = re.compile(
    r"^(?P<file>[^:]+):(?P<line>\d+): error: (?P<message>.*?)(?:\s+\[(?P<code>[a-z0-9-]+)\])?$"
)
MYPY_FLAGS = [
    "--strict",
    "--no-incremental",
    "--show-error-codes",
    "--hide-error-context",
    "--no-error-summary",
    "--no-pretty",
    "--no-color-output",
]

Error = tuple[int, str]


def expected_errors(path: Path) -> set[Error]:
    """The (line, codes) pairs that the ``# E:`` marks of a file ask for; codes may be 'a|b'."""
    expected = set()
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        match = MARK.search(line)
        if match:
            expected.update((number, codes.strip()) for codes in match["codes"].split(","))
    return expected


def match_marks(expected: set[Error], reported: set[Error]) -> set[Error]:
    """Rewrites each reported (line, code) that a mark 'a|b' on its line allows as that mark."""
    matched = set()
    for line, code in reported:
        marks = [codes for mark_line, codes in expected if mark_line == line and code in codes.split("|")]
        matched.add((line, marks[0] if marks else code))
    return matched


def run_mypy(python: str, folder: Path, filename: str) -> tuple[int, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("MYPYPATH", "PYTHONPATH")}
    done = subprocess.run(
        [python, "-m", "mypy", *MYPY_FLAGS, filename],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return done.returncode, done.stdout + done.stderr


def reported_errors(output: str, filename: str) -> tuple[set[Error], list[str]]:
    """The (line, code) pairs mypy reported for the file, and the lines it could not read."""
    reported, unreadable = set(), []
    for line in output.splitlines():
        match = ERROR.match(line)
        if match and Path(match["file"]).name == filename:
            reported.add((int(match["line"]), match["code"] or "no-code"))
        elif line.strip() and ": note: " not in line:
            unreadable.append(line)
    return reported, unreadable


def check(python: str) -> bool:
    ok = True
    with tempfile.TemporaryDirectory(prefix="flask-executor-typing-") as tmp:
        folder = Path(tmp)
        for filename in (GOOD, BAD):
            shutil.copy(HERE / filename, folder / filename)
        code, output = run_mypy(python, folder, GOOD)
        if code == 0 and not output.strip():
            print(f"{GOOD}: clean")
        else:
            ok = False
            print(f"{GOOD}: NOT clean (mypy exit {code}):\n{output}")

        expected = expected_errors(HERE / BAD)
        code, output = run_mypy(python, folder, BAD)
        reported, unreadable = reported_errors(output, BAD)
        reported = match_marks(expected, reported)
        if reported == expected and code == 1 and not unreadable:
            print(f"{BAD}: the expected errors ({len(expected)})")
        else:
            ok = False
            print(f"{BAD}: NOT as expected (mypy exit {code})")
            for line, error in sorted(expected - reported):
                print(f"  missing: line {line} [{error}]")
            for line, error in sorted(reported - expected):
                print(f"  unexpected: line {line} [{error}]")
            for line in unreadable:
                print(f"  other output: {line}")
            print(output)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--python", default=sys.executable, help="interpreter with mypy and flask_executor")
    args = parser.parse_args(argv)
    python = shutil.which(args.python) or args.python
    return 0 if check(os.path.abspath(python)) else 1


if __name__ == "__main__":
    sys.exit(main())
