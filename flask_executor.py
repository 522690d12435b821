"""Background tasks for Flask, with no broker and no worker processes.

An :class:`Executor` runs functions in a thread pool (or a process pool) while the
request that submitted them returns. Tasks run inside the application context and,
when submitted during a request, inside a copy of the request context, so code that
uses ``current_app``, ``g``, ``request`` or ``session`` works unchanged::

    from flask import Flask, request
    from flask_executor import Executor

    app = Flask(__name__)
    executor = Executor(app)

    @app.post("/signup")
    def signup():
        executor.submit(send_confirmation_email, request.form["email"])
        return "Check your inbox."

Futures kept under a key (:meth:`Executor.submit_stored`) can be polled from a later
request through :attr:`Executor.futures`.

The module reads top to bottom: the public API in the order a user meets it, then
Flask-Executor 1.0's import paths, then the private parts: the contexts a task runs
in, the task itself, the pools that run tasks, the stores that keep futures, the
configuration, and what happens when the process forks or exits.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import contextlib
import contextvars
import copy
import dataclasses
import difflib
import functools
import hashlib
import heapq
import hmac
import importlib
import itertools
import logging
import os
import pickle
import queue
import re
import stat
import sys
import threading
import time
import types
import uuid
import weakref
from collections.abc import Callable, Coroutine, Hashable, Iterable, Iterator, Mapping
from typing import (
    TYPE_CHECKING,
    Any,
    ClassVar,
    Generic,
    NamedTuple,
    ParamSpec,
    Protocol,
    TypeVar,
    cast,
    overload,
)

import flask
import flask.wrappers
from flask.ctx import AppContext
from flask.globals import app_ctx
from werkzeug.datastructures import EnvironHeaders
from werkzeug.local import LocalProxy

if TYPE_CHECKING:
    from flask.ctx import RequestContext

__all__ = [
    "Executor",
    "ExecutorJob",
    "FutureCollection",
    "FuturesStore",
    "Progress",
    "QueueFull",
    "StoreError",
    "StoredTask",
    "TaskFuture",
    "TaskLost",
    "propagate_exceptions_callback",
    "report_progress",
]
__version__ = "2.0.0"

T = TypeVar("T")
P = ParamSpec("P")
R = TypeVar("R")

_logger = logging.getLogger(__name__)


# Public API --------------------------------------------------------------------------


class Executor(concurrent.futures.Executor):
    """Runs functions in the background, inside the Flask contexts they were
    submitted from.

    ::

        executor = Executor(app)              # or Executor() and later init_app(app)
        future = executor.submit(pow, 2, 10)
        future.result()                       # 1024

    :param app: the application to bind to; see :meth:`init_app`.
    :param name: makes this executor read its configuration from keys prefixed
        ``NAME_`` (``CPU_EXECUTOR_TYPE`` for ``name="cpu"``) and registers it as
        ``app.extensions[name + "executor"]``, so one app can have several.
        Letters, digits and underscores only.
    """

    def __init__(self, app: flask.Flask | None = None, name: str = "") -> None:
        if not re.fullmatch(r"\w*", name, re.ASCII):
            raise ValueError(
                f"Executor name {name!r} may hold only letters, digits and underscores,"
                " because it prefixes configuration keys such as NAME_EXECUTOR_TYPE"
            )
        self.name = name
        #: The futures kept by :meth:`submit_stored`, by key.
        self.futures = FutureCollection()
        self._app: flask.Flask | None = None
        self._config = _read_config({}, name)
        self._default_done_callbacks: list[Callable[[concurrent.futures.Future[Any]], object]] = []
        # None before init_app and after shutdown(); replaced whole, never changed in place.
        self._pool: _Pool | None = None
        self._bound: _QueueBound | None = None
        self._settings: _TaskSettings | None = None
        self._shut_down = False
        # Held to replace the pool: by init_app, shutdown and a new process.
        self._lock = threading.Lock()
        _live_executors.add(self)
        if app is not None:
            self.init_app(app)

    def init_app(self, app: flask.Flask) -> None:
        """Reads this executor's configuration from ``app.config`` and binds the
        executor to ``app``. Threads and processes are started on the first submit,
        in each process, so that an app loaded before a server forks works in every
        worker. (A configured executor is made here, to check it.)

        Binding to another app later (an app factory in tests, say) rebinds it:
        tasks submitted from then on use the new app and its configuration.

        :raises ValueError: a configuration value is invalid; the message names the
            key and the value. Nothing has changed when it is raised.
        """
        if isinstance(app, LocalProxy):  # Executor(current_app), as 1.0 allowed
            app = app._get_current_object()
        config = _read_config(app.config, self.name)
        _warn_about_unknown_keys(app, config)
        pool = _make_pool(config, self.name)
        try:
            store = _make_store(config, app, self.futures._store)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # a configured executor, made to check it
            raise
        with self._lock:
            previous, self._pool = self._pool, pool
            self._app = app
            self._config = config
            self._bound = _QueueBound.for_pool(config, pool)
            self._settings = _TaskSettings(app, config.push_app_context, config.log_exceptions)
            self._shut_down = False
        self.futures.max_length = config.futures_max_length or None
        self.futures.logger = app.logger
        self.futures._store_key = config.prefix + "FUTURES_STORE"
        self.futures._use(store)
        _apps_for_forked_workers[config.app_key] = app
        app.extensions[self.name + "executor"] = self
        if previous is not None:
            previous.shutdown(wait=False, cancel_futures=False)

    # Flask-Executor 1.0 took ``fn`` (and ``future_key``) by keyword too, and code
    # written for it does so, hence *args here. Type checkers see the overloads, which
    # keep them positional, so new code is checked against the function it submits.
    @overload
    def submit(
        self, fn: Callable[P, Coroutine[Any, Any, T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> TaskFuture[T]: ...
    @overload
    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> TaskFuture[T]: ...
    def submit(self, /, *args: Any, **kwargs: Any) -> TaskFuture[Any]:
        """Schedules ``fn(*args, **kwargs)`` and returns its :class:`TaskFuture`.

        ``fn`` may be an ``async def`` function: the future then holds what the
        coroutine returns. ::

            future = executor.submit(send_email, user.id, template="welcome")

        :raises QueueFull: ``EXECUTOR_QUEUE_SIZE`` tasks are already waiting and no
            room was made within ``EXECUTOR_QUEUE_TIMEOUT`` seconds; the task will
            not run.
        :raises RuntimeError: the executor was shut down, or was never bound to an app.
        """
        if args:  # the common form: submit(fn, ...)
            return self._submit(_NO_KEY, args[0], args[1:], kwargs, self._capture_contexts())
        (fn,), args = _split_1_0_call("submit", ("fn",), args, kwargs)
        return self._submit(_NO_KEY, fn, args, kwargs, self._capture_contexts())

    @overload
    def submit_stored(
        self,
        future_key: Hashable,
        fn: Callable[P, Coroutine[Any, Any, T]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> TaskFuture[T]: ...
    @overload
    def submit_stored(
        self, future_key: Hashable, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> TaskFuture[T]: ...
    def submit_stored(self, /, *args: Any, **kwargs: Any) -> TaskFuture[Any]:
        """Like :meth:`submit`, and keeps the future in :attr:`futures` under
        ``future_key`` so that a later request can ask about it::

            executor.submit_stored("report", build_report, month)
            ...
            if executor.futures.done("report"):
                return executor.futures.pop("report").result()

        :raises ValueError: ``future_key`` is already in use, or is ``None``. Nothing
            has run.
        """
        if len(args) >= 2:  # the common form: submit_stored(key, fn, ...)
            return self._submit(args[0], args[1], args[2:], kwargs, self._capture_contexts())
        (future_key, fn), args = _split_1_0_call("submit_stored", ("future_key", "fn"), args, kwargs)
        return self._submit(future_key, fn, args, kwargs, self._capture_contexts())

    @overload
    def map(
        self,
        fn: Callable[..., Coroutine[Any, Any, T]],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[T]: ...
    @overload
    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[T]: ...
    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        """Like the built-in :func:`map`, with the calls made in the background;
        results come in order. Every call gets its own copy of the contexts::

            for size in executor.map(os.path.getsize, paths):
                ...

        :param timeout: seconds from this call after which getting a result that is
            not ready raises :exc:`TimeoutError`.
        :param chunksize: for process pools, how many calls travel to a worker
            together; thread pools ignore it.
        """
        if chunksize < 1:
            raise ValueError(f"chunksize must be 1 or more, got {chunksize!r}")
        end_time = None if timeout is None else time.monotonic() + timeout
        contexts = self._capture_contexts()
        calls = zip(*iterables)
        pool = self._pool  # read once: a shutdown meanwhile sets it to None
        batch = pool.batch_size(chunksize) if pool is not None else 1
        if batch > 1:
            chunks = iter(functools.partial(_take, calls, batch), [])
            futures = [self._submit(_NO_KEY, _call_each, (fn, chunk), {}, contexts) for chunk in chunks]
            return itertools.chain.from_iterable(_results_in_order(futures, end_time))
        futures = [self._submit(_NO_KEY, fn, call, {}, contexts) for call in calls]
        return _results_in_order(futures, end_time)

    def job(self, fn: Callable[P, R]) -> ExecutorJob[P, R]:
        """Decorates ``fn`` as an :class:`ExecutorJob` of this executor::

            @executor.job
            def fib(n):
                return n if n < 2 else fib(n - 1) + fib(n - 2)

            fib(10)                 # 55, called directly
            fib.submit(10)          # a future of 55

        A job can be declared before :meth:`init_app` binds the executor.
        """
        return ExecutorJob(self, fn)

    def add_default_done_callback(self, fn: Callable[[concurrent.futures.Future[Any]], object]) -> None:
        """Adds ``fn`` as a done callback of every future this executor makes from
        now on. Like every done callback it runs inside the app context::

            def record_failure(future):
                if future.exception() is not None:
                    current_app.logger.warning("task failed")

            executor.add_default_done_callback(record_failure)
        """
        self._default_done_callbacks.append(fn)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stops accepting tasks. Every task already accepted still runs, unless
        ``cancel_futures`` is true: then those still waiting for a worker are
        cancelled. With ``wait`` it returns when the running ones have finished.

        ``submit`` raises :exc:`RuntimeError` afterwards, until :meth:`init_app`
        binds the executor again.
        """
        with self._lock:
            self._shut_down = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait, cancel_futures)

    # The path of every task, and so the hot path: each attribute is read once.
    def _submit(
        self,
        future_key: Hashable,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        contexts: _CapturedContexts | None,
    ) -> TaskFuture[Any]:
        if _this_process.pid != os.getpid():
            _this_process.start_over()  # forked without our fork hook (uWSGI forks in C)
        pool, bound = self._pool, self._bound
        if pool is None:
            raise RuntimeError(
                f"cannot submit {_describe(fn)}: {self!r} has been shut down"
                if self._shut_down
                else f"{self!r} is not bound to an app: call init_app(app) before submitting tasks"
            )
        future: TaskFuture[Any] = TaskFuture()
        future._settings = self._settings
        if bound is not None:
            bound.take(future, fn)  # first, so that its slot is freed before any callback runs
        try:
            if future_key is not _NO_KEY:
                self.futures.add(future_key, future)  # raises for a key in use, before anything runs
            for callback in self._default_done_callbacks:
                future.add_done_callback(callback)
            if self._config.propagate_exceptions:
                future.add_done_callback(propagate_exceptions_callback)
            pool.schedule(_Task(future, fn, args, kwargs, contexts))
        except BaseException:
            if not future.done():  # it never ran: give back what it holds
                if bound is not None:
                    bound.give_back()
                if future_key is not _NO_KEY:
                    self.futures._discard(future_key, future)
            raise
        return future

    def _capture_contexts(self) -> _CapturedContexts | None:
        pool = self._pool
        if pool is None or not (pool.pushes_contexts and self._config.push_app_context):
            return None
        return _Contexts(self._app)

    def _start_over(self) -> None:
        """Called in a new process made by forking this one: the parent's threads
        do not exist here, and a lock may have been held by one of them."""
        self._lock = threading.Lock()
        pool = self._pool
        if pool is not None:
            _inherited.append(pool)
            self._pool = pool.after_fork()
            self._bound = _QueueBound.for_pool(self._config, self._pool)
        self.futures._after_fork()

    def __repr__(self) -> str:
        name = f" {self.name!r}" if self.name else ""
        return f"<Executor{name} ({self._config.kind})>"


class ExecutorJob(Generic[P, R]):
    """A function decorated with :meth:`Executor.job`. Calling it calls the
    function; its methods run it in the background::

        @executor.job
        def resize(path, width):
            ...

        resize("a.png", 100)                        # runs here and now
        resize.submit("a.png", 100)                 # a TaskFuture
        resize.submit_stored("a", "a.png", 100)     # kept in executor.futures
        list(resize.map(paths, widths))             # results in order

    A job defined at module level can be sent to a process pool: it is pickled by
    its name, like the function it wraps.
    """

    __name__: str
    __qualname__: str
    __wrapped__: Callable[P, R]

    def __init__(self, executor: Executor, fn: Callable[P, R]) -> None:
        self.executor = executor
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    @overload
    def submit(
        self: ExecutorJob[P, Coroutine[Any, Any, T]], *args: P.args, **kwargs: P.kwargs
    ) -> TaskFuture[T]: ...
    @overload
    def submit(self: ExecutorJob[P, T], *args: P.args, **kwargs: P.kwargs) -> TaskFuture[T]: ...
    def submit(self, *args: Any, **kwargs: Any) -> TaskFuture[Any]:
        """Submits a call of this job; see :meth:`Executor.submit`."""
        return self.executor.submit(self, *args, **kwargs)

    @overload
    def submit_stored(
        self: ExecutorJob[P, Coroutine[Any, Any, T]], future_key: Hashable, *args: P.args, **kwargs: P.kwargs
    ) -> TaskFuture[T]: ...
    @overload
    def submit_stored(
        self: ExecutorJob[P, T], future_key: Hashable, *args: P.args, **kwargs: P.kwargs
    ) -> TaskFuture[T]: ...
    def submit_stored(self, *args: Any, **kwargs: Any) -> TaskFuture[Any]:
        """Submits a call of this job and stores its future under ``future_key``;
        see :meth:`Executor.submit_stored`."""
        (future_key,), args = _split_1_0_call("submit_stored", ("future_key",), args, kwargs)
        return self.executor.submit_stored(future_key, self, *args, **kwargs)

    @overload
    def map(
        self: ExecutorJob[P, Coroutine[Any, Any, T]],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[T]: ...
    @overload
    def map(
        self: ExecutorJob[P, T], *iterables: Iterable[Any], timeout: float | None = None, chunksize: int = 1
    ) -> Iterator[T]: ...
    def map(
        self, *iterables: Iterable[Any], timeout: float | None = None, chunksize: int = 1
    ) -> Iterator[Any]:
        """Calls this job for each set of items; see :meth:`Executor.map`."""
        return self.executor.map(self, *iterables, timeout=timeout, chunksize=chunksize)

    def __reduce__(self) -> str:
        # Pickled by reference, as a function is: the worker process imports the
        # module and finds this job under its name.
        return self.__qualname__

    def __repr__(self) -> str:
        return f"<ExecutorJob {self.__qualname__} of {self.executor!r}>"


class FutureCollection:
    """Futures kept under keys, as :meth:`Executor.submit_stored` keeps them.

    Any method or attribute of a future can be reached by its key; an unknown key
    gives ``None``::

        executor.futures.done("report")             # False while it runs
        executor.futures.progress("report")         # Progress(done=3, total=10, ...)
        executor.futures.result("report", timeout=1)
        executor.futures.pop("report")              # take it out

    It is safe to use from many threads at once. At most :attr:`max_length`
    futures are kept: beyond that the oldest finished one is dropped and, when
    none has finished, the oldest of all, with a warning on :attr:`logger`.

    :param max_length: how many futures to keep; ``None`` or ``0`` keeps them all.
    """

    def __init__(self, max_length: int | None = 50) -> None:
        self.max_length = max_length
        #: Where a future dropped before it finished is reported.
        self.logger: logging.Logger = _logger
        self._store: _MemoryStore | _SharedStore = _MemoryStore()
        # Code written for 1.0 reads stored futures from this mapping by key
        # (``futures._futures.get(key)``, as Flask-Shell2HTTP does).
        self._futures: Any = self._store.futures
        self._eviction_warnings = _WarningLimiter()
        self._store_key = "EXECUTOR_FUTURES_STORE"

    def add(self, future_key: Hashable, future: concurrent.futures.Future[Any]) -> None:
        """Keeps ``future`` under ``future_key``.

        :raises ValueError: the key is already in use, or is ``None``.
        """
        if future_key is None:
            raise ValueError("future_key cannot be None: choose a key, such as a string or a number")
        if self._store.forked:
            self._store.forked = False  # one warning is enough
            self.logger.warning(
                "Stored futures are kept per process, and this process was forked from the one that"
                " bound the executor (gunicorn --preload, uWSGI): a request that another worker"
                " serves will not find key %r. Set %s to share them.",
                future_key,
                self._store_key,
            )
        for key in self._store.add(future_key, future, self.max_length or 0):
            self._eviction_warnings.warn(
                self.logger,
                "Stopped tracking the unfinished future under key %r: more than %d futures are stored"
                " and none has finished. Pop futures once they are done, or raise"
                " EXECUTOR_FUTURES_MAX_LENGTH.",
                key,
                self.max_length,
            )

    def pop(self, future_key: Hashable) -> concurrent.futures.Future[Any] | None:
        """Removes and returns the future under ``future_key``, or ``None``."""
        return self._store.pop(future_key)

    def keys(self) -> list[Hashable]:
        """The keys in use, oldest first."""
        return self._store.keys()

    def done(self, future_key: Hashable) -> bool | None:
        future = self._store.get(future_key)
        return None if future is None else future.done()

    def running(self, future_key: Hashable) -> bool | None:
        future = self._store.get(future_key)
        return None if future is None else future.running()

    def cancelled(self, future_key: Hashable) -> bool | None:
        future = self._store.get(future_key)
        return None if future is None else future.cancelled()

    def cancel(self, future_key: Hashable) -> bool | None:
        future = self._store.get(future_key)
        return None if future is None else future.cancel()

    def result(self, future_key: Hashable, timeout: float | None = None) -> Any:
        future = self._store.get(future_key)
        return None if future is None else future.result(timeout)

    def exception(self, future_key: Hashable, timeout: float | None = None) -> BaseException | None:
        future = self._store.get(future_key)
        return None if future is None else future.exception(timeout)

    def progress(self, future_key: Hashable) -> Progress | None:
        """The last :class:`Progress` the task reported, or ``None``."""
        return getattr(self._store.get(future_key), "progress", None)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        # Flask-Executor 1.0 reached every attribute of a future this way
        # (``futures._state(key)``, ``futures.add_done_callback(key, fn)``...).
        if name.startswith("__") or name not in _FUTURE_ATTRIBUTES:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

        def by_key(future_key: Hashable, *args: Any, **kwargs: Any) -> Any:
            future = self._store.get(future_key)
            if future is None:
                return None
            value = getattr(future, name)
            return value(*args, **kwargs) if callable(value) else value

        return by_key

    def __contains__(self, future_or_key: object) -> bool:
        """True for a stored future (as in 1.0) and for a key in use."""
        return self._store.contains(future_or_key)

    def __len__(self) -> int:
        return len(self._store)

    def __repr__(self) -> str:
        return f"<FutureCollection of {len(self)} (max_length={self.max_length})>"

    def _discard(self, future_key: Hashable, future: concurrent.futures.Future[Any]) -> None:
        self._store.discard(future_key, future)

    def _after_fork(self) -> None:
        self._store.after_fork()

    def _use(self, store: _MemoryStore | _SharedStore) -> None:
        self._store = store
        self._futures = store.futures


class TaskFuture(concurrent.futures.Future[T]):
    """The :class:`concurrent.futures.Future` of a task submitted to an
    :class:`Executor`. It is a plain future, with three additions:

    - :attr:`progress`, the last :class:`Progress` the task reported;
    - done callbacks run inside the app context of the task's app, and one that
      raises is logged on ``app.logger`` without stopping the others;
    - a cancelled future is reported at once to :func:`concurrent.futures.wait`
      and :func:`~concurrent.futures.as_completed`, not when a worker reaches it.

    ::

        future = executor.submit(crunch, numbers)
        future.add_done_callback(lambda f: current_app.logger.info("done"))
        future.progress         # None, then Progress(done=..., total=...)
    """

    def __init__(self) -> None:
        super().__init__()
        #: The last :class:`Progress` reported by the task, or ``None``.
        self.progress: Progress | None = None
        self._settings: _TaskSettings | None = None
        # Where a stored task's changes of state go when the store is shared.
        self._entry: _Entry | None = None

    def add_done_callback(self, fn: Callable[[concurrent.futures.Future[T]], object]) -> None:
        super().add_done_callback(functools.partial(_call_done_callback, fn))

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        # A bare future tells waiters only when its pool reaches it; _condition and
        # _state are the base class's own, used as its methods use them.
        with self._condition:
            if self._state == "CANCELLED":
                self.set_running_or_notify_cancel()
        if self._entry is not None:
            self._entry.finish(self)
        return True

    def set_result(self, result: T) -> None:
        # The store first, so that no reader elsewhere lags behind this future's waiters
        # (nor behind its done callbacks, which may take a while).
        if self._entry is not None and not self.done():
            self._entry.finish(self, ("result", result))
        super().set_result(result)

    def set_exception(self, exception: BaseException | None) -> None:
        if self._entry is not None and not self.done():
            self._entry.finish(self, ("exception", exception))
        super().set_exception(exception)

    def _start(self) -> bool:
        """Marks the future running, unless it was cancelled; every pool calls this
        before it runs a task, or hands it to another executor."""
        entry = self._entry
        if entry is not None and self._state == "PENDING" and not entry.start():
            self.cancel()  # cancelled by another process, or taken for lost
            return False
        with self._condition:  # taken by cancel() too, so the two cannot interleave
            if self._state != "PENDING":
                return False
            self._state = "RUNNING"  # as set_running_or_notify_cancel() does for a pending future
            return True


class Progress(NamedTuple):
    """How far a task has got, as reported with :func:`report_progress`::

        Progress(done=30, total=120, message="resizing").fraction   # 0.25

    It is immutable, so a reader never sees a report half written.
    """

    done: float
    total: float | None = None
    message: str | None = None

    @property
    def fraction(self) -> float | None:
        """``done / total`` between 0 and 1, or ``None`` when the total is unknown (or 0)."""
        return self.done / self.total if self.total else None


def report_progress(done: float, total: float | None = None, message: str | None = None) -> None:
    """Reports how far the running task has got; the submitter reads it as
    :attr:`TaskFuture.progress` or ``executor.futures.progress(key)``::

        def import_rows(rows):
            for number, row in enumerate(rows, 1):
                save(row)
                report_progress(number, len(rows), f"row {number}")

    In a process pool worker it does nothing: progress does not travel between
    processes.

    :raises RuntimeError: called outside a task.
    :raises ValueError: ``done`` is negative, ``total`` is not positive, or
        ``done`` is more than ``total``.
    """
    future = _current_future.get(None)
    if future is None:
        raise RuntimeError(
            "report_progress() was called outside a task: call it from a function submitted to an Executor"
        )
    if done < 0:
        raise ValueError(f"done must be 0 or more, got {done!r}")
    if total is not None and total <= 0:
        raise ValueError(f"total must be more than 0 (or None when unknown), got {total!r}")
    if total is not None and done > total:
        raise ValueError(f"done ({done!r}) cannot be more than total ({total!r})")
    progress = future.progress = Progress(done, total, message)
    if future._entry is not None:
        future._entry.progress(progress)


class QueueFull(Exception):
    """Raised by :meth:`Executor.submit` when ``EXECUTOR_QUEUE_SIZE`` tasks are
    already waiting for a worker. The task was not accepted and will not run; a
    view can answer 503::

        @app.errorhandler(QueueFull)
        def busy(error):
            return "Too busy, try again in a minute", 503
    """


class TaskLost(Exception):
    """The exception of a stored task whose process died before the task finished
    (killed, out of memory, a deploy that did not wait), as readers of a shared
    store (``EXECUTOR_FUTURES_STORE``) see it, within seconds. The task may have
    run in part; nothing retries it::

        try:
            report = executor.futures.result(key)
        except TaskLost:
            return "The server restarted while your report was being built: try again", 503
    """


class StoreError(RuntimeError):
    """A shared store could not be used: it stayed locked too long, an entry in it
    failed its signature check, or a result could not be stored (it could not be
    pickled: only the process that ran the task has it). The message says which."""


class StoredTask(NamedTuple):
    """One task as a :class:`FuturesStore` keeps it."""

    #: The store's own id of the entry, which it never reuses.
    id: Any
    #: The key, as the store keeps it (a string); ``None`` once popped and kept (see
    #: :meth:`FuturesStore.pop`).
    key: str | None
    #: ``"PENDING"``, ``"RUNNING"``, ``"FINISHED"`` or ``"CANCELLED"``.
    state: str
    #: The process that accepted the task (a random token, new in each process).
    owner: str
    #: Whether that process has shown signs of life within the last few seconds; asked
    #: only of unfinished tasks (a store may answer ``False`` for the others).
    owner_alive: bool
    #: The signed, pickled result or exception, once finished (or cancelled, written by
    #: the owner when it saw the cancel).
    outcome: bytes | None
    #: The signed, pickled last :class:`Progress`.
    progress: bytes | None


class FuturesStore(Protocol):
    """What ``EXECUTOR_FUTURES_STORE`` needs of a store, to plug in one of your own
    (a database you already run): pass an object with these methods. Flask-Executor
    signs, pickles, waits and tells lost tasks from live ones; the store only keeps
    entries and changes them atomically. Keys and owners arrive as strings, outcome
    and progress as signed bytes. The SQLite and Redis stores implement it::

        app.config["EXECUTOR_FUTURES_STORE"] = MyPostgresStore(dsn)
    """

    def claim(self, key: str, owner: str, max_length: int) -> tuple[Any, list[str]] | None:
        """Atomically: unless ``key`` is in use, stores a new ``PENDING`` entry for it,
        owned by ``owner``, after dropping entries beyond ``max_length - 1`` (0: no
        limit; finished ones first, oldest first), and marks ``owner`` alive. Returns
        the entry's id and the keys of the unfinished entries dropped, or ``None``
        when the key is in use."""

    def transition(
        self,
        entry_id: Any,
        owner: str,
        from_states: tuple[str, ...],
        to_state: str | None,
        outcome: bytes | None = None,
        progress: bytes | None = None,
    ) -> bool:
        """Atomically, if the entry is owned by ``owner`` and in one of ``from_states``:
        sets the state (unless ``None``), and the outcome and progress (unless
        ``None``). Returns whether it did."""

    def cancel(self, key: str | None, entry_id: Any) -> bool:
        """Atomically: marks the entry with this id ``CANCELLED`` if it is ``PENDING`` and
        still under ``key`` (``None``: popped, and kept without its key)."""

    def read(self, key: str) -> StoredTask | None:
        """The entry under ``key``, or ``None``. Its outcome may be left out (``None``),
        which makes the frequent question, whether a task is done, cheaper to answer."""

    def read_entry(self, entry_id: Any) -> StoredTask | None:
        """The entry with this id, popped or not, outcome included, or ``None``."""

    def pop(self, key: str) -> StoredTask | None:
        """Atomically: takes ``key`` out of use and returns its entry. A finished
        entry is deleted; an unfinished one is kept without its key, for the popper,
        and so is a ``CANCELLED`` one without an outcome, for its owner, which has not
        seen the cancel yet."""

    def delete(self, entry_id: Any) -> None:
        """Deletes the entry with this id, if there is one."""

    def keys(self) -> list[str]:
        """The keys in use, oldest first."""

    def count(self) -> int:
        """How many keys are in use."""

    def beat(self, owner: str, alive: bool) -> None:
        """Marks ``owner`` alive now. ``alive=False`` says it has no unfinished task
        left: the store may let its sign of life lapse (but not delete it at once,
        which would race a claim made meanwhile)."""

    def after_fork(self) -> None:
        """Called in a new process forked from this one: drop connections."""


def propagate_exceptions_callback(future: concurrent.futures.Future[Any]) -> None:
    """Raises the task's exception, if it has one, in the done callback. It is
    added to every future when ``EXECUTOR_PROPAGATE_EXCEPTIONS`` is true, so that a
    failure is surfaced (logged on ``app.logger``) rather than kept in the future::

        executor.add_default_done_callback(propagate_exceptions_callback)
    """
    if future.cancelled():
        return  # a cancelled task did not fail
    exception = future.exception()
    if exception is not None:
        raise exception


# Flask-Executor 1.0's import paths and call forms ------------------------------------
#
# 1.0 was a package, and code written for it imports from its modules
# (``from flask_executor.futures import Future``). ``import`` looks in sys.modules
# before it looks for a file, so a module object registered there under each of
# those names serves them all, whether this file is installed or copied into a
# project. Each holds what 1.0 exposed there; a name whose 1.0 meaning is gone is
# the nearest thing here (FutureProxy is TaskFuture: futures are no longer proxies).


def _split_1_0_call(
    method: str, names: tuple[str, ...], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """Splits a call into the leading ``names`` and the task's own arguments. 1.0
    also took the leading ones by keyword: ``submit_stored(future_key=k, fn=f)``."""
    count = len(names)
    if len(args) >= count:
        return args[:count], args[count:]
    leading = list(args)
    for name in names[len(args) :]:
        if name not in kwargs:
            raise TypeError(f"{method}() missing required argument {name!r}")
        leading.append(kwargs.pop(name))
    return tuple(leading), ()


def _str2bool(value: object) -> bool:
    """1.0's reading of a configuration flag."""
    return str(value).lower() in ("yes", "true", "t", "1")


class _InstanceProxy:
    """1.0's base of its proxies: reads attributes of the object it wraps."""

    def __init__(self, proxied: object) -> None:
        object.__setattr__(self, "_self", proxied)

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_self"), name)


def _get_current_app_context() -> AppContext | None:
    """1.0's way to the current app context, or ``None`` outside one."""
    return cast(AppContext, cast(Any, app_ctx)._get_current_object()) if flask.has_app_context() else None


def _push_app_context(fn: Callable[P, R]) -> Callable[P, R]:
    """1.0's wrapper: ``fn`` runs in an app context of the current app, with a copy of ``g``."""
    app = cast(Any, flask.current_app)._get_current_object()
    g_values = dict(vars(cast(Any, flask.g)._get_current_object()))

    @functools.wraps(fn)
    def in_app_context(*args: P.args, **kwargs: P.kwargs) -> R:
        with app.app_context():
            vars(cast(Any, flask.g)._get_current_object()).update(g_values)
            return fn(*args, **kwargs)

    return in_app_context


def _install_1_0_modules() -> None:
    shared = {
        "FutureCollection": FutureCollection,
        "FutureProxy": TaskFuture,
        "InstanceProxy": _InstanceProxy,
        "str2bool": _str2bool,
    }
    contents: dict[str, dict[str, Any]] = {
        "executor": {
            **shared,
            "Executor": Executor,
            "ExecutorJob": ExecutorJob,
            "propagate_exceptions_callback": propagate_exceptions_callback,
            "push_app_context": _push_app_context,
            "get_current_app_context": _get_current_app_context,
            "copy_current_request_context": flask.copy_current_request_context,
            "current_app": flask.current_app,
            "g": flask.g,
            "concurrent": concurrent,
            "contextvars": contextvars,
            "copy": copy,
            "re": re,
        },
        "futures": {**shared, "Future": concurrent.futures.Future, "OrderedDict": collections.OrderedDict},
        "helpers": {
            "InstanceProxy": _InstanceProxy,
            "str2bool": _str2bool,
            "PROXIED_OBJECT": "__proxied_object",
        },
    }
    this_module = sys.modules[__name__]
    for name, names in contents.items():
        module = types.ModuleType(
            f"{__name__}.{name}", f"Flask-Executor 1.0's {name} module, kept for its users."
        )
        vars(module).update(names)
        sys.modules[module.__name__] = module
        setattr(this_module, name, module)


_install_1_0_modules()


# Contexts: what a task sees as current_app, g, request and session ------------------
#
# A task gets context objects of its own, because Flask records the pushes of a
# context in the context object: two threads pushing the same one at once corrupt
# each other's state (Flask-Executor 1.0's ``map`` in a request did). Its app
# context has a copy of the submitter's ``g``; its request is the view's request as
# _TaskRequest presents it. Flask 3.2 merges the request context into the app
# context, so there is one class per shape of Flask's contexts, chosen once below.


class _CapturedContexts:
    """The contexts a task was submitted from, taken at submit time: the app, a
    snapshot of ``g``, and during a request the request and session. In the worker,
    :meth:`push` makes and pushes contexts of the task's own, and :meth:`pop` pops
    them and runs the teardown functions."""

    __slots__ = ("app", "g_values", "request", "session")

    def __init__(self, app: flask.Flask | None) -> None:
        self.request: _TaskRequest | None = None
        self.session: Any = None
        if flask.has_app_context():
            current = cast(AppContext, cast(Any, app_ctx)._get_current_object())
            self.app: flask.Flask = current.app
            g_values = vars(current.g)
            self.g_values = dict(g_values) if g_values else None
            self._capture_request(current)
        elif app is not None:
            self.app = app
            self.g_values = None
        else:
            raise RuntimeError(
                "the executor is not bound to an app: call init_app(app) before submitting tasks"
            )

    def _capture_request(self, current: AppContext) -> None:
        raise NotImplementedError

    def push(self) -> Any:
        """Pushes the task's contexts; returns what :meth:`pop` needs."""
        raise NotImplementedError

    def pop(self, pushed: Any, error: BaseException | None) -> None:
        raise NotImplementedError

    def _fresh_g(self, context: AppContext) -> None:
        if self.g_values:
            vars(context.g).update(self.g_values)


class _SplitContexts(_CapturedContexts):
    """Flask 2.2 to 3.1: an app context, with a request context on top when the
    task was submitted during a request."""

    __slots__ = ()

    def _capture_request(self, current: AppContext) -> None:
        if flask.has_request_context():
            view_context = cast("RequestContext", cast(Any, _request_ctx)._get_current_object())
            self.request = _request_for_task(view_context.request)
            self.session = view_context.session

    def push(self) -> tuple[AppContext, RequestContext | None]:
        app_context = self.app.app_context()
        self._fresh_g(app_context)
        app_context.push()
        if self.request is None:
            return app_context, None
        try:
            request_context = _reusable_context(self.request, self.session) or _TaskRequestContext(
                self.app, self.request.environ, self.request, self.session
            )
            request_context.push()
        except BaseException:
            app_context.pop()
            raise
        return app_context, request_context

    def pop(self, pushed: tuple[AppContext, RequestContext | None], error: BaseException | None) -> None:
        app_context, request_context = pushed
        try:
            if request_context is not None:
                request_context.pop(error)
                _keep_for_reuse(self.request, self.session, request_context)
        finally:
            app_context.pop(error)


class _MergedContexts(_CapturedContexts):
    """Flask 3.2 and later: one app context, which carries the request when the
    task was submitted during a request."""

    __slots__ = ()

    def _capture_request(self, current: AppContext) -> None:
        if current.has_request:  # type: ignore[attr-defined]
            self.request = _request_for_task(current.request)  # type: ignore[attr-defined]
            self.session = self.request.__dict__.get(_TASK_SESSION, _MISSING)
            if self.session is _MISSING:
                # A copy of the view's context shares the view's session once the view
                # has opened it, and opens its own otherwise, leaving the view's alone.
                self.session = current.copy().session  # type: ignore[attr-defined]
                self.request.__dict__[_TASK_SESSION] = self.session

    def push(self) -> AppContext:
        context: AppContext | None = None
        if self.request is not None:
            context = _reusable_context(self.request, self.session)
            if context is None:
                context = _TaskAppContext(self.app, request=self.request, session=self.session)  # type: ignore[call-arg]
            context.g = self.app.app_ctx_globals_class()  # a reused context gets a fresh g
        else:
            context = self.app.app_context()
        self._fresh_g(context)
        context.push()
        return context

    def pop(self, pushed: AppContext, error: BaseException | None) -> None:
        pushed.pop(error)
        if self.request is not None:
            _keep_for_reuse(self.request, self.session, pushed)


if hasattr(AppContext, "has_request"):
    _Contexts: type[_CapturedContexts] = _MergedContexts

    class _TaskAppContext(AppContext):
        """The app context of a task on Flask 3.2: the request it carries was matched
        to its URL rule when it arrived, and matching again would write ``url_rule``
        and ``view_args`` onto the request the view is still using."""

        def match_request(self) -> None:
            pass

else:
    _Contexts = _SplitContexts
    from flask.ctx import RequestContext as _RequestContext
    from flask.globals import request_ctx as _request_ctx

    class _TaskRequestContext(_RequestContext):
        """The request context of a task: the request was matched to its URL rule
        when it arrived, so matching it again for every task is skipped."""

        def match_request(self) -> None:
            pass


# Making a context builds a URL adapter, which costs more than the rest of a small
# task, so each worker thread keeps the last request-bound context it popped and
# pushes it again for the next task of the same request. A context in use is not
# kept (a task run inline inside another gets its own), and each thread keeps at
# most one request alive this way.
_this_thread = threading.local()


def _reusable_context(request: _TaskRequest, session: Any) -> Any:
    kept = getattr(_this_thread, "context", None)
    if kept is not None and kept[0] is request and kept[1] is session:
        _this_thread.context = None
        return kept[2]
    return None


def _keep_for_reuse(request: _TaskRequest | None, session: Any, context: Any) -> None:
    _this_thread.context = (request, session, context)


class _ViewRequest(flask.wrappers.Request):
    """Mixed into the class of a view's request when the view first submits a task
    (see :func:`_request_for_task`). The view and its tasks may read the body at the
    same time, so it is read under a lock; once the request has ended it is not read
    at all, because the server may have given its input stream to another request."""

    def _load_form_data(self) -> None:
        with self.__dict__[_BODY_LOCK]:
            if "form" not in self.__dict__:
                self._check_body_readable()
            super()._load_form_data()

    def get_data(  # type: ignore[override]
        self, cache: bool = True, as_text: bool = False, parse_form_data: bool = False
    ) -> bytes | str:
        with self.__dict__[_BODY_LOCK]:
            if self.__dict__.get("_cached_data") is None and "form" not in self.__dict__:
                self._check_body_readable()
            return super().get_data(cache, as_text, parse_form_data)  # type: ignore[call-overload,no-any-return]

    def close(self) -> None:
        with self.__dict__[_BODY_LOCK]:  # a task reading the body finishes first
            self.__dict__[_BODY_ENDED] = True
            super().close()

    def _check_body_readable(self) -> None:
        if self.__dict__.get(_BODY_ENDED):
            raise RuntimeError(
                "the request body was not read before the view returned, and the server may have"
                " given its input stream to another request since: read request.form, .files,"
                " .get_json() or .get_data() in the view (or pass the data to the task)"
            )


class _TaskRequest(flask.wrappers.Request):
    """The view's request as its tasks see it. It has its own copy of the WSGI
    environ and headers, because a server may clear or reuse the view's once the
    response has gone (uWSGI does); it reads the body through the view's request,
    so that both see what either parsed; and its ``close()`` leaves the uploaded
    files open, because the view may still be reading them."""

    _view_request: _ViewRequest

    @property
    def stream(self) -> Any:  # type: ignore[override,unused-ignore]
        return self._view_request.stream

    def _load_form_data(self) -> None:
        view_request = self._view_request
        view_request._load_form_data()
        mine, theirs = self.__dict__, view_request.__dict__
        mine["form"], mine["files"] = theirs["form"], theirs["files"]

    def get_data(  # type: ignore[override]
        self, cache: bool = True, as_text: bool = False, parse_form_data: bool = False
    ) -> bytes | str:
        return self._view_request.get_data(cache, as_text, parse_form_data)

    def close(self) -> None:
        pass


# Keys this module adds to a request's __dict__.
_BODY_LOCK = "_flask_executor_body_lock"
_BODY_ENDED = "_flask_executor_body_ended"
_TASK_REQUEST = "_flask_executor_task_request"
_TASK_SESSION = "_flask_executor_task_session"
_MISSING: Any = object()


def _request_for_task(request: flask.wrappers.Request) -> _TaskRequest:
    """The request as the tasks submitted during it see it, made at the first submit."""
    if isinstance(request, _TaskRequest):  # submitted from inside a task
        return request
    shared = request.__dict__.get(_TASK_REQUEST)
    if shared is not None:
        return cast(_TaskRequest, shared)
    own = dict(request.__dict__)
    environ = own["environ"] = dict(request.environ)
    if isinstance(own.get("headers"), EnvironHeaders):
        own["headers"] = EnvironHeaders(environ)
    own["_view_request"] = request
    request_class = type(request)
    task_request = object.__new__(_subclass(_TaskRequest, request_class))
    task_request.__dict__.update(own)
    request.__dict__[_BODY_LOCK] = threading.RLock()
    request.__dict__[_TASK_REQUEST] = task_request
    # The one place where this module changes an object it does not own: the view's
    # request becomes an instance of a subclass that takes the body lock. It is safe
    # here because only the view's thread holds the request until a task starts.
    request.__class__ = _subclass(_ViewRequest, request_class)
    return task_request


_subclasses: dict[tuple[type[Any], type[Any]], type[Any]] = {}


def _subclass(mixin: type[T], request_class: type[Any]) -> type[T]:
    found = _subclasses.get((mixin, request_class))
    if found is None:
        made = type(request_class.__name__, (mixin, request_class), {})
        found = _subclasses.setdefault((mixin, request_class), made)
    return found


# Tasks ---------------------------------------------------------------------------------


class _TaskSettings(NamedTuple):
    """What every task of an executor needs to know about its app, set by init_app."""

    app: flask.Flask
    push_app_context: bool
    log_exceptions: bool


# The future of the task running in this thread, for report_progress().
_current_future: contextvars.ContextVar[TaskFuture[Any] | None] = contextvars.ContextVar(
    "flask_executor.current_future", default=None
)


class _Task:
    """One call of a submitted function. A pool of this process runs it with
    :meth:`run`, inside fresh copies of the contexts it was submitted from; a pool
    of other processes sends its call there and completes its future from here."""

    __slots__ = ("args", "contexts", "fn", "future", "kwargs")

    def __init__(
        self,
        future: TaskFuture[Any],
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        contexts: _CapturedContexts | None,
    ) -> None:
        self.future = future
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.contexts = contexts

    def run(self) -> None:
        future = self.future
        if not future._start():
            return
        token = _current_future.set(future)
        contexts = self.contexts
        pushed = None
        error: BaseException | None = None
        try:
            if contexts is not None:
                pushed = contexts.push()
            result = self.fn(*self.args, **self.kwargs)
            if isinstance(result, types.CoroutineType):
                result = _await(result)
        except BaseException as exception:
            error = exception
            self.log_failure(exception)
            # Still inside the contexts, so that done callbacks run in them too.
            future.set_exception(exception)
        else:
            future.set_result(result)
        finally:
            _current_future.reset(token)
            if pushed is not None:
                try:
                    contexts.pop(pushed, error)  # type: ignore[union-attr]
                except Exception:
                    self.logger().exception("A teardown function failed after task %s", _describe(self.fn))
            error = None  # break the cycle through the traceback

    def log_failure(self, exception: BaseException, where: str = "") -> None:
        settings = self.future._settings
        if settings is not None and settings.log_exceptions:
            settings.app.logger.error("Task %s failed%s", _describe(self.fn), where, exc_info=exception)

    def logger(self) -> logging.Logger:
        settings = self.future._settings
        return settings.app.logger if settings is not None else _logger


def _await(coroutine: Coroutine[Any, Any, Any]) -> Any:
    # Imported here: most apps never submit a coroutine, and asyncio takes a while to import.
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    # A sync-mode task called from a coroutine: this thread's loop is busy running
    # the caller, so the task gets a loop of its own in another thread.
    context = contextvars.copy_context()
    with concurrent.futures.ThreadPoolExecutor(1) as loop_thread:
        return loop_thread.submit(context.run, asyncio.run, coroutine).result()


def _call_done_callback(fn: Callable[[Any], object], future: TaskFuture[Any]) -> None:
    """Runs a done callback inside the app context, logging what it raises."""
    settings = future._settings
    try:
        if settings is None or not settings.push_app_context or flask.has_app_context():
            fn(future)
        else:
            with settings.app.app_context():
                fn(future)
    except Exception as error:
        if settings is None:
            raise  # concurrent.futures logs it, as for any future
        if not future.cancelled() and error is future.exception() and settings.log_exceptions:
            return  # propagate_exceptions_callback re-raised a failure already logged
        settings.app.logger.error("Done callback %s of a task failed", _describe(fn), exc_info=error)


# What a worker process runs. A task's call travels pickled, and runs there inside
# an app context of the same app when one can be had: the parent's own app in a
# forked worker, else the one named by EXECUTOR_PROCESS_APP.


def _run_pickled_call(call: bytes, app_reference: tuple[str, str | None] | None) -> Any:
    fn, args, kwargs = pickle.loads(call)
    return _run_call(fn, args, kwargs, app_reference, None)


def _run_call(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    app_reference: tuple[str, str | None] | None,
    call_id: str | None,
) -> Any:
    # call_id is not read: it only makes each call unique (see _ConfiguredPool.schedule).
    # A forked worker starts with the context variables of the thread that forked it,
    # that thread's app and request included, which a task must not see: an app context
    # current here was inherited so. Otherwise the thread's own context is kept, as an
    # executor's worker threads may need it (Dask's get_worker()).
    context = contextvars.Context() if flask.has_app_context() else contextvars.copy_context()
    return context.run(_run_here, fn, args, kwargs, app_reference)


def _run_here(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    app_reference: tuple[str, str | None] | None,
) -> Any:
    _current_future.set(_progress_sink)
    app = _worker_app(*app_reference) if app_reference is not None else None
    if app is None:
        result = fn(*args, **kwargs)
        return _await(result) if isinstance(result, types.CoroutineType) else result
    with app.app_context():
        result = fn(*args, **kwargs)
        return _await(result) if isinstance(result, types.CoroutineType) else result


def _worker_app(app_key: str, import_string: str | None) -> flask.Flask | None:
    app = _apps_for_forked_workers.get(app_key)
    if app is None and import_string is not None:
        app = _apps_loaded_in_worker.get(import_string)
        if app is None:
            from flask.cli import locate_app

            module_name, _, app_name = import_string.partition(":")
            app = _apps_loaded_in_worker[import_string] = locate_app(module_name, app_name or None)
    return app


# Apps by init_app call, inherited by process workers forked from this process.
_apps_for_forked_workers: weakref.WeakValueDictionary[str, flask.Flask] = weakref.WeakValueDictionary()
# Apps a spawned process worker loaded from EXECUTOR_PROCESS_APP, by import string.
_apps_loaded_in_worker: dict[str, flask.Flask] = {}
# Where report_progress() writes in a process worker, whose reports go nowhere.
_progress_sink: TaskFuture[Any] = TaskFuture()


def _call_each(fn: Callable[..., T], calls: list[tuple[Any, ...]]) -> list[T]:
    return [fn(*call) for call in calls]


def _take(iterator: Iterator[tuple[Any, ...]], count: int) -> list[tuple[Any, ...]]:
    return list(itertools.islice(iterator, count))


def _results_in_order(futures: list[TaskFuture[T]], end_time: float | None) -> Iterator[T]:
    # A generator separate from map(), so that map() submits everything at once.
    try:
        futures.reverse()
        while futures:
            future = futures.pop()
            try:
                yield future.result(None if end_time is None else end_time - time.monotonic())
            finally:
                future.cancel()  # when result() timed out or the caller stopped early
    finally:
        for future in futures:
            future.cancel()


def _describe(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


_FUTURE_ATTRIBUTES = frozenset(dir(TaskFuture()))
# A key that is no key: submit() stores nothing.
_NO_KEY: Any = object()


# Pools: where tasks run ----------------------------------------------------------------
#
# One class per kind of pool, each behind the interface of _Pool, and one function,
# _make_pool, that chooses the kind from the configuration.


class _Pool:
    """What every kind of pool does for its :class:`Executor`."""

    #: Whether tasks run in threads of this process, and so get the contexts pushed.
    pushes_contexts: ClassVar[bool] = True
    #: How many tasks run at once; ``None`` when each runs as it is submitted.
    worker_count: int | None = None

    def schedule(self, task: _Task) -> None:
        """Accepts a task: it runs, unless its future is cancelled before it starts.

        :raises RuntimeError: the pool was shut down.
        """
        raise NotImplementedError

    def shutdown(self, wait: bool, cancel_futures: bool) -> None:
        """Accepts no more tasks; see :meth:`Executor.shutdown`."""
        raise NotImplementedError

    def after_fork(self) -> _Pool:
        """A pool of the same kind for a new process forked from this one, where the
        threads and locks of this pool are of no use."""
        raise NotImplementedError

    def batch_size(self, chunksize: int) -> int:
        """How many calls of :meth:`Executor.map` travel to a worker together."""
        return 1


class _InlinePool(_Pool):
    """``EXECUTOR_TYPE = 'sync'``, for tests: a task runs in the thread that submits
    it, before ``submit()`` returns. With ``EXECUTOR_PROPAGATE_EXCEPTIONS``,
    ``submit()`` raises what the task raised."""

    def __init__(self, propagate_exceptions: bool) -> None:
        self._propagate_exceptions = propagate_exceptions

    def schedule(self, task: _Task) -> None:
        task.run()
        if self._propagate_exceptions:
            exception = task.future.exception()
            if exception is not None:
                raise exception

    def shutdown(self, wait: bool, cancel_futures: bool) -> None:
        pass

    def after_fork(self) -> _Pool:
        return self


class _ThreadPool(_Pool):
    """``EXECUTOR_TYPE = 'thread'``: worker threads of this process.

    Not :class:`~concurrent.futures.ThreadPoolExecutor`, because that one makes a
    future of its own for every task and completes it after the function returns,
    outside the task's contexts. Here the task completes its :class:`TaskFuture`
    inside them, so done callbacks run there, and a task costs one future, not two.
    """

    worker_count: int

    def __init__(self, max_workers: int, thread_name_prefix: str) -> None:
        self.worker_count = max_workers
        self._thread_name_prefix = thread_name_prefix
        self._queue: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        # Held while checking for shutdown and queueing, so that no task is queued
        # behind the sentinel that tells the workers to stop, where it would never run.
        self._lock = threading.Lock()
        self._shut_down = False
        _live_thread_pools.add(self)
        # When the pool is dropped without a shutdown (its executor bound to another
        # app, say), its workers finish what is queued and stop.
        weakref.finalize(self, self._queue.put, None).atexit = False

    def schedule(self, task: _Task) -> None:
        with self._lock:
            if self._shut_down:
                raise RuntimeError("cannot schedule new tasks after shutdown")
            # A thread for each of the first max_workers tasks, then no more: it saves
            # counting idle workers on every submit, for at most max_workers idle threads.
            # Started before the task is queued, so that a thread that cannot start
            # refuses the task whole.
            if len(self._threads) < self.worker_count:
                thread = threading.Thread(
                    target=_work,
                    args=(self._queue,),
                    name=f"{self._thread_name_prefix}_{len(self._threads)}",
                    # Daemon, so that an idle pool never keeps the interpreter alive;
                    # _finish_thread_pools_at_exit lets accepted tasks complete.
                    daemon=True,
                )
                thread.start()
                _worker_threads.add(thread)
                self._threads.append(thread)
            self._queue.put(task)

    def shutdown(self, wait: bool, cancel_futures: bool) -> None:
        taken_back = []
        with self._lock:
            self._shut_down = True
            while cancel_futures:
                try:
                    taken_back.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._queue.put(None)
        # Outside the lock: cancelling runs done callbacks, which may submit (and be refused).
        for task in taken_back:
            if task is not None:
                task.future.cancel()
        if wait:
            for thread in self._threads:
                thread.join()

    def after_fork(self) -> _Pool:
        return _ThreadPool(self.worker_count, self._thread_name_prefix)


def _work(tasks: queue.SimpleQueue[_Task | None]) -> None:
    while True:
        task = tasks.get()
        if task is None:
            tasks.put(None)  # for the next worker
            _worker_threads.discard(threading.current_thread())
            return
        task.run()
        del task


# Thread pools, and every worker thread until it ends (including those of pools
# already shut down or dropped), so that at exit the tasks they accepted complete.
_live_thread_pools: weakref.WeakSet[_ThreadPool] = weakref.WeakSet()
_worker_threads: set[threading.Thread] = set()


class _ConfiguredThreadPool(_Pool):
    """``EXECUTOR_TYPE`` naming a :class:`~concurrent.futures.ThreadPoolExecutor`
    or a subclass (gevent's, say): its threads run tasks as :class:`_ThreadPool`'s
    do, inside their contexts."""

    def __init__(
        self,
        make_executor: Callable[[], concurrent.futures.Executor],
        executor: concurrent.futures.Executor | None,
        worker_count: int,
    ) -> None:
        self._make_executor = make_executor
        self._executor = executor
        self.worker_count = worker_count
        self._lock = threading.Lock()
        self._shut_down = False

    def schedule(self, task: _Task) -> None:
        with self._lock:
            if self._shut_down:
                raise RuntimeError("cannot schedule new tasks after shutdown")
            if self._executor is None:
                self._executor = self._make_executor()
            executor = self._executor
        handed_over = executor.submit(task.run)
        # shutdown(cancel_futures=True) cancels the executor's futures, not ours.
        handed_over.add_done_callback(functools.partial(_cancel_if_cancelled, task.future))

    def shutdown(self, wait: bool, cancel_futures: bool) -> None:
        with self._lock:
            self._shut_down = True
            executor = self._executor
        if executor is not None:
            executor.shutdown(wait=wait, cancel_futures=cancel_futures)

    def after_fork(self) -> _Pool:
        return _ConfiguredThreadPool(self._make_executor, None, cast(int, self.worker_count))


def _cancel_if_cancelled(future: TaskFuture[Any], handed_over: concurrent.futures.Future[Any]) -> None:
    if handed_over.cancelled():
        future.cancel()


class _HandOverPool(_Pool):
    """What the pools that run tasks in other processes share. Each call is handed
    to an executor, which gives its own future back; when that one settles, the
    task's future is completed from it, here, so done callbacks run in this process.
    A task counts as running from the moment it is handed over.

    An executor that breaks (one of its worker processes died) fails the tasks it
    had, and is replaced by a new one for the tasks that follow."""

    pushes_contexts = False

    def __init__(
        self,
        make_executor: Callable[[], concurrent.futures.Executor],
        executor: concurrent.futures.Executor | None,
        worker_count: int,
        app_reference: tuple[str, str | None] | None,
    ) -> None:
        self._make_executor = make_executor
        self._executor = executor  # made on the first task, when None
        self.worker_count = worker_count
        self._app_reference = app_reference
        self._lock = threading.Lock()
        self._shut_down = False

    def batch_size(self, chunksize: int) -> int:
        return chunksize

    def after_fork(self) -> _Pool:
        return type(self)(self._make_executor, None, cast(int, self.worker_count), self._app_reference)

    def _hand_over(self, task: _Task, call: tuple[Any, ...]) -> None:
        for attempt in (1, 2):
            with self._lock:
                if self._executor is None:
                    self._executor = self._make_executor()
                executor = self._executor
            try:
                handed_over = executor.submit(*call)
            except concurrent.futures.BrokenExecutor as error:
                # Broken since its last task finished: a new executor takes this one.
                self._forget_broken(executor, task, error)
                if attempt == 2:
                    raise
            else:
                handed_over.add_done_callback(functools.partial(self._settle, task, executor))
                return

    def _settle(
        self, task: _Task, executor: concurrent.futures.Executor, handed_over: concurrent.futures.Future[Any]
    ) -> None:
        future = task.future
        try:
            exception = handed_over.exception()
        except concurrent.futures.CancelledError as cancelled:
            exception = cancelled  # the executor cancelled it (Dask's does at shutdown)
        if exception is None:
            future.set_result(handed_over.result())
            return
        if isinstance(exception, concurrent.futures.BrokenExecutor):
            self._forget_broken(executor, task, exception)
        else:
            task.log_failure(exception, " in a worker process")
        future.set_exception(exception)

    def _forget_broken(
        self, executor: concurrent.futures.Executor, task: _Task, error: concurrent.futures.BrokenExecutor
    ) -> None:
        with self._lock:
            if self._executor is not executor:
                return  # already replaced: the event was logged then
            self._executor = None
            # Kept alive, never shut down: a broken executor fails its futures in its
            # own manager thread, holding its shutdown lock, so our callbacks run
            # there; dropping the last reference there would make its collection
            # take that same lock, and the thread would wait for itself forever.
            _left_behind.append(executor)
        task.logger().warning(
            "A worker process died (killed, out of memory, or os._exit); the tasks it may have"
            " reached failed with %s, and a new pool takes the tasks that follow",
            type(error).__name__,
        )


# Executors that broke; see _HandOverPool._forget_broken.
_left_behind: collections.deque[object] = collections.deque(maxlen=16)


class _ProcessPool(_HandOverPool):
    """``EXECUTOR_TYPE = 'process'``, or one naming a
    :class:`~concurrent.futures.ProcessPoolExecutor`: worker processes.

    Tasks wait in a queue of this pool, and only as many are handed to the
    ProcessPoolExecutor as its workers and its call queue take (twice the workers,
    plus one), in batches once half have come back, which wakes its manager thread
    less often than one at a time. So a task cancelled while it waits is never sent; a waiting task is
    pending and a handed-over one running, as the executor's own futures say; and
    when a worker dies and the executor breaks, only the handed-over tasks fail
    with BrokenProcessPool. The waiting ones provably never reached a worker, and
    run on the new executor.

    A call is pickled at submit, in the submitting thread, so that what cannot be
    pickled is reported there, naming the function and the argument."""

    def __init__(
        self,
        make_executor: Callable[[], concurrent.futures.Executor],
        executor: concurrent.futures.Executor | None,
        worker_count: int,
        app_reference: tuple[str, str | None] | None,
    ) -> None:
        super().__init__(make_executor, executor, worker_count, app_reference)
        self._waiting: collections.deque[tuple[_Task, bytes]] = collections.deque()
        self._handed_over = 0

    def schedule(self, task: _Task) -> None:
        call = _pickled_call(task.fn, task.args, task.kwargs)
        with self._lock:
            if self._shut_down:
                raise RuntimeError("cannot schedule new tasks after shutdown")
            self._waiting.append((task, call))
        self._hand_over_waiting()

    def _hand_over_waiting(self, refill: bool = True) -> None:
        workers = cast(int, self.worker_count)
        while True:
            with self._lock:
                if not self._waiting or self._handed_over > 2 * workers:
                    return
                if not refill and self._handed_over > workers:
                    return  # refilled in batches, from half full: fewer wake-ups of the executor
                refill = True
                task, call = self._waiting.popleft()
                self._handed_over += 1  # its place, given back below if it was cancelled
            # Outside the lock: starting may ask a shared store, and a task cancelled
            # meanwhile runs its done callbacks, which may submit to this pool.
            if not task.future._start():
                with self._lock:
                    self._handed_over -= 1
                continue
            self._hand_over_one(task, call)

    def _hand_over_one(self, task: _Task, call: bytes) -> None:
        try:
            self._hand_over(task, (_run_pickled_call, call, self._app_reference))
        except BaseException as error:  # the executor was shut down or broke twice
            self._settle_unsent(task, error)

    def _settle(
        self, task: _Task, executor: concurrent.futures.Executor, handed_over: concurrent.futures.Future[Any]
    ) -> None:
        with self._lock:
            self._handed_over -= 1
        super()._settle(task, executor, handed_over)
        self._hand_over_waiting(refill=False)

    def _settle_unsent(self, task: _Task, error: BaseException) -> None:
        with self._lock:
            self._handed_over -= 1
        task.future.set_exception(error)

    def shutdown(self, wait: bool, cancel_futures: bool) -> None:
        with self._lock:
            self._shut_down = True
            waiting, self._waiting = self._waiting, collections.deque()
        for task, call in waiting:  # accepted, so they run, unless cancel_futures
            if cancel_futures:
                task.future.cancel()
            elif task.future._start():
                with self._lock:
                    self._handed_over += 1
                self._hand_over_one(task, call)
        executor = self._executor
        if executor is not None:
            executor.shutdown(wait=wait)


def _pickled_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    from multiprocessing.reduction import ForkingPickler  # as the process pool pickles

    try:
        return bytes(ForkingPickler.dumps((fn, args, kwargs)))
    except Exception as error:
        raise TypeError(_why_unpicklable(fn, args, kwargs, error)) from error


def _why_unpicklable(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], error: Exception
) -> str:
    from multiprocessing.reduction import ForkingPickler

    try:
        ForkingPickler.dumps(fn)
    except Exception as fn_error:
        return (
            f"{_describe(fn)} cannot be sent to a process pool because it cannot be pickled"
            f" ({fn_error}): submit a function defined at module level (not a lambda, closure or"
            " nested function), or use EXECUTOR_TYPE='thread'"
        )
    if fn is _call_each:  # a batch of map() calls
        fn, calls = args
        places = [(f"an item passed to map() for {_describe(fn)}", item) for call in calls for item in call]
    else:
        places = [(f"argument {index} of {_describe(fn)}", value) for index, value in enumerate(args)]
        places += [(f"keyword argument {name!r} of {_describe(fn)}", value) for name, value in kwargs.items()]
    for place, value in places:
        try:
            ForkingPickler.dumps(value)
        except Exception as value_error:
            return (
                f"{place} ({type(value).__name__}) cannot be sent to a process pool because it cannot"
                f" be pickled ({value_error}): pass plain data (not locks, open files, connections or"
                " app objects), or use EXECUTOR_TYPE='thread'"
            )
    return f"the call of {_describe(fn)} cannot be sent to a process pool: it cannot be pickled ({error})"


class _ConfiguredPool(_HandOverPool):
    """``EXECUTOR_TYPE`` naming any other executor, one that runs tasks elsewhere
    (Dask, loky). It decides what runs when, so each call is handed over at once,
    as it is: the executor sends it as it can (Dask and loky can send a lambda)."""

    def schedule(self, task: _Task) -> None:
        with self._lock:
            if self._shut_down:
                raise RuntimeError("cannot schedule new tasks after shutdown")
        if task.future._start():
            # A unique id in every call: some executors (Dask's) run a call only once
            # when it is submitted again with the same arguments.
            # What the executor raises (it cannot send the call, say) comes out of submit,
            # which then keeps nothing of the task.
            call = (_run_call, task.fn, task.args, task.kwargs, self._app_reference, uuid.uuid4().hex)
            self._hand_over(task, call)

    def shutdown(self, wait: bool, cancel_futures: bool) -> None:
        with self._lock:
            self._shut_down = True
            executor = self._executor
        if executor is None:
            return
        # Everything was handed over, so there is nothing of ours to cancel. A
        # configured executor may not take cancel_futures (Dask's does not), and may
        # cancel what it holds when not waiting (Dask's does), so another thread waits.
        if wait:
            executor.shutdown(wait=True)
        else:
            threading.Thread(target=executor.shutdown, name="flask_executor_shutdown", daemon=True).start()


class _QueueBound:
    """``EXECUTOR_QUEUE_SIZE``: a slot for each task that is running or waiting, as
    many as the workers plus the queue size. A task takes one when it is accepted and
    frees it when its future is done (finished, failed or cancelled), so once every
    worker is busy, the slots left are those for waiting tasks."""

    def __init__(self, config: _Config, worker_count: int) -> None:
        self._slots = threading.Semaphore(cast(int, config.queue_size) + worker_count)
        self._config = config

    @classmethod
    def for_pool(cls, config: _Config, pool: _Pool) -> _QueueBound | None:
        if config.queue_size is None or pool.worker_count is None:
            return None
        return cls(config, pool.worker_count)

    def take(self, future: TaskFuture[Any], fn: Callable[..., Any]) -> None:
        config = self._config
        timeout = config.queue_timeout
        if not (self._slots.acquire(timeout=timeout) if timeout else self._slots.acquire(blocking=False)):
            raise QueueFull(
                f"{config.queue_size} tasks are already waiting for a worker ({config.prefix}QUEUE_SIZE"
                f"={config.queue_size}); {_describe(fn)} was not accepted and will not run. Retry"
                f" later, or raise {config.prefix}QUEUE_SIZE or {config.prefix}QUEUE_TIMEOUT"
            )
        # The base class's method: freeing a slot needs no app context.
        concurrent.futures.Future.add_done_callback(future, self._free)

    def give_back(self) -> None:
        """Frees the slot of a task that was not accepted after all."""
        self._slots.release()

    def _free(self, future: concurrent.futures.Future[Any]) -> None:
        self._slots.release()


def _make_pool(config: _Config, name: str) -> _Pool:
    """The pool ``EXECUTOR_TYPE`` asks for; the one place that tells kinds apart.

    :raises ValueError: a configured executor could not be made.
    """
    cpus = os.cpu_count() or 1
    if config.kind == "sync":
        return _InlinePool(config.propagate_exceptions)
    if config.kind == "thread":
        # The default of concurrent.futures.ThreadPoolExecutor.
        workers = config.max_workers or min(32, cpus + 4)
        return _ThreadPool(workers, f"flask_executor_{name}" if name else "flask_executor")
    app_reference = (config.app_key, config.process_app) if config.push_app_context else None
    workers = config.max_workers or cpus  # the default of ProcessPoolExecutor
    if config.kind == "process":
        if config.max_workers is not None and config.max_workers > _MAX_PROCESSES:
            raise ValueError(
                f"{config.prefix}MAX_WORKERS must be at most {_MAX_PROCESSES} for a process pool, got"
                f" {config.max_workers!r}: each worker is a process of its own"
            )
        make_process_pool = functools.partial(_new_process_pool, config, workers)
        return _ProcessPool(make_process_pool, None, workers, app_reference)
    make_configured = functools.partial(_new_configured_executor, config)
    executor = make_configured()  # here, so that init_app reports what is wrong with it
    if isinstance(executor, concurrent.futures.ThreadPoolExecutor):
        return _ConfiguredThreadPool(make_configured, executor, workers)
    if isinstance(executor, concurrent.futures.ProcessPoolExecutor):
        return _ProcessPool(make_configured, executor, workers, app_reference)
    return _ConfiguredPool(make_configured, executor, workers, app_reference)


# The process pool's call queue holds one more than its workers, in a semaphore.
_MAX_PROCESSES = 2**31 - 2


def _new_process_pool(config: _Config, workers: int) -> concurrent.futures.Executor:
    options: dict[str, Any] = {"max_workers": workers}
    if config.mp_context is not None:
        import multiprocessing  # here: thread pools never need it, and it is slow to import

        options["mp_context"] = multiprocessing.get_context(config.mp_context)
    if config.max_tasks_per_child is not None:
        options["max_tasks_per_child"] = config.max_tasks_per_child
    return concurrent.futures.ProcessPoolExecutor(**options)


def _new_configured_executor(config: _Config) -> concurrent.futures.Executor:
    assert config.factory is not None
    options = {} if config.max_workers is None else {"max_workers": config.max_workers}
    try:
        executor = config.factory(**options)
    except Exception as error:
        raise ValueError(
            f"{config.prefix}TYPE={config.factory!r} failed to make an executor: {error!r}"
        ) from error
    if not isinstance(executor, concurrent.futures.Executor):
        raise ValueError(
            f"{config.prefix}TYPE={config.factory!r} returned {executor!r}, which is not a"
            " concurrent.futures.Executor"
        )
    return executor


# Stores: where stored futures are kept ---------------------------------------------------


class _MemoryStore:
    """Stored futures in this process's memory, by key: the default store.

    Adding past ``max_length`` drops the oldest finished future (oldest by when it
    was stored) without a scan: each stored future, when it finishes, queues its
    key, and the queue feeds a heap ordered by age. Only when none has finished
    does the oldest of all go. Futures are watched this way from when the store
    is half full, so that a store that never fills pays nothing for it.
    """

    shared = False
    #: True in a process forked from the one that made this store, until the first
    #: add there is warned about: what the parent stored is not shared with it.
    forked = False

    def __init__(self) -> None:
        # Ordered, so that the oldest key is found at once (1.0's was ordered too).
        self.futures: collections.OrderedDict[Hashable, concurrent.futures.Future[Any]] = (
            collections.OrderedDict()
        )
        # Finished futures as (age, key, future): appended by their done callbacks,
        # without the lock (a deque's append is atomic), and heaped by add().
        self._finished_lately: collections.deque[tuple[int, Hashable, Any]] = collections.deque()
        self._finished: list[tuple[int, Hashable, Any]] = []
        # How many keys hold each future, so that ``future in collection`` is a
        # dictionary lookup rather than a scan of every value.
        self._key_counts: dict[concurrent.futures.Future[Any], int] = {}
        self._ages = itertools.count()
        self._watching = False
        self._lock = threading.Lock()

    def add(self, key: Hashable, future: concurrent.futures.Future[Any], max_length: int) -> list[Hashable]:
        """Stores ``future`` under ``key``; returns the keys of the unfinished
        futures it had to drop to stay within ``max_length`` (0: no limit)."""
        with self._lock:
            if key in self.futures:
                raise ValueError(
                    f"future key {key!r} is already in use: pop() it first, or choose another key"
                )
            self.futures[key] = future
            self._key_counts[future] = self._key_counts.get(future, 0) + 1
            if self._watching:
                self._watch(key, future)
            elif max_length and 2 * len(self.futures) >= max_length:
                self._watching = True  # from now on; and the futures stored so far too
                for stored_key, stored in self.futures.items():
                    self._watch(stored_key, stored)
            if self._finished_lately:
                self._heap_finished()
            return self._drop_over(max_length, key) if 0 < max_length < len(self.futures) else []

    def _watch(self, key: Hashable, future: concurrent.futures.Future[Any]) -> None:
        """Has ``future`` queue its key when it finishes (at once if it has)."""
        age, finished_lately = next(self._ages), self._finished_lately

        # The callback takes the future as its argument rather than holding it, which
        # would make a cycle (future, its callbacks, this callback) that only the
        # cyclic garbage collector could free. It takes no lock: a deque's append is
        # atomic, and a future already done calls back at once, here.
        def when_done(done: Any) -> None:
            finished_lately.append((age, key, done))

        if isinstance(future, concurrent.futures.Future):
            concurrent.futures.Future.add_done_callback(future, when_done)  # needs no app context
        else:
            future.add_done_callback(when_done)

    def get(self, key: Hashable) -> concurrent.futures.Future[Any] | None:
        try:
            return self.futures.get(key)
        except TypeError:  # not hashable, so not a key
            return None

    def pop(self, key: Hashable) -> concurrent.futures.Future[Any] | None:
        with self._lock:
            return self._remove(key) if key in self.futures else None

    def discard(self, key: Hashable, future: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            if self.futures.get(key) is future:
                self._remove(key)

    def keys(self) -> list[Hashable]:
        with self._lock:
            return list(self.futures)

    def contains(self, future_or_key: object) -> bool:
        try:
            return future_or_key in self._key_counts or future_or_key in self.futures
        except TypeError:  # not hashable: neither a future nor a key
            return False

    def __len__(self) -> int:
        return len(self.futures)

    def after_fork(self) -> None:
        self._lock = threading.Lock()
        self.forked = True

    def _drop_over(self, max_length: int, newest: Hashable) -> list[Hashable]:
        """Called with the lock held."""
        dropped_unfinished = []
        while len(self.futures) > max_length:
            key = self._oldest_finished(newest)
            if key is None:
                key = next(iter(self.futures))
                dropped_unfinished.append(key)
            self._remove(key)
        return dropped_unfinished

    def _heap_finished(self) -> None:
        """Called with the lock held."""
        finished, lately = self._finished, self._finished_lately
        while lately:
            heapq.heappush(finished, lately.popleft())
        # Popped keys leave entries behind; sweep them once they outnumber the rest.
        if len(finished) > 2 * len(self.futures) + 64:
            finished[:] = [entry for entry in finished if self._is_stored(entry)]
            heapq.heapify(finished)

    def _oldest_finished(self, newest: Hashable) -> Hashable | None:
        finished = self._finished
        while finished and not self._is_stored(finished[0]):
            heapq.heappop(finished)
        if not finished or finished[0][1] == newest:  # the one being added stays
            return None
        return heapq.heappop(finished)[1]

    def _is_stored(self, entry: tuple[int, Hashable, Any]) -> bool:
        return self.futures.get(entry[1]) is entry[2]

    def _remove(self, key: Hashable) -> concurrent.futures.Future[Any]:
        future = self.futures.pop(key)
        count = self._key_counts[future] - 1
        if count:
            self._key_counts[future] = count
        else:
            del self._key_counts[future]
        return future


class _WarningLimiter:
    """Logs the first of a run of like warnings, then at most one a minute with a
    count of those held back: a flood of one event must not flood the log."""

    interval = 60.0

    def __init__(self) -> None:
        self._quiet_until = 0.0
        self._held_back = 0
        self._lock = threading.Lock()

    def warn(self, logger: logging.Logger, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._quiet_until:
                self._held_back += 1
                return
            held_back, self._held_back = self._held_back, 0
            self._quiet_until = now + self.interval
        if held_back:
            message += " (%d more like this since the last such warning)"
            args += (held_back,)
        logger.warning(message, *args)


class _SharedStore:
    """Stored futures that every process naming the same store shares
    (``EXECUTOR_FUTURES_STORE``); the backend keeps them (:class:`FuturesStore`).

    A task still runs in the process that accepted it. That process writes each
    change of the task's state to the store as it happens (through the task's
    :class:`_Entry`), and any process reads the task from there, as a
    :class:`_StoredFuture`. What travels is pickled and signed with the app's
    ``SECRET_KEY``, and nothing whose signature fails is unpickled. The accepting
    process keeps its own futures too, so that it has a result that could not be
    pickled, and returns the future itself when it pops the key."""

    shared = True
    forked = False  # every process sees the same futures: nothing to warn about

    def __init__(self, backend: FuturesStore, signer: _Signer, logger: logging.Logger) -> None:
        self.backend = backend
        self.signer = signer
        self.logger = logger
        # Futures of the tasks this process accepted, by entry id, oldest first.
        self._local: dict[Any, concurrent.futures.Future[Any]] = {}
        # Entries of other processes' tasks that this one popped, by id, the latest few: a
        # future got by key before the pop reads its outcome here once the store deleted it
        # (1.0's get, pop, then result(), as Flask-Shell2HTTP does).
        self._popped: dict[Any, StoredTask] = {}
        self._unfinished = 0
        self._lock = threading.Lock()
        self._heartbeat: threading.Thread | None = None
        self.store_warnings = _WarningLimiter()
        #: What 1.0's ``futures._futures.get(key)`` reads.
        self.futures = _StoredMapping(self)

    def add(self, key: Hashable, future: concurrent.futures.Future[Any], max_length: int) -> list[Hashable]:
        claimed = self.backend.claim(_encode_key(key), _this_process.token, max_length)
        if claimed is None:
            raise ValueError(
                f"future key {key!r} is already in use, in this process or another: pop() it first,"
                " or choose another key"
            )
        entry_id, dropped = claimed
        entry = _Entry(self, entry_id, key)
        with self._lock:
            self._local[entry_id] = future
            self._unfinished += 1
            # Finished local futures beyond max_length go, as the store drops them too.
            while max_length and len(self._local) > max_length:
                oldest = next(iter(self._local))
                if not self._local[oldest].done():
                    break
                del self._local[oldest]
            if self._heartbeat is None:
                self._heartbeat = threading.Thread(
                    target=self._beat, name="flask_executor_heartbeat", daemon=True
                )
                self._heartbeat.start()
        if isinstance(future, TaskFuture) and future._entry is None:
            future._entry = entry
            if future.done():  # finished before it knew of its entry; finish() runs once
                entry.finish(future)
        else:
            # Any other future, or one stored under another key too: told when it is done,
            # or now if it already is.
            concurrent.futures.Future.add_done_callback(future, entry.finish)
        return [_decode_key(key) for key in dropped]

    def get(self, key: Hashable) -> concurrent.futures.Future[Any] | _StoredFuture | None:
        record = self._logged(self.backend.read, _encode_key(key)) if _is_store_key(key) else None
        if record is None:
            return None
        # A task accepted here answers through its own future, which a pop() leaves working
        # (1.0's users get a future by key, pop the key, then wait: Flask-Shell2HTTP does).
        with self._lock:
            local = self._local.get(record.id)
        # ...while it agrees with the store: not when another process cancelled the task, or
        # took it for lost, before this process's worker reached it.
        if local is not None and (local.done() or record.state in _UNFINISHED):
            return local
        return _StoredFuture(self, record)

    def pop(self, key: Hashable) -> Any:
        record = self._logged(self.backend.pop, _encode_key(key)) if _is_store_key(key) else None
        if record is None:
            return None
        with self._lock:
            local = self._local.pop(record.id, None)
        if local is None:
            with self._lock:
                self._popped[record.id] = record
                while len(self._popped) > _POPPED_REMEMBERED:
                    del self._popped[next(iter(self._popped))]
            return _StoredFuture(self, record, popped=True)
        if record.state == "CANCELLED":  # by another process, maybe before this one's worker saw it
            local.cancel()
        if _kept_when_popped(record):  # kept for its popper, or its owner: both are this process
            self.backend.delete(record.id)
        return local

    def discard(self, key: Hashable, future: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            entry_ids = [entry_id for entry_id, local in self._local.items() if local is future]
            for entry_id in entry_ids:
                del self._local[entry_id]
                self._unfinished -= 1
        for entry_id in entry_ids:
            self.backend.delete(entry_id)

    def keys(self) -> list[Hashable]:
        stored = self.backend.keys()
        return [_decode_key(key) for key in stored]

    def contains(self, future_or_key: object) -> bool:
        if isinstance(future_or_key, concurrent.futures.Future):
            with self._lock:
                return any(local is future_or_key for local in self._local.values())
        return _is_store_key(future_or_key) and self.backend.read(_encode_key(future_or_key)) is not None

    def __len__(self) -> int:
        return self.backend.count()

    def after_fork(self) -> None:
        # The parent's tasks do not run here, and its heartbeat thread is gone.
        self._local = {}
        self._popped = {}
        self._unfinished = 0
        self._lock = threading.Lock()
        self._heartbeat = None
        self.backend.after_fork()

    def _logged(self, operation: Callable[[str], T], key: str) -> T:
        try:
            return operation(key)
        except _ForeignEntry as error:
            self.logger.error("%s", error)
            raise

    def local_future(self, entry_id: Any) -> concurrent.futures.Future[Any] | None:
        return self._local.get(entry_id)

    def popped_here(self, entry_id: Any) -> StoredTask | None:
        """The entry as this process popped it, if it did so lately."""
        return self._popped.get(entry_id)

    def finished_one(self) -> None:
        with self._lock:
            self._unfinished -= 1

    def _beat(self) -> None:
        # Tells readers in other processes that this one is alive while it has
        # unfinished tasks; see TaskLost.
        beating_for = None
        while True:
            time.sleep(_HEARTBEAT_SECONDS)
            try:
                if self._unfinished > 0:
                    beating_for = _this_process.token
                    self.backend.beat(beating_for, alive=True)
                elif beating_for is not None:
                    self.backend.beat(beating_for, alive=False)
                    beating_for = None
            except Exception as error:  # an outage: say so once a minute, not once a second
                self.store_warnings.warn(
                    self.logger, "Flask-Executor could not write its heartbeat to the store: %s", error
                )


_HEARTBEAT_SECONDS = 1.0
_POPPED_REMEMBERED = 256
# A process whose heartbeat is older than this is taken for dead, its tasks for lost.
_LOST_AFTER_SECONDS = 5.0
_UNFINISHED = ("PENDING", "RUNNING")


class _Entry:
    """The store's record of one task this process accepted: the task's future
    reports each change of state to it, and it writes the change to the store."""

    __slots__ = ("finished", "id", "key", "last_progress", "store")

    def __init__(self, store: _SharedStore, entry_id: Any, key: Hashable) -> None:
        self.store = store
        self.id = entry_id
        self.key = key
        self.last_progress = 0.0
        self.finished = False

    def start(self) -> bool:
        """Whether the task may run: not when another process cancelled it (or took it
        for lost). A task whose entry is gone runs untracked, as a dropped future's task
        does in this process's own memory store: popped here, or dropped to stay within
        max_length."""
        store = self.store
        try:
            if store.backend.transition(self.id, _this_process.token, ("PENDING",), "RUNNING"):
                return True
            record = store.backend.read_entry(self.id)
            if record is not None and record.state == "CANCELLED" and record.outcome is None:
                self._saw_cancel()
        except Exception:  # not only StoreError: a store the user passed may raise anything
            store.logger.exception(
                "Task %r runs, but the store could not be told it started: readers in other"
                " processes may see it waiting, and then lost",
                self.key,
            )
            return True
        return record is None or record.state == "RUNNING"

    def _saw_cancel(self) -> None:
        # Cancelled by another process: an outcome says this one saw it, so that a pop
        # deletes the entry. Popped already, the entry waited for this one, and goes
        # (its popper read it cancelled, or cancelled it).
        backend, blob = self.store.backend, self.store.signer.cancelled(self.id)
        backend.transition(self.id, _this_process.token, ("CANCELLED",), None, outcome=blob)
        record = backend.read_entry(self.id)
        if record is not None and record.key is None:
            backend.delete(self.id)

    def progress(self, progress: Progress) -> None:
        # Written at most every 50 ms: a task may report on every row of a big file.
        now = time.monotonic()
        if now - self.last_progress >= 0.05:
            self.last_progress = now
            blob = self.store.signer.dumps("progress", progress, self.id)
            try:
                self.store.backend.transition(self.id, _this_process.token, _UNFINISHED, None, progress=blob)
            except Exception:
                self.store.store_warnings.warn(
                    self.store.logger, "The progress of task %r could not be written to the store", self.key
                )

    def finish(self, future: concurrent.futures.Future[Any], outcome: tuple[str, Any] | None = None) -> None:
        """Writes the task's end to the store: ``outcome`` when given (the future is not
        done yet), else what the done future holds."""
        store = self.store
        with store._lock:  # cancel() of a cancelled future calls this again, from any thread
            if self.finished:
                return
            self.finished = True
        store.finished_one()
        if outcome is None and future.cancelled():
            state, blob = "CANCELLED", store.signer.cancelled(self.id)
        else:
            state, blob = "FINISHED", store.signer.outcome(self.id, outcome or _outcome_of(future))
        progress = getattr(future, "progress", None)
        try:
            written = store.backend.transition(
                self.id,
                _this_process.token,
                _UNFINISHED,
                state,
                outcome=blob,
                progress=None if progress is None else store.signer.dumps("progress", progress, self.id),
            )
            record = None if written else store.backend.read_entry(self.id)
            if record is not None and record.state == "CANCELLED" and record.outcome is None:
                self._saw_cancel()  # cancelled from another process, then here before it started
        except Exception:
            store.logger.exception(
                "The end of task %r could not be written to the store: readers in other processes"
                " will see it lost; this process has the outcome",
                self.key,
            )
            return
        # Not written: popped and dropped (no record), cancelled from another process (nothing
        # lost), or taken for lost by a reader while this process was slow to beat.
        if record is not None and not (state == "CANCELLED" and record.state == "CANCELLED"):
            store.logger.warning(
                "Task %r finished after another process had reported it lost (its heartbeat stopped"
                " for %s s): readers in other processes see TaskLost, this process has the outcome",
                self.key,
                _LOST_AFTER_SECONDS,
            )


class _StoredFuture:
    """A stored task as any process sees it, read from the store at each call. It
    answers as a future does (``done()``, ``result(timeout)``...), but takes no
    done callbacks: they run in the process that accepted the task."""

    def __init__(self, store: _SharedStore, record: StoredTask, popped: bool = False) -> None:
        self._store = store
        self._record = record
        self._fresh = True  # the record was just read: the first question needs no read
        self._popped = popped
        self._dropped = False

    def done(self) -> bool:
        return self._read().state not in _UNFINISHED

    def running(self) -> bool:
        return self._read().state == "RUNNING"

    def cancelled(self) -> bool:
        return self._read().state == "CANCELLED"

    @property
    def _state(self) -> str:
        return self._read().state

    @property
    def progress(self) -> Progress | None:
        record = self._read()
        return (
            None if record.progress is None else self._store.signer.loads("progress", record.progress, self)
        )

    def cancel(self) -> bool:
        local = self._store.local_future(self._record.id)
        if local is not None:
            return local.cancel()
        # The entry read, while it is under the key it was read with: the key may name
        # another task by now, and a popped entry is its popper's.
        record = self._record
        if self._store.backend.cancel(record.key, record.id):
            self._record, self._fresh = record._replace(state="CANCELLED"), True
            return True
        return self._read().state == "CANCELLED"

    def result(self, timeout: float | None = None) -> Any:
        kind, value = self._outcome(timeout)
        if kind == "result":
            return value
        raise value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        kind, value = self._outcome(timeout)
        if kind == "result":
            return None
        if isinstance(value, concurrent.futures.CancelledError):
            raise value
        return cast(BaseException, value)

    def add_done_callback(self, fn: Callable[..., object]) -> None:
        raise RuntimeError(
            f"task {self.key!r} was accepted by another process, which runs its done callbacks: add"
            " them with executor.add_default_done_callback(), or to the future submit_stored() returns"
        )

    @property
    def key(self) -> Hashable | None:
        return None if self._record.key is None else _decode_key(self._record.key)

    def __repr__(self) -> str:
        return f"<StoredFuture {self.key!r} state={self._record.state}>"

    def _read(self) -> StoredTask:
        if self._fresh:
            self._fresh = False
        elif self._record.state in _UNFINISHED:
            record = self._store.backend.read_entry(self._record.id)
            if record is None:
                popped = self._store.popped_here(self._record.id)
                if popped is not None and popped.state not in _UNFINISHED:
                    record = popped  # popped here when finished, and deleted: this process has it
                else:  # gone: for this reader the task is over, its outcome unknown
                    self._dropped = True
                    record = self._record._replace(state="FINISHED", outcome=None)
            self._record = record
        record = self._record
        if record.state in _UNFINISHED and not record.owner_alive and record.owner != _this_process.token:
            lost_task = TaskLost(
                f"task {self.key!r} was lost: the process running it stopped (killed, out of memory, or a"
                f" deploy that did not wait) before it finished; nothing retries it"
            )
            lost = self._store.signer.dumps("outcome", ("exception", lost_task), record.id)
            self._store.backend.transition(record.id, record.owner, _UNFINISHED, "FINISHED", outcome=lost)
            self._record = self._store.backend.read_entry(record.id) or record._replace(
                state="FINISHED", outcome=lost
            )
        return self._record

    def _outcome(self, timeout: float | None) -> tuple[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.001
        record = self._read()
        while record.state in _UNFINISHED:
            local = self._store.local_future(record.id)
            if local is not None:  # accepted here: wait for it here
                local.exception(None if deadline is None else max(0.0, deadline - time.monotonic()))
            elif deadline is not None and time.monotonic() >= deadline:
                raise concurrent.futures.TimeoutError(f"task {self.key!r} did not finish within {timeout} s")
            else:
                time.sleep(delay if deadline is None else min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 0.05)
            record = self._read()
        if self._dropped:
            raise StoreError(
                f"task {self.key!r} left the store before it finished (popped by another reader, evicted"
                " to stay within EXECUTOR_FUTURES_MAX_LENGTH, or expired): only the process that ran it"
                " has its outcome"
            )
        local = self._store.local_future(record.id)
        outcome: tuple[str, Any]
        if record.state == "CANCELLED":
            outcome = ("exception", concurrent.futures.CancelledError(f"task {self.key!r} was cancelled"))
        elif local is not None and local.done() and not local.cancelled():  # the real value, pickled or not
            exception = local.exception()
            outcome = ("result", local.result()) if exception is None else ("exception", exception)
        else:
            if record.outcome is None:  # read by key, which may leave the outcome out
                record = self._store.backend.read_entry(record.id) or record
            outcome = self._store.signer.loads("outcome", cast(bytes, record.outcome), self)
        popped = self._popped or self._store.popped_here(record.id) is not None
        if popped and record.key is None and not _kept_when_popped(record):
            self._store.backend.delete(record.id)  # kept for this process, which has it now
        if outcome[0] == "unpicklable":
            raise StoreError(
                f"the outcome of task {self.key!r} could not be stored ({outcome[1]}): only the process"
                " that ran it has it"
            )
        return outcome


class _StoredMapping:
    """1.0's ``futures._futures``, a mapping of keys to futures, over a shared store."""

    def __init__(self, store: _SharedStore) -> None:
        self._store = store

    def get(self, key: Hashable, default: Any = None) -> Any:
        found = self._store.get(key)
        return default if found is None else found

    def __getitem__(self, key: Hashable) -> concurrent.futures.Future[Any] | _StoredFuture:
        found = self._store.get(key)
        if found is None:
            raise KeyError(key)
        return found

    def __contains__(self, key: object) -> bool:
        return self._store.contains(key)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._store.keys())

    def __len__(self) -> int:
        return len(self._store)

    def keys(self) -> list[Hashable]:
        return self._store.keys()


def _is_store_key(key: object) -> bool:
    return isinstance(key, str) or (isinstance(key, int) and not isinstance(key, bool))


def _encode_key(key: Hashable) -> str:
    if isinstance(key, str):
        if not key.isascii():
            try:
                key.encode()
            except UnicodeEncodeError:
                raise ValueError(
                    f"future key {key!r} cannot go to a shared store: it is not valid text (a lone"
                    " surrogate, as from JSON with a broken escape); use a key that encodes as UTF-8"
                ) from None
        return "s:" + key
    if isinstance(key, int) and not isinstance(key, bool):
        return f"i:{key}"
    raise TypeError(f"future keys of a shared store are strings or whole numbers, got {key!r}")


def _decode_key(key: str) -> Hashable:
    return key[2:] if key.startswith("s:") else int(key[2:])


class _Signer:
    """Pickles what goes into a shared store and signs it with the app's
    ``SECRET_KEY``; unpickles what comes out only if its signature holds, because
    unpickling runs code, and a store that others can write must not let them run
    it in the app."""

    def __init__(self, secret_key: str | bytes, namespace: str, logger: logging.Logger) -> None:
        secret = secret_key.encode() if isinstance(secret_key, str) else secret_key
        self._key = hashlib.sha256(b"flask-executor store\0" + secret).digest()
        self._namespace = namespace.encode() + b"\0"
        self._logger = logger

    def dumps(self, field: str, value: object, entry_id: Any) -> bytes:
        payload = pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
        return self._mac(field, entry_id, payload) + payload

    def cancelled(self, entry_id: Any) -> bytes:
        """The outcome of a cancelled task, written by the process that accepted it."""
        return self.dumps("outcome", ("exception", concurrent.futures.CancelledError()), entry_id)

    def outcome(self, entry_id: Any, outcome: tuple[str, Any]) -> bytes:
        try:
            return self.dumps("outcome", outcome, entry_id)
        except Exception as error:
            return self.dumps("outcome", ("unpicklable", f"{type(error).__name__}: {error}"), entry_id)

    def loads(self, field: str, blob: bytes, reader: _StoredFuture) -> Any:
        if not isinstance(blob, bytes) or len(blob) < 32:
            blob = bytes(32)  # missing or cut short: fails the check below, as a forged one does
        mac, payload = blob[:32], blob[32:]
        if not hmac.compare_digest(mac, self._mac(field, reader._record.id, payload)):
            self._logger.error(
                "The stored %s of task %r failed its signature check and was not unpickled: it was"
                " written by something other than this app (or with another SECRET_KEY)",
                field,
                reader.key,
            )
            raise StoreError(
                f"the stored {field} of task {reader.key!r} failed its signature check, so it was not"
                " read: something other than an app with this SECRET_KEY wrote it"
            )
        return pickle.loads(payload)

    def _mac(self, field: str, entry_id: Any, payload: bytes) -> bytes:
        # The entry's id is signed too: a blob moved to another entry fails the check.
        signed = self._namespace + field.encode() + b"\0" + str(entry_id).encode() + b"\0" + payload
        return hmac.new(self._key, signed, hashlib.sha256).digest()


def _kept_when_popped(record: StoredTask) -> bool:
    """Whether a popped entry is kept, without its key: unfinished, for the popper to
    read; cancelled without an outcome, for its owner, which has not seen the cancel."""
    return record.state in _UNFINISHED or (record.state == "CANCELLED" and record.outcome is None)


def _outcome_of(future: concurrent.futures.Future[Any]) -> tuple[str, Any]:
    exception = future.exception()
    return ("result", future.result()) if exception is None else ("exception", exception)


class _ForeignEntry(StoreError):
    """An entry of a shared store that Flask-Executor did not write: it lacks fields."""


class _OverLimit(StoreError):
    """An insert that the SQLite store's trigger refused: the namespace is full of unfinished entries."""


def _inserted_id(write: _QueuedWrite) -> Any:
    """The id of the row an INSERT OR IGNORE inserted, or None when it inserted none:
    sqlite3's ``lastrowid`` then still holds the id of the last insert on the connection
    that ran it."""
    return write.lastrowid if write.rowcount == 1 else None


class _QueuedWrite:
    """One statement that a thread asked ``_SQLiteStore._write`` to run, and what it did."""

    __slots__ = ("done", "error", "lastrowid", "parameters", "rowcount", "statement")

    def __init__(self, statement: str, parameters: tuple[Any, ...]) -> None:
        self.statement = statement
        self.parameters = parameters
        self.done = False
        self.rowcount = -1
        self.lastrowid: Any = None
        self.error: BaseException | None = None


class _ForkAwareBackend:
    """A store backend whose connections and locks must not cross a fork: it makes
    them again in a new process (``after_fork``), which it notices by its pid."""

    _pid: int

    def after_fork(self) -> None:
        raise NotImplementedError

    def _check_fork(self) -> None:
        # A fork that bypassed Python's fork hook (uWSGI forks in C): everything starts over
        # once, in the first thread that notices, before any queue, lock or connection of
        # the parent is used here.
        if self._pid != os.getpid():
            _this_process.start_over()
            if self._pid != os.getpid():  # a store that no live executor holds
                self.after_fork()


class _SQLiteStore(_ForkAwareBackend):
    """``EXECUTOR_FUTURES_STORE = "/path/to/file"``: a SQLite database in WAL mode,
    which every process of the machine that names the file shares. Each thread
    has a connection of its own; a write takes one short transaction, and a read
    none (WAL readers never wait for the writer)."""

    application_id = 0x46455846  # "FEXF", so that a file of another program is told apart

    def __init__(self, path: str, namespace: str, key: str, ttl: float | None) -> None:
        import sqlite3  # here: most apps never configure a store

        self._sqlite3 = sqlite3
        self._path = path
        self._namespace = namespace
        self._key = key
        self._ttl = ttl
        self._connections = threading.local()
        # Threads of one process take turns to write here, so that only other
        # processes ever find the database locked; _queued holds the writes that
        # wait for the next turn (see _write).
        self._write_lock = threading.Lock()
        self._queue_lock = threading.Lock()
        self._queued: list[_QueuedWrite] = []
        self._beaten: dict[str, float] = {}  # when this process last marked an owner alive
        self._swept = 0.0  # when it last removed entries older than the TTL
        self._recorded_limit: int | None = None  # the max_length this object wrote for the trigger
        self._pid = os.getpid()
        self._check_and_create()

    # The FuturesStore interface.

    def claim(self, key: str, owner: str, max_length: int) -> tuple[Any, list[str]] | None:
        # The common path is one statement, a transaction of its own (or of a group, see
        # _write). The rare one, a transaction of several: the first claim of this object,
        # a new max_length, or a namespace whose entries are all unfinished and too many.
        now = time.time()
        # Alive first: a reader must never see the entry before a fresh row of its owner.
        if self._beaten.get(owner, 0.0) < now - _HEARTBEAT_SECONDS:
            self.beat(owner, alive=True)
        if max_length != self._recorded_limit:
            return self._claim_making_room(key, owner, max_length, now)
        try:
            entry_id = _inserted_id(self._write(_SQLITE_INSERT, (self._namespace, key, owner)))
            if not entry_id and self._ttl is not None:  # the key may be held by an expired entry
                expired = "DELETE FROM tasks WHERE namespace = ? AND key = ? AND finished < ?"
                self._write(expired, (self._namespace, key, now - self._ttl))
                entry_id = _inserted_id(self._write(_SQLITE_INSERT, (self._namespace, key, owner)))
        except _OverLimit:
            return self._claim_making_room(key, owner, max_length, now)
        if not entry_id:
            return None
        if self._ttl is not None and self._swept < now - _HEARTBEAT_SECONDS:
            self._swept = now
            self._write(
                "DELETE FROM tasks WHERE namespace = ? AND finished < ?", (self._namespace, now - self._ttl)
            )
        return entry_id, []

    def transition(
        self,
        entry_id: Any,
        owner: str,
        from_states: tuple[str, ...],
        to_state: str | None,
        outcome: bytes | None = None,
        progress: bytes | None = None,
    ) -> bool:
        finished = time.time() if to_state in ("FINISHED", "CANCELLED") else None
        placeholders = ", ".join("?" * len(from_states))
        update = (
            "UPDATE tasks SET state = coalesce(?, state), outcome = coalesce(?, outcome),"
            " progress = coalesce(?, progress), finished = coalesce(?, finished)"
            f" WHERE id = ? AND owner = ? AND state IN ({placeholders})"
        )
        parameters = (to_state, outcome, progress, finished, entry_id, owner, *from_states)
        return bool(self._write(update, parameters).rowcount == 1)

    def cancel(self, key: str | None, entry_id: Any) -> bool:
        update = (
            "UPDATE tasks SET state = 'CANCELLED', finished = ?"
            " WHERE id = ? AND key IS ? AND state = 'PENDING'"
        )
        return self._write(update, (time.time(), entry_id, key)).rowcount == 1

    def read(self, key: str) -> StoredTask | None:
        return self._read("t.namespace = ? AND t.key = ?", (self._namespace, key))

    def read_entry(self, entry_id: Any) -> StoredTask | None:
        return self._read("t.id = ?", (entry_id,))

    def pop(self, key: str) -> StoredTask | None:
        with self._writing() as db:
            record = self._read("t.namespace = ? AND t.key = ?", (self._namespace, key), db)
            if record is not None:
                if _kept_when_popped(record):
                    db.execute("UPDATE tasks SET key = NULL WHERE id = ?", (record.id,))
                else:
                    db.execute("DELETE FROM tasks WHERE id = ?", (record.id,))
            return record

    def delete(self, entry_id: Any) -> None:
        self._write("DELETE FROM tasks WHERE id = ?", (entry_id,))

    def keys(self) -> list[str]:
        query = (
            "SELECT key FROM tasks WHERE namespace = ? AND key IS NOT NULL"
            " AND (finished IS NULL OR finished >= ?) ORDER BY id"
        )
        parameters = (self._namespace, self._expired_before())
        rows = self._patiently(lambda: self._connection().execute(query, parameters).fetchall())
        return [key for (key,) in rows]

    def count(self) -> int:
        query = (
            "SELECT count(*) FROM tasks WHERE namespace = ? AND key IS NOT NULL"
            " AND (finished IS NULL OR finished >= ?)"
        )
        parameters = (self._namespace, self._expired_before())
        return int(self._patiently(lambda: self._connection().execute(query, parameters).fetchone()[0]))

    def _expired_before(self) -> float:
        return float("-inf") if self._ttl is None else time.time() - self._ttl

    def beat(self, owner: str, alive: bool) -> None:
        now = time.time()
        if alive:
            upsert = "INSERT INTO owners VALUES (?, ?) ON CONFLICT (owner) DO UPDATE SET seen = excluded.seen"
            self._write(upsert, (owner, now))
            self._beaten[owner] = now
        else:  # no unfinished task left: stop beating, and forget the long dead. The row of
            # this owner stays (it ages): deleting it would race a claim made meanwhile,
            # whose task readers would take for lost, as no row counts as a dead owner.
            self._write("DELETE FROM owners WHERE seen < ?", (now - 86400,))

    def after_fork(self) -> None:
        # A connection must not cross a fork; closing the parent's here could even
        # delete its WAL file, so they are left alone, and new ones made.
        _inherited.append(self._connections)
        self._connections = threading.local()
        self._write_lock = threading.Lock()
        self._queue_lock = threading.Lock()
        self._queued = []
        self._pid = os.getpid()

    # The rest.

    def _read(self, where: str, parameters: tuple[Any, ...], db: Any = None) -> StoredTask | None:
        query = (
            "SELECT t.id, t.key, t.state, t.owner, t.outcome, t.progress, o.seen, t.finished FROM tasks t"
            f" LEFT JOIN owners o ON o.owner = t.owner WHERE {where}"
        )
        if db is not None:
            row = db.execute(query, parameters).fetchone()
        else:
            row = self._patiently(lambda: self._connection().execute(query, parameters).fetchone())
        if row is None:
            return None
        entry_id, key, state, owner, outcome, progress, seen, finished = row
        if self._ttl is not None and finished is not None and finished < time.time() - self._ttl:
            return None
        alive = seen is not None and seen > time.time() - _LOST_AFTER_SECONDS
        return StoredTask(entry_id, key, state, owner, alive, outcome, progress)

    def _claim_making_room(
        self, key: str, owner: str, max_length: int, now: float
    ) -> tuple[Any, list[str]] | None:
        """The claim in one transaction: records ``max_length`` for the insert trigger, and
        when the key is free makes room under it and inserts the entry."""
        namespace, claimed = self._namespace, None
        with self._writing() as db:
            db.execute(
                "INSERT INTO namespaces (namespace, max_length) VALUES (?, ?)"
                " ON CONFLICT (namespace) DO UPDATE SET max_length = excluded.max_length",
                (namespace, max_length),
            )
            if self._ttl is not None:
                expired = "DELETE FROM tasks WHERE namespace = ? AND key = ? AND finished < ?"
                db.execute(expired, (namespace, key, now - self._ttl))
            in_use = db.execute("SELECT 1 FROM tasks WHERE namespace = ? AND key = ?", (namespace, key))
            if in_use.fetchone() is None:
                dropped = self._make_room(db, max_length - 1) if max_length else []
                cursor = db.execute(_SQLITE_INSERT, (namespace, key, owner))
                if cursor.rowcount != 1:  # its id was taken: a process of an earlier build writes here
                    raise StoreError(f"the store {self._path} ({self._key}) could not insert {key!r}")
                claimed = cursor.lastrowid, dropped
        self._recorded_limit = max_length  # committed
        return claimed

    def _make_room(self, db: Any, limit: int) -> list[str]:
        """Drops the entries beyond ``limit``, finished ones first, oldest first;
        returns the keys of the unfinished ones dropped."""
        count = "SELECT tasks FROM namespaces WHERE namespace = ?"
        excess = db.execute(count, (self._namespace,)).fetchone()[0] - limit
        if excess <= 0:
            return []
        excess -= db.execute(
            "DELETE FROM tasks WHERE id IN (SELECT id FROM tasks WHERE namespace = ? AND finished IS NOT NULL"
            " ORDER BY id LIMIT ?)",
            (self._namespace, excess),
        ).rowcount
        if excess <= 0:
            return []
        oldest = db.execute(
            "SELECT id, key FROM tasks WHERE namespace = ? ORDER BY id LIMIT ?", (self._namespace, excess)
        ).fetchall()
        db.executemany("DELETE FROM tasks WHERE id = ?", [(entry_id,) for entry_id, _ in oldest])
        return [key for _, key in oldest if key is not None]

    def _connection(self) -> Any:
        self._check_fork()
        connection = getattr(self._connections, "connection", None)
        if connection is None:
            connection = self._connect()
            self._connections.connection = connection
        return connection

    def _connect(self) -> Any:
        # isolation_level=None: no implicit transactions, _writing() begins each one.
        # timeout=0: SQLite's own wait sleeps a millisecond or more at a time, so
        # _patiently() retries instead, in steps of a fraction of one.
        try:
            connection = self._sqlite3.connect(self._path, timeout=0, isolation_level=None)
        except self._sqlite3.Error as error:  # the file went away, or its directory did
            raise self._store_error(error) from error
        # Durable enough in WAL mode, and far faster; the WAL file truncated back after a reset.
        self._patiently(lambda: connection.execute("PRAGMA synchronous = NORMAL"))
        self._patiently(lambda: connection.execute(f"PRAGMA journal_size_limit = {_WAL_LIMIT}"))
        return connection

    def _write(self, statement: str, parameters: tuple[Any, ...]) -> _QueuedWrite:
        """Runs one statement, atomically. The writes that the threads of this process
        ask for meanwhile are committed together (a group commit): committing costs
        several times what a statement does, and under load the threads share it."""
        self._check_fork()
        write = _QueuedWrite(statement, parameters)
        with self._queue_lock:
            self._queued.append(write)
        try:
            with self._write_lock:
                if not write.done:  # else the thread that held the lock before ran it
                    self._commit_queued()
        except BaseException:
            # Interrupted while it waited (KeyboardInterrupt, a worker's SystemExit): a write
            # still queued must not run later, behind its caller's back.
            with self._queue_lock:
                if write in self._queued:
                    self._queued.remove(write)
            raise
        if write.error is not None:
            # A new exception for each thread: one raised in several would share a traceback.
            raise self._store_error(write.error) from write.error
        return write

    def _commit_queued(self) -> None:
        """Runs the queued writes, with _write_lock held: several in one transaction,
        one alone as a transaction of its own (no BEGIN and COMMIT to pay for). Each
        write ends done, with its result or its error."""
        writes: list[_QueuedWrite] = []
        db, committed = None, False
        try:
            with self._queue_lock:
                writes, self._queued = self._queued, []
            db = self._connection()
            grouped = len(writes) > 1
            if grouped:  # IMMEDIATE takes the write lock now, so no statement has to retry
                self._patiently(lambda: db.execute("BEGIN IMMEDIATE"))
            for write in writes:
                try:
                    cursor = self._patiently(functools.partial(db.execute, write.statement, write.parameters))
                    write.rowcount, write.lastrowid = cursor.rowcount, cursor.lastrowid
                except Exception as error:  # a write's own failure (a blob too big, a bad key)
                    write.error = error
                    # SQLite undid this statement alone, unless the error ended the transaction
                    # (a full disk, an I/O error): then no write of the group is left.
                    if grouped and not db.in_transaction:
                        raise
            if grouped:
                self._patiently(lambda: db.execute("COMMIT"))
            committed = True
        except BaseException as error:
            if db is not None and db.in_transaction:
                db.execute("ROLLBACK")
            if not committed:
                for write in writes:
                    write.error = write.error or error
            if not isinstance(error, Exception):
                raise  # an interruption (KeyboardInterrupt...): the other writers get a StoreError
        finally:
            for write in writes:
                write.done = True
        if db is not None:
            self._limit_wal(db)

    def _store_error(self, error: BaseException) -> StoreError:
        """The StoreError that a failure of SQLite (or of the store's code) becomes, for one
        thread to raise; an insert the trigger refused over max_length becomes _OverLimit."""
        if isinstance(error, self._sqlite3.IntegrityError) and _SQLITE_OVER_LIMIT in str(error):
            return _OverLimit(str(error))
        if isinstance(error, StoreError):
            return type(error)(str(error))
        return StoreError(f"the store {self._path} ({self._key}) failed: {error!r}")

    def _limit_wal(self, connection: Any) -> None:
        """Under steady writes from several processes some connection nearly always has a
        read open, so SQLite seldom restarts the WAL file and it grows: past _WAL_LIMIT
        (one stat() per write to see), a TRUNCATE checkpoint waits a moment and empties it."""
        try:
            if os.path.getsize(self._path + "-wal") <= _WAL_LIMIT:
                return
            connection.execute("PRAGMA busy_timeout = 200")
            try:
                connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            finally:
                connection.execute("PRAGMA busy_timeout = 0")
        except (OSError, self._sqlite3.Error):
            pass  # tried again at the next write

    @contextlib.contextmanager
    def _writing(self) -> Iterator[Any]:
        self._check_fork()
        with self._write_lock:
            db = self._connection()
            # IMMEDIATE takes the write lock now, so that the transaction never has to retry.
            self._patiently(lambda: db.execute("BEGIN IMMEDIATE"))
            try:
                yield db
                self._patiently(lambda: db.execute("COMMIT"))
            except BaseException:
                if db.in_transaction:  # else the connection would keep the file's write lock
                    db.execute("ROLLBACK")
                raise

    def _patiently(self, operation: Callable[[], T]) -> T:
        """Runs ``operation``, retrying while another process has the database
        locked, for at most _STORE_WAIT_SECONDS: a request never hangs on a store
        whose writer is stuck."""
        deadline = time.monotonic() + _STORE_WAIT_SECONDS
        delay = 0.0001
        while True:
            try:
                return operation()
            except self._sqlite3.OperationalError as error:
                if "locked" not in str(error) and "busy" not in str(error):
                    raise StoreError(f"the store {self._path} ({self._key}) failed: {error}") from error
                if time.monotonic() > deadline:
                    raise StoreError(
                        f"the store {self._path} ({self._key}) stayed locked for {_STORE_WAIT_SECONDS:.0f} s:"
                        " another process holds its write lock, and may be stuck"
                    ) from error
                time.sleep(delay)
                delay = min(delay * 2, 0.005)

    def _check_and_create(self) -> None:
        sqlite3 = self._sqlite3
        problem = _file_store_problem(self._path)
        if problem is not None:
            raise ValueError(f"{self._key}={self._path!r}: {problem}")
        if sqlite3.sqlite_version_info < (3, 24):
            raise ValueError(
                f"{self._key} needs SQLite 3.24 or later; this Python has {sqlite3.sqlite_version}"
            )
        if not os.path.exists(self._path):
            try:  # readable and writable by its owner only; SQLite gives its WAL files the same mode
                os.close(os.open(self._path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            except FileExistsError:
                pass  # another process made it just now
            except OSError as error:
                raise ValueError(f"{self._key}={self._path!r} cannot be created: {error}") from error
        try:
            db = sqlite3.connect(self._path, timeout=_STORE_WAIT_SECONDS, isolation_level=None)
            try:
                self._create_schema(db)
            finally:
                db.close()
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) and "busy" not in str(error):
                raise ValueError(f"{self._key}={self._path!r} cannot be opened: {error}") from error
            raise ValueError(
                f"{self._key}={self._path!r} stayed locked by another process for {_STORE_WAIT_SECONDS:.0f} s"
                " while this one set it up: that process may be stuck"
            ) from error
        except sqlite3.DatabaseError as error:
            raise ValueError(
                f"{self._key}={self._path!r} is not a usable store ({error}): it may be corrupt, or a file of"
                " another program; name a new file"
            ) from error

    def _create_schema(self, db: Any) -> None:
        (application_id,) = db.execute("PRAGMA application_id").fetchone()
        (tables,) = db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        if application_id != self.application_id and (application_id or tables):
            raise ValueError(
                f"{self._key}={self._path!r} is a SQLite database of another program: name a new file"
            )
        if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            raise ValueError(f"{self._key}={self._path!r} is corrupt: name a new file, or delete this one")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("BEGIN IMMEDIATE")
        db.execute(f"PRAGMA application_id = {self.application_id}")
        for statement in _SQLITE_SCHEMA:
            db.execute(statement)
        db.execute("COMMIT")


class _RedisStore(_ForkAwareBackend):
    """``EXECUTOR_FUTURES_STORE = "redis://host:port/db"`` (or ``rediss://``, with a
    password in the URL if need be): Redis, which every process of every machine
    that names it shares. Each change is one Lua script, so it is atomic and costs
    one round trip; so is a read, which is one plain command when it can be. A
    process shows it is alive with a key that expires."""

    def __init__(self, url: str, namespace: str, key: str, ttl: float | None) -> None:
        try:  # here: only apps that configure a Redis store need it
            redis = importlib.import_module("redis")
        except ImportError:
            raise ValueError(f"{key}={_without_password(url)!r} needs redis-py: pip install redis") from None
        self._prefix = f"flask_executor:{namespace}"
        self._ttl_argument = repr(float(ttl or 0))  # of most scripts, encoded once
        self._swept_at_reads = bool(ttl)
        # A status query reads its entry with one plain command when it can: a script
        # costs the server ten times what a plain command does. For that the store
        # remembers the entry id under each key it read lately (checked at every read:
        # an entry names its key while it holds it), and until when each owner's mark
        # is sure to exist (the owner of an unfinished task is alive while it does).
        self._ids: dict[str, Any] = {}
        self._alive_until: dict[bytes, float] = {}  # by owner, on time.monotonic()
        self._error = redis.RedisError
        self._reply_error = redis.ResponseError
        self._connection_error = redis.ConnectionError
        self._no_script = redis.exceptions.NoScriptError
        # The store sends its commands on connections of its own, not through redis-py's
        # client: the client's pool (locks, retries, metrics) costs 30 to 40 µs per command
        # in redis-py 8, a quarter of a round trip on loopback, and every claim and status
        # query would pay it.
        self._idle: list[Any] = []  # connected and in step with the server, the latest last
        self._pid = os.getpid()
        try:
            # Only the settings of redis-py's pool are used (the URL's TLS, password and
            # database): a connection that failed is dropped, and the pool would count it.
            settings = redis.ConnectionPool.from_url(url, socket_timeout=_STORE_WAIT_SECONDS)
            self._new_connection = functools.partial(settings.connection_class, **settings.connection_kwargs)
            for script in _REDIS_SCRIPTS.values():  # compiled by the server now, not at the first call
                self._send(("SCRIPT", "LOAD", script))
        except (redis.RedisError, ValueError) as error:
            raise ValueError(f"{key}={_without_password(url)!r} cannot be used: {error}") from error

    def claim(self, key: str, owner: str, max_length: int) -> tuple[Any, list[str]] | None:
        # The owner is marked alive at every claim: its mark may have vanished (a flush, a
        # restart of Redis, an idle spell), and a reader that finds none takes the task for
        # lost for good.
        claimed = self._run("claim", key, owner, max_length, self._ttl_argument)
        if not claimed:
            return None
        if isinstance(claimed, int):
            return claimed, []  # nothing dropped: the common reply, and the smaller one
        return int(claimed[0]), [dropped.decode() for dropped in claimed[1:]]

    def transition(
        self,
        entry_id: Any,
        owner: str,
        from_states: tuple[str, ...],
        to_state: str | None,
        outcome: bytes | None = None,
        progress: bytes | None = None,
    ) -> bool:
        arguments = (entry_id, owner, to_state or "", outcome or b"", progress or b"", *from_states)
        return bool(self._run("transition", *arguments))

    def cancel(self, key: str | None, entry_id: Any) -> bool:
        return bool(self._run("cancel", entry_id, key or ""))

    def read(self, key: str) -> StoredTask | None:
        entry_id = self._ids.get(key)
        if entry_id is not None and not self._swept_at_reads:  # with a TTL, only the script removes
            record = self._read_plainly(key, entry_id)  # expired entries
            if record is not None:
                return record
        asked = time.monotonic()
        record = self._record(self._run("read", self._ttl_argument, key, ""), asked)
        if record is None:
            self._ids.pop(key, None)
        else:
            _remember(self._ids, key, record.id)
        return record

    def read_entry(self, entry_id: Any) -> StoredTask | None:
        asked = time.monotonic()
        return self._record(self._run("read", self._ttl_argument, "", entry_id), asked)

    def pop(self, key: str) -> StoredTask | None:
        asked = time.monotonic()
        record = self._record(self._run("pop", self._ttl_argument, key), asked)
        self._ids.pop(key, None)
        return record

    def delete(self, entry_id: Any) -> None:
        self._run("delete", entry_id)

    def keys(self) -> list[str]:
        flat = self._run("keys", self._ttl_argument)
        pairs = zip(flat[::2], flat[1::2])
        try:
            return [key.decode() for key, _ in sorted(pairs, key=lambda pair: int(pair[1]))]
        except ValueError:
            raise _ForeignEntry(
                f"the Redis store's keys hold an id that is no number ({self._prefix}:keys)"
            ) from None

    def count(self) -> int:
        return int(self._run("count", self._ttl_argument))

    def beat(self, owner: str, alive: bool) -> None:
        # Never deleted, only left to expire: deleting would race a claim made meanwhile.
        if alive:
            self._call(("SET", "flask_executor:owner:" + owner, 1, "PX", int(_LOST_AFTER_SECONDS * 1000)))

    def after_fork(self) -> None:
        # A connection must not cross a fork: the parent's are kept, never collected
        # here (see _inherited), and new ones made.
        _inherited.append(self._idle)
        self._idle = []
        self._pid = os.getpid()

    def _run(self, script: str, *arguments: Any) -> Any:
        return self._call(("EVALSHA", _REDIS_DIGESTS[script], 1, self._prefix, *arguments), script)

    def _call(self, command: tuple[Any, ...], script: str | None = None) -> Any:
        """The reply to ``command``, which runs ``script`` if it is an EVALSHA."""
        try:
            try:
                return self._send(command)
            except self._no_script:  # Redis restarted, or its scripts were flushed: load it again
                self._send(("SCRIPT", "LOAD", _REDIS_SCRIPTS[cast(str, script)]))
                return self._send(command)
        except self._error as error:
            raise StoreError(f"the Redis store failed: {error}") from error

    def _send(self, command: tuple[Any, ...]) -> Any:
        """Sends one command and reads its reply, on an idle connection or a new one."""
        self._check_fork()
        try:
            connection = self._idle.pop()  # atomic: a connection serves one thread at a time
        except IndexError:
            connection = self._new_connection()  # connects at its first command
        else:
            # Something to read before anything was sent: the server closed the connection
            # (it restarted, or something between timed the connection out). Found now, it
            # costs a reconnection; found after sending, the command's fate is unknown, and
            # a command is never sent twice: a claim or a pop must not run twice.
            try:
                stale = connection.can_read()
            except self._connection_error:  # the poll read the end of the connection
                stale = True
            if stale:
                connection.disconnect()  # and send_command connects again
        try:
            connection.send_command(*command)
            reply = connection.read_response()
        except self._reply_error:  # an error reply, read whole: the connection is in step
            self._idle.append(connection)
            raise
        except BaseException:  # a lost connection, a timeout, an interrupt: a reply may still come
            connection.disconnect()
            raise
        self._idle.append(connection)
        return reply

    def _read_plainly(self, key: str, entry_id: Any) -> StoredTask | None:
        """The entry ``entry_id`` read with one plain command, if it still holds ``key``
        and needs no question about its owner; else None, and the script is asked."""
        entry = f"{self._prefix}:e:{entry_id}"
        bound, state, owner, progress = self._call(("HMGET", entry, "key", "state", "owner", "progress"))
        if bound != key.encode() or owner is None:  # popped or dropped since: the key may
            self._ids.pop(key, None)  # name another task now (or something else wrote there)
            return None
        if state in (b"FINISHED", b"CANCELLED"):
            owner_alive = False  # not asked of a finished task
        elif state in (b"PENDING", b"RUNNING") and self._alive_until.get(owner, 0.0) > time.monotonic():
            owner_alive = True
        else:
            return None  # its owner's mark may be gone
        return StoredTask(entry_id, key, state.decode(), owner.decode(), owner_alive, None, progress or None)

    def _record(self, fields: list[Any] | None, asked: float) -> StoredTask | None:
        """The entry a script sent at ``asked`` replied with. Its last field is how many
        more milliseconds the owner's mark lasts: -1 for no end; 0 for gone, or not
        asked (of a finished task)."""
        if not fields:
            return None
        entry_id, key, state, owner, outcome, progress, mark_lasts_ms = fields
        if (
            key is None
            or owner is None
            or state.decode() not in ("PENDING", "RUNNING", "FINISHED", "CANCELLED")
        ):
            raise _ForeignEntry(
                f"entry {entry_id.decode()} of the Redis store ({self._prefix}) was not written by"
                " Flask-Executor (it lacks fields, or has an unknown state): something else writes there"
            )
        if mark_lasts_ms > 0:
            _remember(self._alive_until, owner, asked + mark_lasts_ms / 1000)
        elif mark_lasts_ms == 0 and state in (b"PENDING", b"RUNNING"):
            self._alive_until.pop(owner, None)  # gone before its time: evicted, deleted, a failover
        return StoredTask(
            int(entry_id),
            key.decode() or None,
            state.decode(),
            owner.decode(),
            mark_lasts_ms != 0,
            outcome or None,
            progress or None,
        )


def _remember(memo: dict[Any, Any], key: Any, value: Any) -> None:
    """Sets ``memo[key]``; a full memo is emptied first (what it held is asked again)."""
    if len(memo) >= _REDIS_REMEMBERED:
        memo.clear()
    memo[key] = value


def _without_password(url: str) -> str:
    return re.sub(r"//[^@/]*@", "//***@", url)


# The Lua scripts of _RedisStore. KEYS[1] is the namespace's prefix; under it live
# ":seq" (the last entry id), ":e:ID" (an entry's fields), ":keys" (key -> id),
# ":order" (ids, oldest first) and ":finished" (finished ids by id, for eviction)
# and ":done_at" (finished ids by the time they finished, for the TTL). Times are
# the Redis server's, the one clock that every host shares (a script may read it and
# then write since Redis 5, which replicates a script's effects, not the script).
_REDIS_LIBRARY = """
local prefix = KEYS[1]
local function now()
    local time = redis.call('TIME')
    return tonumber(time[1]) + tonumber(time[2]) / 1000000
end
local function drop(id)
    local entry = prefix .. ':e:' .. id
    local key = redis.call('HGET', entry, 'key')
    if key and key ~= '' and redis.call('HGET', prefix .. ':keys', key) == tostring(id) then
        redis.call('HDEL', prefix .. ':keys', key)
    end
    redis.call('DEL', entry)
    redis.call('ZREM', prefix .. ':order', id)
    redis.call('ZREM', prefix .. ':finished', id)
    redis.call('ZREM', prefix .. ':done_at', id)
    return key
end
local function expire(ttl)
    if tonumber(ttl) > 0 then
        local before = now() - ttl
        local expired = redis.call('ZRANGEBYSCORE', prefix .. ':done_at', '-inf', before, 'LIMIT', 0, 100)
        for _, id in ipairs(expired) do drop(id) end
    end
end
local function finished(id)
    redis.call('ZADD', prefix .. ':finished', id, id)
    redis.call('ZADD', prefix .. ':done_at', now(), id)
end
local function record(id, with_outcome)
    local entry = prefix .. ':e:' .. id
    local fields = redis.call('HMGET', entry, 'key', 'state', 'owner', 'progress')
    if not fields[2] then return nil end
    -- ms the owner's mark lasts, asked only of unfinished tasks, the ones that can be lost
    local mark_ms = 0
    if fields[3] and (fields[2] == 'PENDING' or fields[2] == 'RUNNING') then
        mark_ms = redis.call('PTTL', 'flask_executor:owner:' .. fields[3])
        if mark_ms == -2 then mark_ms = 0 elseif mark_ms == 0 then mark_ms = 1 end  -- none; its last ms
    end
    local outcome = ''
    if with_outcome then outcome = redis.call('HGET', entry, 'outcome') or '' end
    return {id, fields[1], fields[2], fields[3], outcome, fields[4] or '', mark_ms}
end
"""
_REDIS_SCRIPTS = {
    name: f"local lost_after_ms = {int(_LOST_AFTER_SECONDS * 1000)}\n" + _REDIS_LIBRARY + body
    for name, body in {
        # ARGV: key, owner, max_length, ttl. Replies the new id, or {id, dropped keys...}.
        "claim": """
local key, owner, max_length = ARGV[1], ARGV[2], tonumber(ARGV[3])
expire(ARGV[4])
local id = redis.call('INCR', prefix .. ':seq')
if redis.call('HSETNX', prefix .. ':keys', key, id) == 0 then return false end
redis.call('HSET', prefix .. ':e:' .. id, 'key', key, 'state', 'PENDING', 'owner', owner)
redis.call('ZADD', prefix .. ':order', id, id)
redis.call('SET', 'flask_executor:owner:' .. owner, 1, 'PX', lost_after_ms)
if max_length == 0 or redis.call('ZCARD', prefix .. ':order') <= max_length then return id end
local reply = {id}
while redis.call('ZCARD', prefix .. ':order') > max_length do
    local oldest = redis.call('ZRANGE', prefix .. ':finished', 0, 0)[1]
    if not oldest then
        oldest = redis.call('ZRANGE', prefix .. ':order', 0, 0)[1]
        local dropped = drop(oldest)
        if dropped and dropped ~= '' then table.insert(reply, dropped) end
    else
        drop(oldest)
    end
end
return reply
""",
        # ARGV: id, owner, to_state, outcome, progress, from_states...
        "transition": """
local id, owner, to_state, outcome, progress = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local entry = prefix .. ':e:' .. id
local fields = redis.call('HMGET', entry, 'state', 'owner')
if not fields[1] or fields[2] ~= owner then return 0 end
local allowed = false
for i = 6, #ARGV do if ARGV[i] == fields[1] then allowed = true end end
if not allowed then return 0 end
if to_state ~= '' then
    redis.call('HSET', entry, 'state', to_state)
    if to_state == 'FINISHED' or to_state == 'CANCELLED' then finished(id) end
end
if outcome ~= '' then redis.call('HSET', entry, 'outcome', outcome) end
if progress ~= '' then redis.call('HSET', entry, 'progress', progress) end
return 1
""",
        # ARGV: id, key ('': popped)
        "cancel": """
local id = ARGV[1]
local entry = prefix .. ':e:' .. id
local fields = redis.call('HMGET', entry, 'state', 'key')
if fields[1] ~= 'PENDING' or fields[2] ~= ARGV[2] then return 0 end
redis.call('HSET', entry, 'state', 'CANCELLED')
finished(id)
return 1
""",
        # ARGV: ttl, key (or ''), id (or ''); by key without the outcome, by id with it
        "read": """
expire(ARGV[1])
local id = ARGV[3]
if ARGV[2] ~= '' then id = redis.call('HGET', prefix .. ':keys', ARGV[2]) end
if not id then return nil end
return record(id, ARGV[2] == '')
""",
        # ARGV: ttl, key
        "pop": """
expire(ARGV[1])
local id = redis.call('HGET', prefix .. ':keys', ARGV[2])
if not id then return nil end
local found = record(id, true)
-- kept without its key: unfinished, for the popper; cancelled, until its owner has seen it
if found[3] == 'PENDING' or found[3] == 'RUNNING' or (found[3] == 'CANCELLED' and found[5] == '') then
    redis.call('HDEL', prefix .. ':keys', ARGV[2])
    redis.call('HSET', prefix .. ':e:' .. id, 'key', '')
else
    drop(id)
end
return found
""",
        # ARGV: ttl
        "keys": """
expire(ARGV[1])
return redis.call('HGETALL', prefix .. ':keys')
""",
        # ARGV: ttl
        "count": """
expire(ARGV[1])
return redis.call('HLEN', prefix .. ':keys')
""",
        # ARGV: id
        "delete": """
drop(ARGV[1])
return 1
""",
    }.items()
}
# What EVALSHA names a script by: the SHA-1 of its text, as Redis computes it.
_REDIS_DIGESTS = {name: hashlib.sha1(script.encode()).hexdigest() for name, script in _REDIS_SCRIPTS.items()}


_STORE_WAIT_SECONDS = 5.0
_REDIS_REMEMBERED = 4096  # keys' entry ids, and owners' marks, that a Redis store keeps in mind
_WAL_LIMIT = 4 * 1024 * 1024
# The id is the last one handed out plus one (NULL, SQLite's choice, in a new file).
_SQLITE_INSERT = (
    "INSERT OR IGNORE INTO tasks (id, namespace, key, state, owner) VALUES"
    " ((SELECT tasks + 1 FROM namespaces WHERE namespace = ''), ?, ?, 'PENDING', ?)"
)
_SQLITE_OVER_LIMIT = "flask_executor: over max_length"
_SQLITE_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS tasks (id INTEGER PRIMARY KEY, namespace TEXT NOT NULL,"
    " key TEXT, state TEXT NOT NULL, owner TEXT NOT NULL, outcome BLOB, progress BLOB, finished REAL)",
    "CREATE UNIQUE INDEX IF NOT EXISTS tasks_by_key ON tasks (namespace, key)",
    "CREATE INDEX IF NOT EXISTS finished_tasks ON tasks (namespace, id) WHERE finished IS NOT NULL",
    "CREATE TABLE IF NOT EXISTS owners (owner TEXT PRIMARY KEY, seen REAL NOT NULL) WITHOUT ROWID",
    # A namespace's entries are counted here. The row of namespace '' counts ids: its
    # tasks column is the last id handed out, so that an id is never reused and a reader
    # holding one never reads another task. (AUTOINCREMENT would keep it in a table of
    # its own, a page more for every insert to write.)
    "CREATE TABLE IF NOT EXISTS namespaces (namespace TEXT PRIMARY KEY, tasks INTEGER NOT NULL DEFAULT 0,"
    " max_length INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID",
    # Counting, and keeping a namespace within its max_length, happen in the statement
    # that inserts an entry, so that a claim is one write: it drops the oldest finished
    # entries beyond the limit, and fails when too many are left, all unfinished (the
    # claim then drops the oldest in a transaction, and names them).
    "DROP TRIGGER IF EXISTS inserted",  # the one of files made before it could fail
    "CREATE TRIGGER IF NOT EXISTS bounded AFTER INSERT ON tasks BEGIN"
    " INSERT INTO namespaces (namespace, tasks) VALUES (new.namespace, 1)"
    " ON CONFLICT (namespace) DO UPDATE SET tasks = tasks + 1;"
    " INSERT INTO namespaces (namespace, tasks) VALUES ('', new.id)"
    " ON CONFLICT (namespace) DO UPDATE SET tasks = max(tasks, excluded.tasks);"
    " DELETE FROM tasks WHERE id IN (SELECT id FROM tasks WHERE namespace = new.namespace"
    " AND finished IS NOT NULL ORDER BY id LIMIT coalesce((SELECT max(0, tasks - max_length)"
    " FROM namespaces WHERE namespace = new.namespace AND max_length > 0), 0));"
    f" SELECT RAISE(ABORT, '{_SQLITE_OVER_LIMIT}') FROM namespaces WHERE namespace = new.namespace"
    " AND max_length > 0 AND tasks > max_length; END",
    "CREATE TRIGGER IF NOT EXISTS deleted AFTER DELETE ON tasks BEGIN"
    " UPDATE namespaces SET tasks = tasks - 1 WHERE namespace = old.namespace; END",
)


def _file_store_problem(path: str) -> str | None:
    """Why a store file at ``path`` would be unsafe or unusable, or None."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        return f"its directory {directory} does not exist"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"its directory {directory} is not writable by this process (SQLite writes files beside it)"
    for name in (path, path + "-wal", path + "-shm"):
        try:
            status = os.stat(name)
        except FileNotFoundError:
            continue
        mode = status.st_mode
        if status.st_uid != os.geteuid():
            return (
                f"{name} belongs to another user (uid {status.st_uid}), who can write it, and what the"
                " store holds is unpickled by the app: use a file of this user's own"
            )
        if not stat.S_ISREG(mode):
            return f"{name} is not a regular file"
        if mode & 0o022:
            return (
                f"{name} can be written by other users (mode {stat.filemode(mode)}), and what the store"
                f" holds is unpickled by the app: make it private (chmod 600 {name})"
            )
        if not os.access(name, os.R_OK | os.W_OK):
            return f"{name} is not readable and writable by this process"
    return None


def _make_store(
    config: _Config, app: flask.Flask, current: _MemoryStore | _SharedStore
) -> _MemoryStore | _SharedStore:
    """The store ``EXECUTOR_FUTURES_STORE`` asks for; the one place that tells kinds apart.

    :raises ValueError: the store cannot be used; the message says why.
    """
    target = config.futures_store
    key = config.prefix + "FUTURES_STORE"
    if target is None:
        return current if not current.shared else _MemoryStore()
    secret_key = app.config.get("SECRET_KEY")
    if not secret_key:
        raise ValueError(
            f"{key} is set, and a shared store needs the app's SECRET_KEY: what the store holds is"
            " unpickled, so every entry is signed with it. Set SECRET_KEY (the same in every process)"
        )
    namespace = config.prefix
    backend: FuturesStore
    if isinstance(target, str) and target.startswith(("redis://", "rediss://")):
        backend = _RedisStore(target, namespace, key, config.futures_ttl)
    elif isinstance(target, (str, os.PathLike)):
        backend = _SQLiteStore(os.fspath(target), namespace, key, config.futures_ttl)
    elif all(callable(getattr(target, method, None)) for method in _STORE_METHODS):
        backend = target
    else:
        raise ValueError(
            f"{key} must be the path of a SQLite file, a redis:// or rediss:// URL, or an object with"
            f" the methods of flask_executor.FuturesStore; got {target!r}"
        )
    return _SharedStore(backend, _Signer(secret_key, namespace, app.logger), app.logger)


_STORE_METHODS = [name for name in vars(FuturesStore) if not name.startswith("_")]


# Configuration -------------------------------------------------------------------------

# Every key an executor reads, without its prefix (EXECUTOR_, or NAME_EXECUTOR_).
_KEYS = (
    "TYPE",
    "MAX_WORKERS",
    "FUTURES_MAX_LENGTH",
    "PROPAGATE_EXCEPTIONS",
    "PUSH_APP_CONTEXT",
    "QUEUE_SIZE",
    "QUEUE_TIMEOUT",
    "LOG_EXCEPTIONS",
    "MP_CONTEXT",
    "MAX_TASKS_PER_CHILD",
    "PROCESS_APP",
    "FUTURES_STORE",
    "FUTURES_TTL",
)
_TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
_FALSE_WORDS = frozenset({"false", "no", "off", "0"})
_START_METHODS = ("fork", "spawn", "forkserver")


@dataclasses.dataclass(frozen=True)
class _Config:
    kind: str  # "thread", "process", "sync", or "configured" (made by ``factory``)
    factory: Callable[..., concurrent.futures.Executor] | None
    max_workers: int | None
    futures_max_length: int
    propagate_exceptions: bool
    push_app_context: bool
    queue_size: int | None
    queue_timeout: float
    log_exceptions: bool
    mp_context: str | None
    max_tasks_per_child: int | None
    process_app: str | None
    futures_store: Any
    futures_ttl: float | None
    # Names the app to process workers forked from this one; see _worker_app.
    app_key: str
    prefix: str


def _read_config(config: Mapping[str, Any], name: str) -> _Config:
    """Reads and checks every key at once, so that a bad value is reported by
    ``init_app`` rather than by the first submit, long after start-up."""
    prefix = f"{name.upper()}_EXECUTOR_" if name else "EXECUTOR_"
    type_key = prefix + "TYPE"
    kind, factory = _read_type(type_key, config.get(type_key, "thread"))
    max_workers = _read_integer(config, prefix + "MAX_WORKERS", None, minimum=1)
    max_tasks_per_child = _read_integer(config, prefix + "MAX_TASKS_PER_CHILD", None, minimum=1)
    mp_context = config.get(prefix + "MP_CONTEXT")
    if mp_context is not None and mp_context not in _start_methods():
        raise ValueError(
            f"{prefix}MP_CONTEXT must be one of {', '.join(map(repr, _START_METHODS))} (where this"
            f" platform has it), got {mp_context!r}"
        )
    if max_tasks_per_child is not None:
        if sys.version_info < (3, 11):
            raise ValueError(
                f"{prefix}MAX_TASKS_PER_CHILD={max_tasks_per_child!r} needs Python 3.11 or later"
            )
        if mp_context == "fork":
            raise ValueError(
                f"{prefix}MAX_TASKS_PER_CHILD={max_tasks_per_child!r} cannot be used with"
                f" {prefix}MP_CONTEXT='fork': choose 'spawn' or 'forkserver'"
            )
    return _Config(
        kind=kind,
        factory=factory,
        max_workers=max_workers,
        futures_max_length=_read_integer(config, prefix + "FUTURES_MAX_LENGTH", 50, minimum=0) or 0,
        propagate_exceptions=_read_boolean(config, prefix + "PROPAGATE_EXCEPTIONS", False),
        push_app_context=_read_boolean(config, prefix + "PUSH_APP_CONTEXT", True),
        queue_size=_read_integer(config, prefix + "QUEUE_SIZE", None, minimum=0),
        queue_timeout=_read_seconds(config, prefix + "QUEUE_TIMEOUT", 0.0),
        log_exceptions=_read_boolean(config, prefix + "LOG_EXCEPTIONS", True),
        mp_context=mp_context,
        max_tasks_per_child=max_tasks_per_child,
        process_app=_read_process_app(prefix + "PROCESS_APP", config.get(prefix + "PROCESS_APP")),
        futures_store=config.get(prefix + "FUTURES_STORE"),
        futures_ttl=_read_seconds(config, prefix + "FUTURES_TTL", None),
        app_key=uuid.uuid4().hex,
        prefix=prefix,
    )


def _start_methods() -> list[str]:
    import multiprocessing  # here: thread pools never need it, and it is slow to import

    return multiprocessing.get_all_start_methods()


def _read_type(key: str, value: Any) -> tuple[str, Callable[..., concurrent.futures.Executor] | None]:
    if callable(value):
        return "configured", value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("thread", "process", "sync"):
            return word, None
        module_name, colon, attribute = value.strip().partition(":")
        if colon and module_name and attribute:
            try:
                found: Any = importlib.import_module(module_name)
                for part in attribute.split("."):
                    found = getattr(found, part)
            except (ImportError, AttributeError) as error:
                raise ValueError(f"{key}={value!r} cannot be imported: {error}") from error
            if not callable(found):
                raise ValueError(f"{key}={value!r} names {found!r}, which is not callable")
            return "configured", found
    raise ValueError(
        f"{key} must be 'thread', 'process', 'sync', an import string such as"
        f" 'package.module:make_executor', or a callable returning a concurrent.futures.Executor;"
        f" got {value!r}"
    )


def _read_integer(config: Mapping[str, Any], key: str, default: int | None, *, minimum: int) -> int | None:
    value = config.get(key)
    if value is None:
        return default
    try:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise ValueError(f"{key} must be a whole number, {minimum} or more, got {value!r}")
    return number


@overload
def _read_seconds(config: Mapping[str, Any], key: str, default: float) -> float: ...
@overload
def _read_seconds(config: Mapping[str, Any], key: str, default: None) -> float | None: ...
def _read_seconds(config: Mapping[str, Any], key: str, default: float | None) -> float | None:
    value = config.get(key)
    if value is None:
        return default
    try:
        if isinstance(value, bool):
            raise ValueError
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not 0 <= seconds <= threading.TIMEOUT_MAX:  # NaN fails this too
        raise ValueError(
            f"{key} must be a number of seconds from 0 to {threading.TIMEOUT_MAX:.0f}, got {value!r}"
        )
    return seconds


def _read_boolean(config: Mapping[str, Any], key: str, default: bool) -> bool:
    value = config.get(key)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower() if isinstance(value, (str, int)) else None
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise ValueError(f"{key} must be true or false (or yes/no, on/off, 1/0), got {value!r}")


def _read_process_app(key: str, value: Any) -> str | None:
    """An import string as ``flask --app`` takes it: ``module``, ``module:app`` or
    ``module:create_app()``. The module is looked for, not imported: it may be the
    very module whose import is calling init_app."""
    if value is None:
        return None
    module_name, _, app_name = value.partition(":") if isinstance(value, str) else ("", "", "")
    if not (
        re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", module_name)
        and re.fullmatch(r"([A-Za-z_]\w*(\(.*\))?)?", app_name, re.DOTALL)
    ):
        raise ValueError(
            f"{key} must be an import string such as 'package.module:app' or"
            f" 'package.module:create_app()', got {value!r}"
        )
    if not _module_exists(module_name):
        raise ValueError(
            f"{key}={value!r} names module {module_name!r}, which cannot be found on sys.path: check"
            " the name, and that the directory holding it is on the path of every process"
        )
    return cast(str, value)


def _module_exists(name: str) -> bool:
    """Whether ``import name`` would find a module, found as import finds it but
    without running any module, not even the packages on the way."""
    search_path = None
    parts = name.split(".")
    for depth in range(1, len(parts) + 1):
        prefix = ".".join(parts[:depth])
        module = sys.modules.get(prefix)
        if module is not None:
            search_path = getattr(module, "__path__", None)
        else:
            spec = None
            for finder in sys.meta_path:
                find_spec = getattr(finder, "find_spec", None)
                if find_spec is not None:
                    spec = find_spec(prefix, search_path)
                    if spec is not None:
                        break
            if spec is None:
                return False
            search_path = spec.submodule_search_locations
        if depth < len(parts) and search_path is None:
            return False  # a module, not a package: it holds no submodules
    return True


def _warn_about_unknown_keys(app: flask.Flask, config: _Config) -> None:
    """A misspelt key would be ignored without a word; name it, and the closest known one."""
    known = [config.prefix + key for key in _KEYS]
    for key in app.config:
        if isinstance(key, str) and key.startswith(config.prefix) and key not in known:
            closest = difflib.get_close_matches(key, known, n=1)
            app.logger.warning(
                "%s is not a configuration key of Flask-Executor, and is ignored%s",
                key,
                f": did you mean {closest[0]}?" if closest else "",
            )


# Processes: forks and exit -------------------------------------------------------------


class _ThisProcess:
    """Notices when this process is new, a fork of the one that made the executors:
    from the fork hook when Python forks, and from the pid when a fork bypasses the
    hook (uWSGI forks its workers in C). Then every executor starts over, without
    the parent's threads, which do not exist here, and its locks, which one of those
    threads may have held."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        #: Names this process to shared stores; new in every process, so unlike a pid
        #: it is never reused.
        self.token = uuid.uuid4().hex
        self._starting: dict[int, threading.Event] = {}

    def start_over(self) -> None:
        pid = os.getpid()
        if pid == self.pid:
            return
        # The first thread here starts over; others wait for it (setdefault is atomic).
        started = threading.Event()
        first = self._starting.setdefault(pid, started)
        if first is not started:
            first.wait()
            return
        self.token = uuid.uuid4().hex
        _live_thread_pools.clear()
        _worker_threads.clear()
        for executor in list(_live_executors):
            executor._start_over()
        self.pid = pid
        self._starting = {pid: started}
        started.set()


def _finish_thread_pools_at_exit() -> None:
    if _this_process.pid != os.getpid():
        return  # forked in C and never used here: the threads on record are the parent's
    for pool in list(_live_thread_pools):
        pool.shutdown(wait=False, cancel_futures=False)
    for thread in list(_worker_threads):
        thread.join()


_this_process = _ThisProcess()
# What a new process inherited from its parent and must never collect: collecting a
# pool wakes its threads and takes its locks, and the threads (one of which may have
# held a lock at the fork) do not exist here. After a fork in C, Python 3.13 crashes
# outright on waking a thread that does not exist. One entry per pool and per store.
_inherited: list[object] = []
_live_executors: weakref.WeakSet[Executor] = weakref.WeakSet()
os.register_at_fork(after_in_child=_this_process.start_over)
atexit.register(_finish_thread_pools_at_exit)
