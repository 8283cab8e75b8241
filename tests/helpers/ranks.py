"""What each process of a 2-process fit saw, brought back to the test: saved per rank, loaded, compared.

``ddp_spawn`` sends no callback state back to the parent process: a callback saves each rank's state with
:func:`save_rank_state` (``rank{r}.pt`` in a folder), the test loads them with :func:`rank_states` and checks that
the ranks agree with :func:`assert_ranks_agree`.

Start methods: each capability keeps one 2-process test under ``ddp_spawn`` (``start_method="spawn"``), the way a
user launches DDP on a CPU, which also proves that it pickles and works in a fresh interpreter. Its other 2-process
tests fork the test process (``ddp_fork``): a forked rank inherits the imports, where a spawned one spends about 6 s
of a 2-core CPU importing torch and Lightning again. The cross-rank helpers of ``lightning_nt.common`` have
forked tests of their own and run spawned inside every capability's spawned test.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

__all__ = ["assert_ranks_agree", "rank_states", "save_rank_state"]


def save_rank_state(trainer: pl.Trainer, directory: Path | str, state: Any) -> None:
    """Save ``state`` as this process's (``rank{global_rank}.pt`` in ``directory``)."""
    torch.save(state, Path(directory) / f"rank{trainer.global_rank}.pt")


def rank_states(directory: Path | str, ranks: int = 2) -> list[Any]:
    """The states the ``ranks`` processes saved with :func:`save_rank_state`, in rank order."""
    return [torch.load(Path(directory) / f"rank{rank}.pt") for rank in range(ranks)]


def assert_ranks_agree(states: Sequence[Any], ignore: Collection[str] = (), approx: Collection[str] = ()) -> None:
    """Every rank's state equals rank 0's: tensors bit for bit (shape and dtype too), other values with ``==``,
    mappings key by key and sequences item by item. Keys in ``ignore`` (a timing, say) are skipped and keys in
    ``approx`` compared with ``pytest.approx``, at any depth. A failure names the rank and the path to the value."""
    for rank, state in enumerate(states[1:], start=1):
        _assert_same(states[0], state, f"rank {rank}: state", ignore, approx)


def _assert_same(expected: Any, actual: Any, path: str, ignore: Collection[str], approx: Collection[str]) -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{path}: {type(actual).__name__} where rank 0 has a tensor"
        assert (actual.shape, actual.dtype) == (expected.shape, expected.dtype), f"{path}: shape or dtype differs"
        assert torch.equal(actual, expected), f"{path}: differs from rank 0's"
    elif isinstance(expected, Mapping):
        assert isinstance(actual, Mapping), f"{path}: {type(actual).__name__} where rank 0 has a mapping"
        assert set(actual) - set(ignore) == set(expected) - set(ignore), f"{path}: keys differ from rank 0's"
        for key in expected.keys() - set(ignore):
            if key in approx:
                assert actual[key] == pytest.approx(expected[key]), f"{path}[{key!r}]: differs from rank 0's"
            else:
                _assert_same(expected[key], actual[key], f"{path}[{key!r}]", ignore, approx)
    elif isinstance(expected, list | tuple):
        assert type(actual) is type(expected) and len(actual) == len(expected), f"{path}: length or type differs"
        for index, (mine, theirs) in enumerate(zip(expected, actual)):
            _assert_same(mine, theirs, f"{path}[{index}]", ignore, approx)
    else:
        assert actual == expected, f"{path}: {actual!r} where rank 0 has {expected!r}"
