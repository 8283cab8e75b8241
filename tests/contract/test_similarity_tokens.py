"""RepresentationSimilarity on the zoo's token model (``gpt_style``: a GPT-2 block as ``transformers`` writes it, its
``NewGELU`` on ``[batch, tokens, features]``): the units of a token model's activations are its features, not its
token positions (found: with the units read along dimension 1, a copy with its MLP units permuted, the same function,
scored CKA 0.008)."""

import copy

import pytest
import torch

from lightning_nt import RepresentationSimilarity
from tests.helpers.trainer import tiny_trainer
from tests.helpers.zoo import GPTStyle


class _Frozen(GPTStyle):
    """The zoo's GPT-2 block, not trained (learning rate 0): the measured network stays the reference's function."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _mlp_units_permuted(module):
    permuted, order = copy.deepcopy(module), torch.randperm(16, generator=torch.Generator().manual_seed(0))
    first, last = permuted.net.mlp[0], permuted.net.mlp[2]  # transformers' Conv1D: weight [in, out]
    with torch.no_grad():
        first.weight.copy_(first.weight[:, order])
        first.bias.copy_(first.bias[order])
        last.weight.copy_(last.weight[order])
    return permuted


def test_a_copy_with_its_mlp_units_permuted_is_the_same_representation(tmp_path):
    torch.manual_seed(0)
    module = _Frozen()
    reference = _mlp_units_permuted(module)
    tokens = next(iter(module.train_dataloader()))[0]
    torch.testing.assert_close(reference(tokens), module(tokens))
    monitor = RepresentationSimilarity(layers=["net.mlp.1"], reference=reference, num_examples=16)
    tiny_trainer(tmp_path, callbacks=[monitor]).fit(module)
    for metric in ("cka", "intertwiner", "orthogonal_procrustes"):
        assert monitor.history[-1][f"similarity/{metric}/net.mlp.1"] == pytest.approx(1.0, abs=1e-6)
    assert "| net.mlp.1 | gelu |" in monitor.table()
