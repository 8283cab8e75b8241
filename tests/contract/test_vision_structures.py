"""What torchvision's architectures (ResNet, MobileNetV3, EfficientNet, ConvNeXt, ViT, Swin, RegNet, DenseNet) showed
beyond the shared promises of ``test_contract.py``, on the structures of theirs that the zoo reproduces
(``tests/helpers/zoo.py``, the entries after "torchvision's vision architectures"). Each test failed before its fix,
or is an independent reference (an exact Hessian, ``vmap(grad)``) for what the suite's promises can't judge."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lightning_nt.common.autodiff import differentiable_kernels
from lightning_nt.sharpness import HessianOperator
from tests.helpers.zoo import ZOO


class _ClampedGate(nn.Module):
    """The hard sigmoid written another way, ``clamp(x / 6 + 1 / 2, 0, 1)``: PyTorch differentiates it twice."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x / 6 + 0.5).clamp(0.0, 1.0)


def test_the_hessian_through_a_hardsigmoid_gate_is_the_exact_one() -> None:
    """MobileNetV3's squeeze-and-excitation gate (``nn.Hardsigmoid``) has no double backward in PyTorch: Hessian-vector
    products (SharpnessMonitor) and GradInit's Adam search raised "derivative for aten::hardsigmoid_backward is not
    implemented". Inside ``differentiable_kernels`` the products give the Hessian that ``torch.autograd.functional``
    computes on the same network with the gate written as a clamp, in float64."""
    torch.manual_seed(0)
    module = ZOO["squeeze_excitation"].build().double()
    inputs, labels = next(iter(module.train_dataloader()))
    inputs = inputs.double()
    names = [name for name, _ in module.named_parameters()]
    params = [p for p in module.parameters()]
    operator = HessianOperator(params, lambda: [(F.cross_entropy(module(inputs), labels), 1.0)])
    with differentiable_kernels():
        products = torch.stack([operator.matvec(column) for column in torch.eye(operator.numel, dtype=torch.float64)])

    clamped = copy.deepcopy(module)
    clamped.net[3].gate = _ClampedGate()
    shapes = [p.shape for p in params]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        pieces = dict(
            zip(names, (piece.view(shape) for piece, shape in zip(flat.split([s.numel() for s in shapes]), shapes)))
        )
        return F.cross_entropy(functional_call(clamped, pieces, (inputs,)), labels)

    expected = torch.autograd.functional.hessian(loss, torch.cat([p.detach().flatten() for p in params]))
    assert expected.abs().max() > 0.1  # the gate is in its linear range for some inputs: a Hessian worth comparing
    torch.testing.assert_close(products, expected, rtol=1e-9, atol=1e-12)
