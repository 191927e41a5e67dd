"""A pytest plugin without a conftest: fail any test that runs longer than ``$FSQ_TRITON_TEST_TIME_LIMIT`` seconds.

``bench/gpu_check.py`` loads it for the GPU tests (``python -m pytest -p pytest_time_limit``, with ``bench/`` on
``PYTHONPATH``) so that one test that hangs or crawls costs its own limit, not the whole GPU window: SIGALRM
raises ``TimeoutError`` inside the test, which fails, and the run goes on with the next test. A test stuck
inside one CUDA call only sees the alarm when the call returns; ``-o faulthandler_timeout`` (set by the driver
too) then dumps its stack into the log. Unix only; no limit when the variable is unset or 0.
"""

from __future__ import annotations

import os
import signal

import pytest

ENV = "FSQ_TRITON_TEST_TIME_LIMIT"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    limit = float(os.environ.get(ENV) or 0)
    if limit <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expired(signum, frame):
        raise TimeoutError(f"{item.nodeid} ran past its time limit of {limit:g} s (${ENV})")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
