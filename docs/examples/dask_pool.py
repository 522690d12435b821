"""Tasks sent to a Dask cluster (docs: process pools).

Configure ``EXECUTOR_TYPE = "dask_pool:dask_executor"``; the scheduler's address
comes from the environment here, ``tcp://scheduler.internal:8786`` in production.
"""

import os

import distributed


def dask_executor():
    client = distributed.Client(os.environ["DASK_SCHEDULER"])
    # pure=False: each call runs, even with the same arguments as an earlier one.
    return client.get_executor(pure=False)
