import copy

import pytest
import torch
from scipy.stats import kstest
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_nt.common.validation import ArgumentError
from lightning_nt.stats import compare_models, cross_mean_test


def _loader(n=400, dim=5, seed=0, as_dict=False):
    inputs = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    if as_dict:
        return DataLoader([{"x": row} for row in inputs], batch_size=64)
    return DataLoader(TensorDataset(inputs), batch_size=64)


def _linear(seed, dim=5, classes=3):
    torch.manual_seed(seed)
    return nn.Linear(dim, classes, bias=False)


def test_the_test_is_the_cross_mean_test_of_the_softmax_differences():
    a, b = _linear(0), _linear(1)
    inputs = _loader().dataset.tensors[0]
    with torch.no_grad():
        differences = (a(inputs).softmax(-1) - b(inputs).softmax(-1)).double()
    assert compare_models(a, b, _loader(), seed=3) == cross_mean_test(differences, seed=3)
    first = compare_models(a, b, _loader(), num_examples=100, outputs="logits")
    with torch.no_grad():
        assert first == cross_mean_test((a(inputs[:100]) - b(inputs[:100])).double())


def test_outputs_whose_mean_agrees_are_not_told_apart_at_the_nominal_rate():
    # softmax(Wx) and softmax(-Wx) have the same mean for symmetric x: a planted null, over many data seeds
    a = _linear(0)
    b = _linear(0)
    with torch.no_grad():
        b.weight.neg_()
    p_values = [compare_models(a, b, _loader(n=200, seed=seed)).p_value for seed in range(200)]
    assert 0.01 <= sum(p <= 0.05 for p in p_values) / 200 <= 0.10
    assert kstest(p_values, "uniform").pvalue > 0.01


def test_a_systematic_change_is_detected_with_dict_batches_and_modes_restored():
    a = nn.Sequential(nn.Linear(5, 3), nn.Dropout(0.5))
    b = nn.Sequential(nn.Linear(5, 3), nn.Dropout(0.5))
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        b[0].bias.add_(torch.tensor([0.3, 0.0, 0.0]))
    result = compare_models(a, b, _loader(as_dict=True), forward=lambda model, batch: model(batch["x"]))
    assert result.p_value < 1e-6 and result.estimate > 0 and (result.n, result.d) == (400, 3)
    assert a.training and b.training  # dropout was off during the comparison, and is on again
    same = compare_models(a, a, _loader(as_dict=True), forward=lambda model, batch: model(batch["x"]))
    assert (same.statistic, same.p_value) == (0.0, 1.0)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"model_a": "resnet"}, "model_a"),
        ({"model_b": None}, "model_b"),
        ({"dataloader": [torch.zeros(4, 5)]}, "dataloader"),
        ({"num_samples": 2}, "num_samples"),
        ({"num_samples": 8.0}, "num_samples"),
        ({"outputs": "probabilities"}, "outputs"),
        ({"forward": "logits"}, "forward"),
        ({"alternative": "sideways"}, "alternative"),
        ({"seed": "0"}, "seed"),
    ],
)
def test_bad_arguments_are_named(kwargs, argument):
    arguments = {"model_a": _linear(0), "model_b": _linear(1), "dataloader": _loader(), **kwargs}
    with pytest.raises(ArgumentError, match=f"`{argument}`"):
        compare_models(**arguments)


def _binary_pair(shift):
    """Two binary classifiers ``nn.Linear(5, 1)`` (one logit), the second's bias moved by ``shift``."""
    torch.manual_seed(0)
    a = nn.Linear(5, 1)
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.bias.add_(shift)
    return a, b


def _squeezed(model, batch):
    return model(batch[0]).squeeze(1)


def test_a_one_logit_model_is_compared_through_its_probability_sigmoid():
    # a softmax over one entry is 1 whatever the logit: every change read as "identical" (p = 1)
    a, b = _binary_pair(0.5)
    inputs = _loader().dataset.tensors[0]
    with torch.no_grad():
        probabilities = torch.sigmoid(a(inputs)) - torch.sigmoid(b(inputs))
        two_class = torch.stack([torch.zeros(400), a(inputs)[:, 0]], 1).softmax(1)[:, 1:]
        two_class = two_class - torch.stack([torch.zeros(400), b(inputs)[:, 0]], 1).softmax(1)[:, 1:]
    torch.testing.assert_close(probabilities, two_class)
    result = compare_models(a, b, _loader())
    assert result == cross_mean_test(probabilities.double()) and result.p_value < 1e-6 and result.d == 1
    assert compare_models(a, b, _loader(), forward=_squeezed) == result  # [B] outputs are read as [B, 1]
    with torch.no_grad():
        logits = (a(inputs) - b(inputs)).double()
    assert compare_models(a, b, _loader(), outputs="logits", forward=_squeezed) == cross_mean_test(logits)


def test_one_logit_models_under_the_null_are_not_told_apart_at_the_nominal_rate():
    # sigmoid(w.x) and sigmoid(-w.x) have the same mean (1/2) for symmetric x
    a, b = _binary_pair(0.0)
    with torch.no_grad():
        b.weight.neg_()
    p_values = [compare_models(a, b, _loader(n=200, seed=seed)).p_value for seed in range(200)]
    assert 0.01 <= sum(p <= 0.05 for p in p_values) / 200 <= 0.10


class Patched(nn.Module):
    """``base``, with the first output raised by 5 on the rare inputs whose first coordinate exceeds 2.5."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, inputs):
        return self.base(inputs) + (inputs[:, :1] > 2.5).float() * torch.tensor([5.0, 0.0, 0.0])


def test_outputs_that_differ_on_too_few_examples_give_no_evidence_with_a_warning():
    base = _linear(0)
    assert int((_loader().dataset.tensors[0][:, 0] > 2.5).sum()) == 4  # these 4 fall in one half for seed 0
    with pytest.warns(UserWarning, match="no evidence"):
        result = compare_models(base, Patched(base), _loader())
    assert (result.statistic, result.p_value) == (0.0, 1.0)


def test_more_examples_asked_than_the_loader_holds_are_warned():
    a, b = _linear(0), _linear(1)
    with pytest.warns(UserWarning, match=r"num_examples=1000\): the dataloader holds only 400"):
        result = compare_models(a, b, _loader(), num_examples=1000)
    assert result == compare_models(a, b, _loader())
