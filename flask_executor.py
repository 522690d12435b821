"""Background tasks for Flask, with no broker and no worker processes.

An :class:`Executor` runs functions in a thread pool (or a process pool) while the
request that submitted them returns. Tasks run inside the application context and,
when submitted during a request, inside a copy of the request context, so code that
uses ``current_app``, ``g``, ``request`` or ``session`` works unchanged::

    from flask import Flask
    from flask_executor import Executor

    app = Flask(__name__)
    executor = Executor(app)

    @app.post("/signup")
    def signup():
        executor.submit(send_confirmation_email, request.form["email"])
        return "Check your inbox."

Futures kept under a key (:meth:`Executor.submit_stored`) can be polled from a later
request through :attr:`Executor.futures`.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import contextvars
import dataclasses
import functools
import importlib
import itertools
import logging
import math
import os
import pickle
import queue
import re
import sys
import threading
import time
import types
import uuid
import weakref
from collections.abc import Callable, Coroutine, Hashable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, ParamSpec, TypeVar, cast, overload

import flask
from flask.ctx import AppContext
from flask.globals import app_ctx

if TYPE_CHECKING:
    from flask.ctx import RequestContext
    from flask.wrappers import Request

__all__ = [
    "Executor",
    "ExecutorJob",
    "FutureCollection",
    "Progress",
    "QueueFull",
    "TaskFuture",
    "propagate_exceptions_callback",
    "report_progress",
]
__version__ = "2.0.0"

T = TypeVar("T")
P = ParamSpec("P")
R = TypeVar("R")

_logger = logging.getLogger(__name__)


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
        self._pool: _Pool | None = None
        self._pool_lock = threading.Lock()
        self._slots: threading.BoundedSemaphore | None = None
        self._shut_down = False
        self._task_settings: _TaskSettings | None = None
        # Futures handed to a configured executor and not done yet, for shutdown().
        self._handed_over: set[TaskFuture[Any]] = set()
        # Whether tasks run in this process, in threads, and so get the contexts pushed.
        self._runs_tasks_here = True
        _live_executors.add(self)
        if app is not None:
            self.init_app(app)

    def init_app(self, app: flask.Flask) -> None:
        """Reads this executor's configuration from ``app.config`` and binds the
        executor to ``app``. A thread or process pool is made on the first submit, in
        each process, so that an app loaded before a server forks works in every
        worker. (A configured executor is made here, to check it.)

        Binding to another app later (an app factory in tests, say) rebinds it:
        tasks submitted from then on use the new app and its configuration.

        :raises ValueError: a configuration value is invalid; the message names the
            key and the value. Nothing has changed when it is raised.
        """
        config = _read_config(app.config, self.name)
        pool = _make_foreign_pool(config) if config.factory is not None else None
        with self._pool_lock:
            previous, self._pool = self._pool, pool
            self._app = app
            self._config = config
            self._slots = _make_slots(config)
            self._task_settings = _TaskSettings(app, config.push_app_context, config.log_exceptions)
            self._runs_tasks_here = config.kind in ("thread", "sync") or isinstance(
                pool, concurrent.futures.ThreadPoolExecutor
            )
            self._shut_down = False
        self.futures.max_length = config.futures_max_length or None
        self.futures.logger = app.logger
        _apps_for_forked_workers[config.app_key] = app
        app.extensions[self.name + "executor"] = self
        if previous is not None:
            self._shut_pool_down(previous, wait=False, cancel_futures=False)

    @overload
    def submit(
        self, fn: Callable[P, Coroutine[Any, Any, T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> TaskFuture[T]: ...
    @overload
    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> TaskFuture[T]: ...
    def submit(self, fn: Callable[P, Any], /, *args: P.args, **kwargs: P.kwargs) -> TaskFuture[Any]:
        """Schedules ``fn(*args, **kwargs)`` and returns its :class:`TaskFuture`.

        ``fn`` may be an ``async def`` function: the future then holds what the
        coroutine returns. ::

            future = executor.submit(send_email, user.id, template="welcome")

        :raises QueueFull: ``EXECUTOR_QUEUE_SIZE`` tasks are already waiting and no
            room was made within ``EXECUTOR_QUEUE_TIMEOUT`` seconds; the task will
            not run.
        :raises RuntimeError: the executor was shut down, or was never bound to an app.
        """
        return self._submit(None, fn, args, kwargs, self._capture_contexts())

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
    def submit_stored(
        self, future_key: Hashable, fn: Callable[P, Any], /, *args: P.args, **kwargs: P.kwargs
    ) -> TaskFuture[Any]:
        """Like :meth:`submit`, and keeps the future in :attr:`futures` under
        ``future_key`` so that a later request can ask about it::

            executor.submit_stored("report", build_report, month)
            ...
            if executor.futures.done("report"):
                return executor.futures.pop("report").result()

        :raises ValueError: ``future_key`` is already stored. Nothing has run.
        """
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
        if chunksize > 1 and self._config.kind in ("process", "foreign"):
            if self._config.kind == "process":
                _check_picklable(fn)
            chunks = iter(functools.partial(_take, calls, chunksize), [])
            futures = [self._submit(None, _call_each, (fn, chunk), {}, contexts) for chunk in chunks]
            return itertools.chain.from_iterable(_results_in_order(futures, end_time))
        futures = [self._submit(None, fn, call, {}, contexts) for call in calls]
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
        with self._pool_lock:
            self._shut_down = True
            pool, self._pool = self._pool, None
        if pool is not None:
            self._shut_pool_down(pool, wait, cancel_futures)

    def _shut_pool_down(self, pool: _Pool, wait: bool, cancel_futures: bool) -> None:
        standard = (
            _ThreadPool,
            concurrent.futures.ThreadPoolExecutor,
            concurrent.futures.ProcessPoolExecutor,
        )
        if isinstance(pool, standard):
            pool.shutdown(wait=wait, cancel_futures=cancel_futures)
            return
        # A configured executor may not take cancel_futures (Dask's does not), and
        # may cancel what it holds when not waiting (Dask's does): so cancel here
        # what has to be, and let another thread wait for the rest.
        if cancel_futures:
            for future in list(self._handed_over):
                future.cancel()
        if wait:
            pool.shutdown(wait=True)
        else:
            threading.Thread(target=pool.shutdown, name="flask_executor_shutdown", daemon=True).start()

    # The path of every task, and so the hot path: the configuration is read once,
    # and nothing is looked up twice.
    def _submit(
        self,
        future_key: Hashable | None,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        contexts: _CapturedContexts | None,
    ) -> TaskFuture[Any]:
        config = self._config
        if self._shut_down:
            raise RuntimeError(f"cannot submit {_describe(fn)}: {self!r} has been shut down")
        if self._app is None:
            raise RuntimeError(f"{self!r} is not bound to an app: call init_app(app) before submitting tasks")
        future: TaskFuture[Any] = TaskFuture()
        future._settings = self._task_settings
        for callback in self._default_done_callbacks:
            future.add_done_callback(callback)
        if config.propagate_exceptions:
            future.add_done_callback(propagate_exceptions_callback)
        if future_key is not None:
            self.futures.add(future_key, future)  # raises on a key in use, before anything runs
        try:
            self._schedule(_Task(future, fn, args, kwargs, contexts), config)
        except BaseException:
            if future_key is not None:
                self.futures._discard(future_key, future)
            raise
        if config.kind == "sync" and config.propagate_exceptions:
            exception = future.exception()
            if exception is not None:
                raise exception
        return future

    def _schedule(self, task: _Task, config: _Config) -> None:
        if config.kind == "sync":
            task.run()
            return
        slots = self._slots
        if slots is not None and not _take_slot(slots, config.queue_timeout):
            raise QueueFull(
                f"{config.queue_size} tasks are already waiting for a worker ({config.prefix}QUEUE_SIZE"
                f"={config.queue_size}); {_describe(task.fn)} was not accepted and will not run. Retry"
                f" later, or raise {config.prefix}QUEUE_SIZE or {config.prefix}QUEUE_TIMEOUT"
            )
        try:
            pool = self._pool or self._make_pool()
            if isinstance(pool, _ThreadPool):
                task.slots = slots
                pool.schedule(task)
            else:
                self._hand_over(pool, task, config, slots)
        except BaseException:
            if slots is not None:
                slots.release()
            raise

    def _hand_over(
        self,
        pool: concurrent.futures.Executor,
        task: _Task,
        config: _Config,
        slots: threading.BoundedSemaphore | None,
    ) -> None:
        """Hands a task to a pool that makes futures of its own (a process pool or a
        configured executor), and ties its future to the task's."""
        call: tuple[Any, ...]
        if self._runs_tasks_here:
            call = (task.run,)
        else:
            if isinstance(pool, concurrent.futures.ProcessPoolExecutor):
                _check_picklable(task.fn)  # others (Dask, loky) may serialize what pickle cannot
            app_reference = (config.app_key, config.process_app) if config.push_app_context else None
            # A unique id in every call to a configured executor: some (Dask's) run a
            # call only once when it is submitted again with the same arguments.
            call_id = uuid.uuid4().hex if config.kind == "foreign" else None
            call = (_run_in_worker, task.fn, task.args, task.kwargs, app_reference, call_id)
        try:
            inner = pool.submit(*call)
        except concurrent.futures.BrokenExecutor:
            # The pool broke since the last task finished; a fresh one takes this task.
            self._forget_broken_pool(pool)
            pool = cast(concurrent.futures.Executor, self._pool or self._make_pool())
            inner = pool.submit(*call)
        future = task.future
        future._inner = inner
        if future.cancelled():  # cancelled through the collection while it was being handed over
            inner.cancel()
        if config.kind == "foreign":
            self._handed_over.add(future)
        inner.add_done_callback(functools.partial(self._settle, future, pool, slots))

    def _settle(
        self,
        future: TaskFuture[Any],
        pool: concurrent.futures.Executor,
        slots: threading.BoundedSemaphore | None,
        inner: concurrent.futures.Future[Any],
    ) -> None:
        # The two futures refer to each other (through _inner and this callback):
        # unlinking them lets reference counting free both, rather than the cyclic GC.
        future._inner = None
        if slots is not None:
            slots.release()
        self._handed_over.discard(future)
        try:
            exception = inner.exception()
        except concurrent.futures.CancelledError:
            concurrent.futures.Future.cancel(future)
            return
        if future.done():  # a thread-like pool, where the task completed its future itself
            return
        if exception is None:
            future.set_result(inner.result())
            return
        if isinstance(exception, concurrent.futures.BrokenExecutor):
            self._forget_broken_pool(pool)
        elif future._settings is not None and future._settings.log_exceptions:
            future._settings.app.logger.error("Task failed in a worker process", exc_info=exception)
        future.set_exception(exception)

    def _forget_broken_pool(self, pool: concurrent.futures.Executor) -> None:
        with self._pool_lock:
            if self._pool is not pool:
                return  # already replaced: the event was logged then
            self._pool = None
            _broken_pools.append(pool)
        if self._app is not None:
            self._app.logger.warning(
                "A worker of %r died (killed, out of memory, or os._exit); the tasks it was"
                " running failed with BrokenProcessPool and a new pool is used from the next task",
                self,
            )
        # No shutdown(), for the same reason; a broken pool has stopped its workers already.

    def _make_pool(self) -> _Pool:
        with self._pool_lock:
            if self._shut_down:
                raise RuntimeError(f"cannot submit: {self!r} has been shut down")
            if self._pool is None:
                self._pool = _make_pool(self._config, self.name)
            return self._pool

    def _capture_contexts(self) -> _CapturedContexts | None:
        if not (self._runs_tasks_here and self._config.push_app_context):
            return None
        return _CapturedContexts(self._app)

    def _after_fork_in_child(self) -> None:
        # The parent's pool has no threads in this process, and any lock may have
        # been held by a thread that no longer exists: start again from scratch.
        self._pool = None
        self._pool_lock = threading.Lock()
        self._slots = _make_slots(self._config)
        self._handed_over = set()
        self.futures._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"<Executor {self.name!r} ({self._config.kind})>"
            if self.name
            else f"<Executor ({self._config.kind})>"
        )


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
    def submit_stored(self, future_key: Hashable, *args: Any, **kwargs: Any) -> TaskFuture[Any]:
        """Submits a call of this job and stores its future under ``future_key``;
        see :meth:`Executor.submit_stored`."""
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
        self._futures: dict[Hashable, concurrent.futures.Future[Any]] = {}
        # How many keys hold each future, so that ``future in collection`` is a
        # dictionary lookup rather than a scan of every value.
        self._key_counts: dict[concurrent.futures.Future[Any], int] = {}
        self._lock = threading.Lock()

    def add(self, future_key: Hashable, future: concurrent.futures.Future[Any]) -> None:
        """Keeps ``future`` under ``future_key``.

        :raises ValueError: the key is already in use.
        """
        with self._lock:
            if future_key in self._futures:
                raise ValueError(
                    f"future key {future_key!r} is already in use: pop() it first, or choose another key"
                )
            self._futures[future_key] = future
            self._key_counts[future] = self._key_counts.get(future, 0) + 1
            evicted = self._evict_over_limit()
        for key in evicted:
            self.logger.warning(
                "Stopped tracking the unfinished future under key %r: more than %d futures are stored"
                " and none has finished. Pop futures once they are done, or raise"
                " EXECUTOR_FUTURES_MAX_LENGTH.",
                key,
                self.max_length,
            )

    def pop(self, future_key: Hashable) -> concurrent.futures.Future[Any] | None:
        """Removes and returns the future under ``future_key``, or ``None``."""
        with self._lock:
            future = self._futures.pop(future_key, None)
            if future is not None:
                self._forget_one(future)
        return future

    def keys(self) -> list[Hashable]:
        """The keys in use, oldest first."""
        with self._lock:
            return list(self._futures)

    def done(self, future_key: Hashable) -> bool | None:
        future = self._get(future_key)
        return None if future is None else future.done()

    def running(self, future_key: Hashable) -> bool | None:
        future = self._get(future_key)
        return None if future is None else future.running()

    def cancelled(self, future_key: Hashable) -> bool | None:
        future = self._get(future_key)
        return None if future is None else future.cancelled()

    def cancel(self, future_key: Hashable) -> bool | None:
        future = self._get(future_key)
        return None if future is None else future.cancel()

    def result(self, future_key: Hashable, timeout: float | None = None) -> Any:
        future = self._get(future_key)
        return None if future is None else future.result(timeout)

    def exception(self, future_key: Hashable, timeout: float | None = None) -> BaseException | None:
        future = self._get(future_key)
        return None if future is None else future.exception(timeout)

    def progress(self, future_key: Hashable) -> Progress | None:
        """The last :class:`Progress` the task reported, or ``None``."""
        return getattr(self._get(future_key), "progress", None)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        # Flask-Executor 1.0 reached every attribute of a future this way
        # (``futures._state(key)``, ``futures.add_done_callback(key, fn)``...).
        if name.startswith("__") or name not in _FUTURE_ATTRIBUTES:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

        def by_key(future_key: Hashable, *args: Any, **kwargs: Any) -> Any:
            future = self._get(future_key)
            if future is None:
                return None
            value = getattr(future, name)
            return value(*args, **kwargs) if callable(value) else value

        return by_key

    def __contains__(self, future_or_key: object) -> bool:
        """True for a stored future (as in 1.0) and for a key in use."""
        try:
            return future_or_key in self._key_counts or future_or_key in self._futures
        except TypeError:  # not hashable: neither a future nor a key
            return False

    def __len__(self) -> int:
        return len(self._futures)

    def __repr__(self) -> str:
        return f"<FutureCollection of {len(self)} (max_length={self.max_length})>"

    def _get(self, future_key: Hashable) -> concurrent.futures.Future[Any] | None:
        with self._lock:
            return self._futures.get(future_key)

    def _discard(self, future_key: Hashable, future: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            if self._futures.get(future_key) is future:
                del self._futures[future_key]
                self._forget_one(future)

    def _forget_one(self, future: concurrent.futures.Future[Any]) -> None:
        count = self._key_counts[future] - 1
        if count:
            self._key_counts[future] = count
        else:
            del self._key_counts[future]

    def _evict_over_limit(self) -> list[Hashable]:
        """Drops futures beyond ``max_length``, finished ones first, oldest first.
        Returns the keys of unfinished ones it had to drop. Called with the lock held."""
        dropped_unfinished = []
        while self.max_length and len(self._futures) > self.max_length:
            newest = next(reversed(self._futures))
            # The scan is bounded by max_length, and stops at the first finished one.
            key = next((k for k, f in self._futures.items() if f.done() and k != newest), None)
            if key is None:
                key = next(iter(self._futures))
                dropped_unfinished.append(key)
            self._forget_one(self._futures.pop(key))
        return dropped_unfinished


class TaskFuture(concurrent.futures.Future[T]):
    """The :class:`concurrent.futures.Future` of a task submitted to an
    :class:`Executor`. It is a plain future, with two additions:

    - :attr:`progress`, the last :class:`Progress` the task reported;
    - done callbacks run inside the app context of the task's app, and one that
      raises is logged on ``app.logger`` without stopping the others.

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
        # The future of the pool the task was handed to, when that is not ours.
        self._inner: concurrent.futures.Future[Any] | None = None

    def add_done_callback(self, fn: Callable[[concurrent.futures.Future[T]], object]) -> None:
        super().add_done_callback(functools.partial(_call_done_callback, fn))

    def cancel(self) -> bool:
        inner = self._inner
        if inner is not None and not inner.cancel():
            return False
        return super().cancel()

    def running(self) -> bool:
        inner = self._inner
        return inner.running() if inner is not None else super().running()


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
    future.progress = Progress(done, total, message)


class QueueFull(Exception):
    """Raised by :meth:`Executor.submit` when ``EXECUTOR_QUEUE_SIZE`` tasks are
    already waiting for a worker. The task was not accepted and will not run; a
    view can answer 503::

        @app.errorhandler(QueueFull)
        def busy(error):
            return "Too busy, try again in a minute", 503
    """


def propagate_exceptions_callback(future: concurrent.futures.Future[Any]) -> None:
    """Raises the task's exception, if it has one, in the done callback. It is
    added to every future when ``EXECUTOR_PROPAGATE_EXCEPTIONS`` is true, so that a
    failure is surfaced (logged on ``app.logger``) rather than kept in the future::

        executor.add_default_done_callback(propagate_exceptions_callback)
    """
    exception = future.exception()
    if exception is not None:
        raise exception


# Configuration ---------------------------------------------------------------

_TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
_FALSE_WORDS = frozenset({"false", "no", "off", "0"})
_START_METHODS = ("fork", "spawn", "forkserver")


@dataclasses.dataclass(frozen=True)
class _Config:
    kind: str  # "thread", "process", "sync", or "foreign" (made by ``factory``)
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
    # Names the app to process workers forked from this one; see _run_in_worker.
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
    process_app = config.get(prefix + "PROCESS_APP")
    if process_app is not None and not (isinstance(process_app, str) and process_app.partition(":")[0]):
        raise ValueError(
            f"{prefix}PROCESS_APP must be an import string such as 'package.module:app' or"
            f" 'package.module:create_app()', got {process_app!r}"
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
        process_app=process_app,
        app_key=uuid.uuid4().hex,
        prefix=prefix,
    )


def _start_methods() -> list[str]:
    import multiprocessing  # here: thread pools never need it, and it is slow to import

    return multiprocessing.get_all_start_methods()


def _read_type(key: str, value: Any) -> tuple[str, Callable[..., concurrent.futures.Executor] | None]:
    if callable(value):
        return "foreign", value
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
            return "foreign", found
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


def _read_seconds(config: Mapping[str, Any], key: str, default: float) -> float:
    value = config.get(key)
    if value is None:
        return default
    try:
        if isinstance(value, bool):
            raise ValueError
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not 0 <= seconds < math.inf:  # NaN fails this too
        raise ValueError(f"{key} must be a number of seconds, 0 or more, got {value!r}")
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


# Context wrapping --------------------------------------------------------------

# Flask 3.2 folds the request context into the app context: a copied app context
# carries the request and session, and RequestContext becomes a deprecated alias.
_APP_CONTEXT_HOLDS_REQUEST = hasattr(AppContext, "has_request")

if not _APP_CONTEXT_HOLDS_REQUEST:
    from flask.ctx import RequestContext as _RequestContext
    from flask.globals import request_ctx

    class _TaskRequestContext(_RequestContext):
        """A request context for a task: the request it shares was matched to its
        URL rule when it arrived, so matching it again for every task is skipped."""

        def match_request(self) -> None:
            pass


class _CapturedContexts:
    """The contexts a task was submitted from, as the task needs them in its
    worker: the app, a snapshot of ``g``, and the request and session if any.

    Each task gets context objects of its own, because Flask records the pushes of
    a context in the context object: two threads pushing the same one at once
    corrupt each other's state (Flask-Executor 1.0's ``map`` in a request)."""

    __slots__ = ("app", "g_values", "original", "request", "session")

    def __init__(self, app: flask.Flask | None) -> None:
        self.request: Request | None = None
        self.session: Any = None
        self.original: AppContext | None = None
        if flask.has_app_context():
            original: AppContext = cast(Any, app_ctx)._get_current_object()
            self.app = original.app
            g_values = vars(original.g)
            self.g_values = dict(g_values) if g_values else None
            if _APP_CONTEXT_HOLDS_REQUEST:
                # Copied now, while the request is live; tasks copy this copy, which is
                # never pushed, whenever they start.
                self.original = original.copy()  # type: ignore[attr-defined]
            elif flask.has_request_context():
                current: RequestContext = cast(Any, request_ctx)._get_current_object()
                self.request = _request_for_task(current.request)
                self.session = current.session
        elif app is not None:
            self.app = app
            self.g_values = None
        else:
            raise RuntimeError(
                "the executor is not bound to an app: call init_app(app) before submitting tasks"
            )

    def app_context(self) -> AppContext:
        """A fresh app context whose ``g`` starts as the snapshot (and which, on
        Flask 3.2 and later, carries the request)."""
        if _APP_CONTEXT_HOLDS_REQUEST and self.original is not None:
            context: AppContext = self.original.copy()  # type: ignore[attr-defined]
        else:
            context = self.app.app_context()
        if self.g_values:
            vars(context.g).update(self.g_values)
        return context

    def take_request_context(self) -> RequestContext | None:
        """The request context for a task about to run in this thread.

        Making one builds a URL adapter, which costs more than the rest of a small
        task, so each thread keeps the last one it popped (keep_request_context)
        and reuses it for the next task from the same request: a context may be
        pushed again by the thread that popped it. A context in use is not kept,
        so a task run inline inside another gets its own. Each worker thread keeps
        at most one request alive this way."""
        if self.request is None:
            return None
        kept = getattr(_this_thread, "request_context", None)
        # Each submit makes its own request object, over the same attributes.
        if kept is not None and kept[0] is vars(self.request) and kept[1] is self.session:
            _this_thread.request_context = None
            context: RequestContext = kept[2]
            return context
        return _TaskRequestContext(self.app, self.request.environ, self.request, self.session)

    def keep_request_context(self, context: RequestContext) -> None:
        _this_thread.request_context = (vars(self.request), self.session, context)


_this_thread = threading.local()


def _request_for_task(request: Request) -> Request:
    """The request as a task sees it: the same in every respect but one.

    Popping a request context closes the request's uploaded files, and a task's
    context must not close them under the view, which may still be reading them.
    So a task gets another object of a subclass whose ``close()`` does nothing, and
    which shares the request's attribute dictionary: what either side parses (the
    form, the files, the consumed input stream) the other sees."""
    request_class = type(request)
    task_class = _request_classes_that_stay_open.get(request_class)
    if task_class is None:
        task_class = type(request_class.__name__, (request_class,), {"close": _keep_files_open})
        task_class = _request_classes_that_stay_open.setdefault(request_class, task_class)
    shared = object.__new__(task_class)
    shared.__dict__ = request.__dict__
    return shared


_request_classes_that_stay_open: dict[type[Request], type[Request]] = {}


def _keep_files_open(request: Request) -> None:
    pass


# The future of the task running in this thread, for report_progress().
_current_future: contextvars.ContextVar[TaskFuture[Any] | None] = contextvars.ContextVar(
    "flask_executor.current_future", default=None
)


class _TaskSettings(NamedTuple):
    """What every task of an executor needs to know about its app, set by init_app."""

    app: flask.Flask
    push_app_context: bool
    log_exceptions: bool


class _Task:
    """One call of a submitted function, run by a thread (or inline, in sync mode)
    inside fresh copies of the contexts it was submitted from."""

    __slots__ = ("args", "captured", "fn", "future", "kwargs", "slots")

    def __init__(
        self,
        future: TaskFuture[Any],
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        captured: _CapturedContexts | None,
    ) -> None:
        self.future = future
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.captured = captured
        # The queue slot the task holds (see _make_slots), freed when it is done.
        self.slots: threading.BoundedSemaphore | None = None

    def run(self) -> None:
        future = self.future
        if not future.set_running_or_notify_cancel():
            if self.slots is not None:
                self.slots.release()
            return
        token = _current_future.set(future)
        # Made here rather than at submit (g was copied then), so that a task waiting in
        # the queue holds fewer objects for the cyclic garbage collector to traverse.
        app_context = self.captured.app_context() if self.captured is not None else None
        request_context = None
        error: BaseException | None = None
        try:
            if app_context is not None:
                app_context.push()
                request_context = self.captured.take_request_context()  # type: ignore[union-attr]
                if request_context is not None:
                    request_context.push()
            result = self.fn(*self.args, **self.kwargs)
            if isinstance(result, types.CoroutineType):
                result = _await(result)
        except BaseException as exception:
            error = exception
            settings = future._settings
            if settings is not None and settings.log_exceptions:
                settings.app.logger.error("Task %s failed", _describe(self.fn), exc_info=exception)
            # Still inside the contexts, so that done callbacks run in them too.
            future.set_exception(exception)
        else:
            future.set_result(result)
        finally:
            _current_future.reset(token)
            try:
                self._pop_contexts(app_context, request_context, error)
            except Exception:
                logger = future._settings.app.logger if future._settings is not None else _logger
                logger.exception("A teardown function failed after task %s", _describe(self.fn))
            if self.slots is not None:
                self.slots.release()
            error = None  # break the cycle through the traceback

    def _pop_contexts(
        self,
        app_context: AppContext | None,
        request_context: RequestContext | None,
        error: BaseException | None,
    ) -> None:
        try:
            if request_context is not None:
                request_context.pop(error)
                self.captured.keep_request_context(request_context)  # type: ignore[union-attr]
        finally:
            if app_context is not None:
                app_context.pop(error)


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
        if error is future.exception() and settings.log_exceptions:
            return  # propagate_exceptions_callback re-raised a failure already logged
        settings.app.logger.error("Done callback %s of a task failed", _describe(fn), exc_info=error)


def _run_in_worker(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    app_reference: tuple[str, str | None] | None,
    call_id: str | None,
) -> Any:
    """Runs a task in another process, inside an app context of the same app when
    one can be had there: the parent's own app in a forked worker, else the one
    named by ``EXECUTOR_PROCESS_APP``."""
    # A forked worker starts with the context variables of the thread that forked
    # it, that thread's request included: a task must not see them.
    return contextvars.Context().run(_run_here, fn, args, kwargs, app_reference)


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


def _check_picklable(fn: Callable[..., Any]) -> None:
    try:
        if fn in _picklable_functions:
            return
    except TypeError:  # not hashable, or not weakly referable: check it every time
        pass
    try:
        pickle.dumps(fn)
    except Exception as error:
        raise TypeError(
            f"{_describe(fn)} cannot be sent to a process pool because it cannot be pickled"
            f" ({error}): submit a function defined at module level (not a lambda, closure or"
            " nested function), or use EXECUTOR_TYPE='thread'"
        ) from None
    try:
        _picklable_functions.add(fn)
    except TypeError:
        pass


# Functions already pickled once, so that each is checked on its first submit only.
_picklable_functions: weakref.WeakSet[Callable[..., Any]] = weakref.WeakSet()


def _describe(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


# Pools ---------------------------------------------------------------------------

_FUTURE_ATTRIBUTES = frozenset(dir(TaskFuture()))

# Apps by init_app call, inherited by process workers forked from this process.
_apps_for_forked_workers: weakref.WeakValueDictionary[str, flask.Flask] = weakref.WeakValueDictionary()
# Apps a spawned process worker loaded from EXECUTOR_PROCESS_APP, by import string.
_apps_loaded_in_worker: dict[str, flask.Flask] = {}
# Where report_progress() writes in a process worker, whose reports go nowhere.
_progress_sink: TaskFuture[Any] = TaskFuture()

# Process pools that broke, kept alive a while. A broken pool fails its futures in
# its own manager thread, holding its shutdown lock, and so runs our callbacks
# there; if they dropped the last reference to the pool, its collection callback
# would take that same lock, and the thread would wait for itself forever.
_broken_pools: collections.deque[concurrent.futures.Executor] = collections.deque(maxlen=8)

_live_executors: weakref.WeakSet[Executor] = weakref.WeakSet()
_live_thread_pools: weakref.WeakSet[_ThreadPool] = weakref.WeakSet()
# Every worker thread until it ends, including those of pools already shut down
# or dropped, so that at exit the tasks they accepted still complete.
_worker_threads: set[threading.Thread] = set()


class _ThreadPool:
    """The thread pool behind ``EXECUTOR_TYPE = 'thread'``.

    Not :class:`~concurrent.futures.ThreadPoolExecutor`, because that one makes a
    future of its own for every task and completes it after the function returns,
    outside the task's contexts. Here the task completes its :class:`TaskFuture`
    inside them, so done callbacks run there, and a task costs one future, not two.
    """

    def __init__(self, max_workers: int, thread_name_prefix: str) -> None:
        self._max_workers = max_workers
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
            self._queue.put(task)
            # A thread for each of the first max_workers tasks, then no more: it saves
            # counting idle workers on every submit, for at most max_workers idle threads.
            if len(self._threads) < self._max_workers:
                thread = threading.Thread(
                    target=_work,
                    args=(self._queue,),
                    name=f"{self._thread_name_prefix}_{len(self._threads)}",
                    # Daemon, so that an idle pool never keeps the interpreter alive;
                    # _finish_thread_pools_at_exit lets accepted tasks complete.
                    daemon=True,
                )
                _worker_threads.add(thread)
                thread.start()
                self._threads.append(thread)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shut_down = True
            if cancel_futures:
                while True:
                    try:
                        task = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if task is not None:
                        if task.slots is not None:
                            task.slots.release()
                        task.future.cancel()
            self._queue.put(None)
        if wait:
            for thread in self._threads:
                thread.join()


def _work(tasks: queue.SimpleQueue[_Task | None]) -> None:
    while True:
        task = tasks.get()
        if task is None:
            tasks.put(None)  # for the next worker
            _worker_threads.discard(threading.current_thread())
            return
        task.run()
        del task


_Pool = _ThreadPool | concurrent.futures.Executor


def _make_pool(config: _Config, name: str) -> _Pool:
    if config.kind == "thread":
        return _ThreadPool(_worker_count(config), f"flask_executor_{name}" if name else "flask_executor")
    if config.kind == "process":
        options: dict[str, Any] = {"max_workers": _worker_count(config)}
        if config.mp_context is not None:
            import multiprocessing  # here: thread pools never need it, and it is slow to import

            options["mp_context"] = multiprocessing.get_context(config.mp_context)
        if config.max_tasks_per_child is not None:
            options["max_tasks_per_child"] = config.max_tasks_per_child
        return concurrent.futures.ProcessPoolExecutor(**options)
    return _make_foreign_pool(config)


def _make_foreign_pool(config: _Config) -> concurrent.futures.Executor:
    assert config.factory is not None
    options = {} if config.max_workers is None else {"max_workers": config.max_workers}
    try:
        pool = config.factory(**options)
    except Exception as error:
        raise ValueError(
            f"{config.prefix}TYPE={config.factory!r} failed to make an executor: {error!r}"
        ) from error
    if not isinstance(pool, concurrent.futures.Executor):
        raise ValueError(
            f"{config.prefix}TYPE={config.factory!r} returned {pool!r}, which is not a"
            " concurrent.futures.Executor"
        )
    return pool


def _take_slot(slots: threading.BoundedSemaphore, timeout: float) -> bool:
    return slots.acquire(timeout=timeout) if timeout else slots.acquire(blocking=False)


def _make_slots(config: _Config) -> threading.BoundedSemaphore | None:
    """A slot for each task that may be running or waiting, as EXECUTOR_QUEUE_SIZE
    allows; a task frees its slot when it is done. Once every worker is busy, the
    slots left are those for waiting tasks."""
    if config.queue_size is None or config.kind == "sync":
        return None
    return threading.BoundedSemaphore(config.queue_size + _worker_count(config))


def _worker_count(config: _Config) -> int:
    if config.max_workers is not None:
        return config.max_workers
    if config.kind == "thread":
        return min(32, (os.cpu_count() or 1) + 4)  # as concurrent.futures.ThreadPoolExecutor
    return os.cpu_count() or 1


def _forget_pools_after_fork() -> None:
    _live_thread_pools.clear()
    _worker_threads.clear()
    for executor in list(_live_executors):
        executor._after_fork_in_child()


def _finish_thread_pools_at_exit() -> None:
    for pool in list(_live_thread_pools):
        pool.shutdown(wait=False)
    for thread in list(_worker_threads):
        thread.join()


os.register_at_fork(after_in_child=_forget_pools_after_fork)
atexit.register(_finish_thread_pools_at_exit)
