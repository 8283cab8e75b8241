import os
import random

import numpy
import pytest
import torch


def pytest_configure(config):
    """Under pytest-xdist (``-n auto``), each worker takes an equal share of the cores for torch's threads, and so do
    the processes it spawns (DDP ranks, scripts): two workers of two threads each on a 2-core machine spend their
    time in OpenMP's barriers. Tests that need a thread count set it themselves.

    Threads that wait at an OpenMP barrier sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``, read by every
    process started from here on, the workers included): a test that runs at two threads beside another worker
    otherwise spins on the core that worker needs (the averaging demo at two threads beside a busy core: 24 s
    spinning, 14.5 s sleeping; 7 s alone). It changes when threads wait, not what they compute."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // int(workers))  # the cores -n auto counts
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """The slow tests and the 2-process ones first, each group in its order, so that a minute-long test is never
    left for the end while the other workers have finished: pytest-xdist (``--dist worksteal`` in ``pyproject.toml``)
    gives each worker a consecutive share, and a worker that has run out takes half of the tests another has not
    started, from the end of its share, down to those slow ones. Without a CUDA device, the ``cuda``-marked tests
    are skipped."""
    items.sort(key=lambda item: not ("slow" in item.keywords or "ddp" in item.keywords))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _same_random_state_for_every_test():
    """Every test starts from one random state, whatever ran before it: under pytest-xdist the tests a worker runs,
    and so the draws an unseeded test sees, change from run to run, and a test must not pass or fail by its place."""
    random.seed(0)
    numpy.random.seed(0)
    torch.manual_seed(0)
