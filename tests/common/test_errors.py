"""``common.errors``: an error from deep inside PyTorch raised again with its cause and fix, and no other."""

from __future__ import annotations

from contextlib import AbstractContextManager

import pytest

from lightning_nt.common.errors import explained_errors


def _explained() -> AbstractContextManager[None]:
    return explained_errors(lambda text: "saved tensor hooks" in text, lambda error: f"Explained ({error}).")


def test_a_matching_runtime_error_is_explained_and_chained() -> None:
    original = RuntimeError("torch.func transforms don't yet support saved tensor hooks")
    with pytest.raises(RuntimeError, match=r"^Explained \(torch\.func .*\)\.$") as raised, _explained():
        raise original
    assert raised.value.__cause__ is original


@pytest.mark.parametrize("error", [RuntimeError("CUDA out of memory"), ValueError("saved tensor hooks")], ids=repr)
def test_any_other_error_passes_unchanged(error: Exception) -> None:
    with pytest.raises(type(error)) as raised, _explained():
        raise error
    assert raised.value is error
