"""Typed misuses of flask_executor: mypy --strict MUST report each of them.

Every line that must fail ends with ``# E: <error code>``; check_types.py compares the errors
mypy reports (line, code) with these marks, both ways: a missing error and an extra one fail.
"""

from __future__ import annotations

from collections.abc import Iterator

from flask import Flask

from flask_executor import Executor, report_progress

app = Flask(__name__)
executor = Executor(app)


def add(x: int, y: int) -> int:
    return x + y


async def fetch(url: str) -> bytes:
    return url.encode()


@executor.job
def double(x: int) -> str:
    return str(x * 2)


executor.submit(add, "one", 2)  # E: arg-type|call-overload
executor.submit(add, 1)  # E: call-arg|call-overload
executor.submit_stored("sum", add, 1, "two")  # E: arg-type|call-overload
text: str = executor.submit(add, 1, 2).result()  # E: assignment
awaited: str = executor.submit(fetch, "url").result()  # E: assignment
sums: Iterator[str] = executor.map(add, [1], [2])  # E: assignment|arg-type
# 1.0's keyword forms run, but cannot be checked against the function: types reject them.
executor.submit(fn=add, x=1, y=2)  # E: call-overload
executor.submit_stored(future_key="sum", fn=add, x=1, y=2)  # E: call-overload
executor.submit_stored("sum", fn=add, x=1, y=2)  # E: call-overload

double.submit("wrong")  # E: arg-type
double("wrong")  # E: arg-type
double.submit(1, 2)  # E: call-arg
double.submit_stored(future_key="double", x="two")  # E: arg-type
number: int = double(3)  # E: assignment
also_number: int = double.submit(3).result()  # E: assignment

Executor(app, name=3)  # E: arg-type
report_progress("half")  # E: arg-type
