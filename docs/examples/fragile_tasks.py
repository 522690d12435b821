"""Tasks for the reliability page: one kills its worker process (docs: reliability)."""

import os


def crash():
    os._exit(1)  # as the out-of-memory killer would end the worker


def square(number):
    return number * number
