"""Activation checkpointing under ghost clipping, and lazy modules under every engine: refused before any release,
naming the cause and the fix (they were Opacus's "Parameter tying is not supported with Ghost Clipping" and a
"training_step changed the module's parameters" that blamed the user's step)."""

from __future__ import annotations

import traceback

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tests.privacy.test_audit import DIM, Audited, _fit, _refused_before_any_release


class ChecksPointsItsHiddenLayer(Audited):
    """The hidden layer under (non-reentrant) activation checkpointing: the backward pass runs it again."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.out(checkpoint(lambda x: torch.tanh(self.fc(x)), inputs, use_reentrant=False))


class ChecksPointsItsHeadReentrantly(Audited):
    """The output layer under reentrant checkpointing: run without grad in the forward pass, again in the backward."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.out, torch.tanh(self.fc(inputs)), use_reentrant=True)


class ChecksPointsItsHead(Audited):
    """The output layer under non-reentrant checkpointing, which stops re-running it before its output: the layer's
    call completes once, and ghost clipping clips it exactly."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.out, torch.tanh(self.fc(inputs)), use_reentrant=False)


@pytest.mark.parametrize(
    ("module", "layer"), [(ChecksPointsItsHiddenLayer, "fc"), (ChecksPointsItsHeadReentrantly, "out")]
)
def test_ghost_clipping_refuses_a_layer_rerun_by_activation_checkpointing(module, layer):
    # was Opacus's NotImplementedError "Parameter tying is not supported with Ghost Clipping" (non-reentrant), and
    # a row count of the layer's calls blaming the batch layout on the second step (reentrant)
    _refused_before_any_release(
        module(per_example=True),
        rf"Activation checkpointing .* ran layer '{layer}' again in the backward pass.*Turn activation checkpointing "
        "off for DP training",
        grad_sample_mode="ghost",
    )


def test_ghost_clipping_still_clips_a_checkpointed_layer_it_sees_once():
    trained = {}
    for module in (Audited, ChecksPointsItsHead):
        torch.manual_seed(0)
        trained[module] = module(per_example=True)
        _fit(trained[module], grad_sample_mode="ghost")
    for plain, checkpointed in zip(trained[Audited].parameters(), trained[ChecksPointsItsHead].parameters()):
        assert torch.equal(plain, checkpointed)


class Lazy(Audited):
    """The hidden layer an ``nn.LazyLinear``, whose parameters the first forward pass creates."""

    def __init__(self, per_example: bool = False) -> None:
        super().__init__(per_example)
        self.fc = nn.LazyLinear(DIM)


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk"])
def test_a_lazy_module_is_refused_before_any_step_naming_the_fix(mode):
    # was "training_step changed the module's ['fc.bias', 'fc.weight'] itself" (hooks, ghost) and "neither a
    # book-keeping nor an Opacus per-sample rule" (bk)
    module = Lazy(per_example=mode == "ghost")
    with pytest.raises(RuntimeError, match=r"Modules \['fc'\] are lazy .* Materialise them before fit") as raised:
        _fit(module, grad_sample_mode=mode)
    assert "training_step" not in "".join(traceback.format_tb(raised.tb))  # refused before any step
    assert module.fc.has_uninitialized_params()  # no forward pass ran on the private data


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk"])
def test_a_lazy_module_materialised_before_fit_trains_as_its_eager_twin(mode):
    lazy, eager = Lazy(per_example=mode == "ghost"), Audited(per_example=mode == "ghost")
    lazy(torch.zeros(1, DIM))  # materialised on a dummy input: the fix the refusal names
    eager.load_state_dict(lazy.state_dict())
    initial = lazy.fc.weight.detach().clone()
    for model in (lazy, eager):
        _fit(model, grad_sample_mode=mode)
    assert type(lazy.fc) is nn.Linear and not torch.equal(lazy.fc.weight, initial)
    for trained, twin in zip(lazy.parameters(), eager.parameters(), strict=True):
        assert torch.equal(trained, twin)
