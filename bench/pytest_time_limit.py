"""A pytest plugin without a conftest: the GPU check's time limits on the GPU tests.

``bench/gpu_check.py`` loads it for the GPU tests (``python -m pytest -p pytest_time_limit``, with ``bench/`` on
``PYTHONPATH``); each part is off unless its variable is set (and non-zero):

- ``$FSQ_TRITON_TEST_TIME_LIMIT`` (seconds): fail any test that runs longer, so that one test that hangs or crawls
  costs its own limit, not the whole GPU window: SIGALRM raises ``TimeoutError`` inside the test, which fails, and
  the run goes on with the next test. A test stuck inside one CUDA call only sees the alarm when the call returns;
  ``-o faulthandler_timeout`` (set by the driver too) then dumps its stack into the log. Unix only.
- ``$FSQ_TRITON_TEST_SAMPLE`` (k): a representative subset: every test function runs, with at most k of its
  parametrizations, evenly spread over its list (k=2: the first and the last); the others are deselected, and a
  line ``sample: kept N of M tests`` follows the collection report.
- ``$FSQ_TRITON_TEST_DEADLINE`` (a ``time.time()`` value): a test that has not started by then is skipped ("out of
  time"), so that pytest ends by itself and writes its JUnit XML before the driver's kill.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

ENV = "FSQ_TRITON_TEST_TIME_LIMIT"
SAMPLE_ENV = "FSQ_TRITON_TEST_SAMPLE"
DEADLINE_ENV = "FSQ_TRITON_TEST_DEADLINE"
_SAMPLED = pytest.StashKey[tuple]()


def sample(items: list, k: int) -> list:
    """At most ``k`` items of each test function (its parametrizations, evenly spread), in their order."""
    groups: dict[str, list] = {}
    for item in items:
        groups.setdefault(item.nodeid.split("[", 1)[0], []).append(item)
    keep = set()
    for members in groups.values():
        n = len(members)
        picks = range(n) if n <= k else {0} if k == 1 else {round(i * (n - 1) / (k - 1)) for i in range(k)}
        keep.update(id(members[i]) for i in picks)
    return [item for item in items if id(item) in keep]


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected theirs
def pytest_collection_modifyitems(config, items):
    k = int(os.environ.get(SAMPLE_ENV) or 0)
    if k <= 0:
        return
    kept = sample(items, k)
    dropped = [item for item in items if item not in kept]
    config.stash[_SAMPLED] = (len(kept), len(items), k)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_report_collectionfinish(config):
    if _SAMPLED in config.stash:
        kept, total, k = config.stash[_SAMPLED]
        return f"sample: kept {kept} of {total} tests (at most {k} parametrizations of each test function, ${SAMPLE_ENV})"
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    deadline = float(os.environ.get(DEADLINE_ENV) or 0)
    if deadline and time.time() > deadline:
        pytest.skip(f"out of time: the GPU check's deadline for starting tests has passed (${DEADLINE_ENV})")


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
