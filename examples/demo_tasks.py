"""Task functions for the Flask-Executor demo that don't need Flask.

``csv_stats`` runs on a *process* pool, so it has to be picklable: a plain
module-level function in an importable module, taking plain data (the CSV
text) rather than request objects.  ``count_primes`` runs on a thread pool
and reports its progress with :func:`flask_executor.report_progress`.
"""

import csv
import io
import math
import os
import statistics
import time


def _number(text):
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _mean(data):
    try:
        return statistics.fmean(data)
    except OverflowError:  # the sum of values near the float maximum overflows; their mean does not
        return math.fsum(value / len(data) for value in data)


def csv_stats(text, name=None):
    """Return count, mean, min and max of every numeric column of ``text``.

    A column is numeric when each of its non-empty cells parses as a number.
    ``columns`` lists the numeric columns and ``non_numeric`` the names of the
    others, both in the order of the file.  The result is plain data (it is
    pickled back to the web process)::

        {"name": "prices.csv", "rows": 3,
         "columns": [{"name": "price", "count": 3, "mean": 2.0, "min": 1.0, "max": 3.0}],
         "non_numeric": ["item"], "pid": 4242}
    """
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if not header:
        raise ValueError("the CSV file is empty")
    header = [title.strip() or f"column {i + 1}" for i, title in enumerate(header)]
    # By position, not by name: two columns may have the same name.
    values = [[] for _ in header]
    numeric = [True] * len(header)
    rows = 0
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        rows += 1
        for i, cell in enumerate(row[: len(header)]):
            cell = cell.strip()
            if not cell or not numeric[i]:
                continue
            number = _number(cell)
            if number is None:
                numeric[i] = False
            else:
                values[i].append(number)
    columns, non_numeric = [], []
    for i, title in enumerate(header):
        data = values[i]
        if numeric[i] and data:
            columns.append(
                {"name": title, "count": len(data), "mean": _mean(data), "min": min(data), "max": max(data)}
            )
        else:
            non_numeric.append(title)
    return {
        "name": name,
        "rows": rows,
        "columns": columns,
        "non_numeric": non_numeric,
        "pid": os.getpid(),  # shows that a worker process did the work
    }


def _base_primes(limit):
    sieve = bytearray([1]) * (limit + 1)
    sieve[0:2] = b"\x00\x00"
    for i in range(2, math.isqrt(limit) + 1):
        if sieve[i]:
            sieve[i * i :: i] = bytes(len(range(i * i, limit + 1, i)))
    return [i for i, is_prime in enumerate(sieve) if is_prime]


def count_primes(limit, steps=20, delay=0.0, report=None):
    """Count the primes below ``limit`` with a segmented sieve in ``steps`` chunks.

    After each chunk ``report(done, total, message)`` is called (if given) and
    the function sleeps ``delay`` seconds, so that a demo can show progress.
    """
    limit = max(int(limit), 2)
    steps = max(1, min(int(steps), limit))
    base = _base_primes(math.isqrt(limit))
    count = 0
    chunk = -(-limit // steps)  # ceil
    for step in range(steps):
        lo, hi = step * chunk, min((step + 1) * chunk, limit)
        if lo < hi:
            segment = bytearray([1]) * (hi - lo)
            for n in range(lo, min(hi, 2)):
                segment[n - lo] = 0
            for p in base:
                start = max(p * p, -(-lo // p) * p)
                if start >= hi:
                    continue
                segment[start - lo :: p] = bytes(len(range(start, hi, p)))
            count += sum(segment)
        if report is not None:
            report(step + 1, steps, f"{count:,} primes below {hi:,}")
        if delay:
            time.sleep(delay)
    return count
