"""Tasks for a process pool, and the app its workers load (docs: process pools).

A process pool sends each task to another process by pickling it, so a task is a
function defined at module level, in a module that the workers can import.
"""

import math

from flask import Flask, current_app

from flask_executor import Executor

executor = Executor(name="cpu")


def create_app():
    """The app factory, called once by the web process and once by each spawned worker."""
    app = Flask(__name__)
    app.config.update(
        CPU_EXECUTOR_TYPE="process",
        CPU_EXECUTOR_MAX_WORKERS=2,
        CPU_EXECUTOR_MP_CONTEXT="spawn",
        # How a spawned worker gets an app context: it calls this factory once.
        CPU_EXECUTOR_PROCESS_APP="cpu_tasks:create_app()",
        PRIME_LIMIT_NAME="primes below",
    )
    executor.init_app(app)
    return app


def count_primes(below):
    """CPU-bound work, which threads cannot run in parallel."""
    sieve = bytearray([1]) * below
    sieve[:2] = b"\0\0"
    for number in range(2, math.isqrt(below) + 1):
        if sieve[number]:
            sieve[number * number :: number] = bytearray(len(range(number * number, below, number)))
    return f"{sum(sieve)} {current_app.config['PRIME_LIMIT_NAME']} {below}"


@executor.job
def square(number):
    return number * number
