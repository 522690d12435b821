"""A small, fully typed user of flask_executor.

``mypy --strict`` must accept this file as it is, against the installed wheel (see
check_types.py). ``assert_type`` makes mypy check exact types without reveal_type noise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

from flask import Flask
from typing_extensions import assert_type

from flask_executor import (
    Executor,
    ExecutorJob,
    FutureCollection,
    Progress,
    QueueFull,
    TaskFuture,
    __version__,
    propagate_exceptions_callback,
    report_progress,
)

app = Flask(__name__)
executor = Executor(app)
reports = Executor(name="reports")
reports.init_app(app)


def add(x: int, y: int) -> int:
    return x + y


async def fetch(url: str) -> bytes:
    return url.encode()


def apply(value: str, fn: Callable[[str], str]) -> str:
    return fn(value)


def on_done(future: Future[Any]) -> None:
    print(future.done())


# submit keeps the function's return type and checks its arguments (ParamSpec).
future: Future[int] = executor.submit(add, 1, 2)
assert_type(future.result(), int)
task_future: TaskFuture[int] = executor.submit(add, 1, y=2)
assert_type(task_future.result(timeout=1.5), int)
assert_type(task_future.progress, Progress | None)
stored: Future[int] = executor.submit_stored("sum", add, 1, 2)
# The task's own keyword argument may be named fn: the submitted function is positional.
assert_type(executor.submit(apply, "abc", fn=str.upper).result(), str)
assert_type(executor.submit_stored("upper", apply, "abc", fn=str.upper).result(), str)

# A coroutine function's future holds the awaited value.
assert_type(executor.submit(fetch, "https://example.invalid").result(), bytes)

sums: Iterator[int] = executor.map(add, [1, 2], [3, 4])
assert_type(next(executor.map(add, [1], [2], timeout=5)), int)
assert_type(next(executor.map(fetch, ["https://example.invalid"])), bytes)
executor.add_default_done_callback(on_done)
executor.add_default_done_callback(propagate_exceptions_callback)
future.add_done_callback(on_done)


# A job keeps the function's signature: calling it, submitting it, mapping it.
@executor.job
def double(x: int) -> str:
    report_progress(1, 2, "half way")
    report_progress(2)
    return str(x * 2)


job: ExecutorJob[[int], str] = double
assert_type(double(3), str)
assert_type(double.submit(3).result(), str)
assert_type(double.submit(x=3).result(), str)
assert_type(double.submit_stored("double-3", 3).result(), str)
assert_type(double.submit_stored(future_key="double-4", x=4).result(), str)  # as 1.0 took it
doubled: Iterator[str] = double.map([1, 2], timeout=10)
assert_type(next(double.map([1, 2])), str)
name: str = double.__name__

# The stored futures.
futures: FutureCollection = executor.futures
assert_type(future in futures, bool)
assert_type(len(futures), int)
popped: Future[Any] | None = futures.pop("sum")

progress = Progress(1, 4, "a quarter")
fraction: float | None = progress.fraction

try:
    executor.submit(add, 2, 2)
except QueueFull:
    pass

version: str = __version__
executor_name: str = reports.name
executor.shutdown(wait=True, cancel_futures=False)
