import os

import pytest
import torch


def pytest_configure(config):
    """Under pytest-xdist (``-n auto``), each worker takes an equal share of the cores for torch's threads, and so do
    the processes it spawns (DDP ranks, scripts): two workers of two threads each on a 2-core machine spend their
    time in OpenMP's barriers. Tests that need a thread count set it themselves."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        threads = max(1, (os.cpu_count() or 1) // int(workers))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
