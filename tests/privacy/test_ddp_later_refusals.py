"""A refusal met on one rank on a later step stops every rank with that refusal (issue 10).

Under ``DPDDPStrategy`` on 2 processes, rank 1 alone meets each refusal of ``ddp_script_later_refusals.CASES`` from
step ``TRIGGER`` on (its batch or module does what the refusal names; rank 0's never does). Rank 1 used to raise it
alone while rank 0 waited in the step's all-reduce and failed with gloo's "Connection closed by peer": rank 0's log
did not say why. Now the refusing rank holds its refusal, its contribution to the step's all-reduce is NaN with a
flag beside it, and every rank raises the refusal (naming rank 1) at the start of the next step, before its update:
the refused step's update is all-NaN on every rank, so nothing of it was released.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers.scripts import ROOT
from tests.privacy.ddp_script_later_refusals import CASES, TRIGGER

REFUSALS = {  # case: what its refusal says
    "bag": "is pooled by an EmbeddingBag with per_sample_weights",
    "extra_input": "was called with inputs ['scale'] that Opacus can't replay",
    "dropout": "draws random numbers while training in ['drop']",
    "rows": "The trainable layers saw these rows in dimension 0 of their inputs",
    "draw": "draws random numbers in its forward pass",
    "unused": "got a gradient but no per-example gradient",
    "keyword": "was called without a tensor as its first positional input",
    "twice": "ran twice in one training step",
    "last_step": "is pooled by an EmbeddingBag with per_sample_weights",  # raised at the end of training
    "checkpoint": "is pooled by an EmbeddingBag with per_sample_weights",  # raised before the checkpoint is written
    "budget_stop": "is pooled by an EmbeddingBag with per_sample_weights",  # raised in the step the budget skips
    "physical_parts": "is pooled by an EmbeddingBag with per_sample_weights",  # in the batch's first physical part
}
PROCESS_GROUP_TIMEOUT = 120  # s: a rank left waiting in a collective fails by then, not the test run
LIMIT = 400  # s for the whole run of both processes (about 20 s on an idle 2-core machine)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def later_refusals(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, dict[str, object]]]:
    """Both ranks' results over every case, from one pair of processes started here (``LOCAL_RANK`` set: Lightning
    launches nothing), each bounded in time so that a rank left waiting fails the tests instead of blocking them."""
    folder = tmp_path_factory.mktemp("later_refusals")
    environment = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "CUDA_VISIBLE_DEVICES": "",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "NODE_RANK": "0",
    }
    command = [sys.executable, str(ROOT / "tests/privacy/ddp_script_later_refusals.py"), str(folder)]
    processes = [
        subprocess.Popen(
            [*command, str(PROCESS_GROUP_TIMEOUT)],
            env={**environment, "LOCAL_RANK": str(rank)},
            cwd=folder,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    deadline = time.monotonic() + LIMIT
    errors = []
    for process in processes:
        try:
            errors.append(process.communicate(timeout=max(deadline - time.monotonic(), 1))[1])
        except subprocess.TimeoutExpired:
            for each in processes:
                each.kill()
            pytest.fail(f"the 2-process run did not end within {LIMIT} s: a rank waited in a collective")
    return [
        torch.load(folder / f"rank{rank}.pt") if (folder / f"rank{rank}.pt").exists() else {"stderr": errors[rank]}
        for rank in range(2)
    ]


@pytest.mark.ddp
@pytest.mark.parametrize("case", list(CASES))
def test_a_refusal_met_by_one_rank_on_a_later_step_stops_every_rank_with_it(later_refusals, case):
    """Every rank raises rank 1's refusal, naming rank 1, at the start of the step after the refused one (whose update
    is all-NaN on every rank: nothing released; the trainable weights are NaN)."""
    for rank, results in enumerate(later_refusals):
        assert case in results, f"rank {rank} did not reach case {case!r}: {str(results)[-3000:]}"
        met = results[case]
        assert met["error"] is not None and met["error"].startswith("RuntimeError: "), (rank, met)
        assert REFUSALS[case] in met["error"], (rank, met["error"])
        assert "(Found on rank 1 of 2 in a step after the first" in met["error"], (rank, met["error"])
        skipped = case == "budget_stop"  # no update at all: the step the budget skips is raised in
        assert met["steps"] == TRIGGER + (not skipped), (rank, met)
        assert met["nan"] != skipped, f"rank {rank}: the refused step's update was not all-NaN (or a skipped one was)"
        # a checkpoint after every step: those of the steps before the refused one only (step=N: N steps taken)
        assert met["checkpoints"] == (
            [f"epoch=0-step={step}.ckpt" for step in range(1, TRIGGER + 1)] if case == "checkpoint" else []
        )
