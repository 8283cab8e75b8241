"""What torchvision's architectures (ResNet, MobileNetV3, EfficientNet, ConvNeXt, ViT, Swin, RegNet, DenseNet) showed
beyond the shared promises of ``test_contract.py``, on the structures of theirs that the zoo reproduces
(``tests/helpers/zoo.py``, the entries after "torchvision's vision architectures"). Each test failed before its fix,
or is an independent reference (an exact Hessian, ``vmap(grad)``) for what the suite's promises can't judge."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lightning_nt import CompressionBoundReporter, DPStrategy, RepresentationSimilarity
from lightning_nt.common.autodiff import differentiable_kernels
from lightning_nt.compression.stability import noise_stability
from lightning_nt.sharpness import HessianOperator
from tests.contract.test_zoo_structures import assert_the_update_is_the_clipped_sum
from tests.helpers.trainer import tiny_trainer
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


class _ViTStyle(nn.Module):
    """torchvision's ``VisionTransformer`` in small: patches embedded by a Linear, a class token and position
    embeddings as bare parameters, one pre-LayerNorm ``nn.MultiheadAttention`` called with ``need_weights=False`` (its
    fused fast path in eval mode), an MLP, the class token classified."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(2, width)
        self.class_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embedding = nn.Parameter(torch.randn(1, 17, width) * 0.02)
        self.norm = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.head = nn.Linear(width, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(images.flatten(2).transpose(1, 2))
        tokens = torch.cat([self.class_token.expand(len(tokens), -1, -1), tokens], dim=1) + self.pos_embedding
        normed = self.norm(tokens)
        tokens = tokens + self.attention(normed, normed, normed, need_weights=False)[0]
        return self.head((tokens + self.mlp(tokens))[:, 0])


@pytest.mark.parametrize("entry", ["vit_style", "convnext_swin"])
def test_noise_stability_measures_every_per_example_layer(entry: str) -> None:
    """Arora et al.'s noise responses are JVPs: they failed for every layer before an attention layer on its fused
    fast path in eval mode (no forward-mode derivative: ViT, ``nn.TransformerEncoder``), and for every layer before a
    layer run once on inputs the whole batch shares (Swin V2's position-bias MLP: its ``[1, ...]`` output doesn't
    stack with the examples' rows). The shared layers are left out, named; every other layer is measured."""
    torch.manual_seed(0)
    inputs, labels = next(iter(ZOO["convnext_swin"].build().train_dataloader()))  # 8 images 2x4x4
    module = (_ViTStyle() if entry == "vit_style" else ZOO[entry].build()).eval()
    report = noise_stability(module, lambda: module(inputs), labels, generator=torch.Generator().manual_seed(0))
    assert not [reason for reason in report.skipped if "noise response failed" in reason]
    assert report.noise_attenuation.keys() == set(report.layers) and len(report.layers) >= 3
    shared = [reason for reason in report.skipped if "doesn't hold the 8 examples" in reason]
    assert [reason.split(":")[0] for reason in shared] == [
        name for name in ("net.attn.cpb_mlp.0", "net.attn.cpb_mlp.2") if entry == "convnext_swin"
    ]


def test_dp_refuses_what_opacus_recomputes_by_name_before_the_first_step(tmp_path: Path) -> None:
    """A layer with trainable parameters of its own and no per-sample rule is recomputed by Opacus under torch.func:
    ConvNeXt's block (a layer scale) over stochastic depth crashed in the first backward pass ("vmap: called random
    operation"), Swin's attention (a bias table) beside its index buffer with a bare list of NotImplementedErrors.
    Both are refused before the first step, each layer named with its parameters, and the fixes said."""
    torch.manual_seed(0)
    trainer = tiny_trainer(tmp_path, strategy=DPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, seed=0))
    with pytest.raises(RuntimeError) as refusal:
        trainer.fit(ZOO["convnext_swin"].build())
    assert trainer.global_step == 0
    message = str(refusal.value)
    assert "net.attn (_ShiftedWindowAttention: ['relative_position_bias_table'])\"] hold buffers" in message
    assert "net.convnext (_ConvNeXtBlock: ['layer_scale']) draws random numbers while training in " in message
    assert "['stochastic_depth']" in message and "requires_grad_(False)" in message and "p=0" in message


def _with_dp_fixes(module: pl.LightningModule) -> pl.LightningModule:
    """The fixes DP-SGD's refusals name: the layer scale, the bias table and the bias MLP (run once on a table shared
    by the batch) frozen. Stochastic depth off too, for a deterministic reference."""
    net = module.net
    for frozen in (net.convnext.layer_scale, net.attn.relative_position_bias_table, *net.attn.cpb_mlp.parameters()):
        frozen.requires_grad_(False)
    net.convnext.stochastic_depth.p = 0.0
    return module


@pytest.mark.parametrize(
    ("entry", "mode"),
    [
        ("squeeze_excitation", "hooks"),  # depthwise convolution, the SE gate's 1x1 convolutions
        ("squeeze_excitation", "bk"),
        ("convnext_swin", "hooks"),  # LayerNorm2d (functorch), channels-last Linears, attention, torch.roll
        ("resnet_block", "bk"),  # in-place ReLU and out += identity on GroupNorm outputs (refused under hooks)
    ],
)
def test_dp_clips_the_vision_structures_exactly(entry: str, mode: str) -> None:
    """Entries DP-SGD trains (convnext_swin with the fixes its refusal names): the engine's clipped sum equals the
    ``vmap(grad)`` clip-and-sum in float64."""
    torch.manual_seed(0)
    module = ZOO[entry].build().double().train()
    if entry == "convnext_swin":
        _with_dp_fixes(module)
    generator = torch.Generator().manual_seed(1)
    inputs = (
        torch.randn(12, 2, 4, 4, generator=generator, dtype=torch.float64)
        * torch.linspace(0.1, 4, 12)[:, None, None, None]
    )
    labels = torch.randint(3, (12,), generator=generator)
    assert_the_update_is_the_clipped_sum(mode, module, inputs, labels)


def test_representation_similarity_leaves_out_layers_run_on_inputs_the_batch_shares(tmp_path: Path) -> None:
    """Swin V2's position-bias MLP runs once on a table, not on the examples: its ReLU (found by type) was compared
    as if its one row per chunk were examples, and the layer x layer CKA at the end of fit raised ValueError. Left out
    with a warning when found by type; refused, named, when the user names it."""
    torch.manual_seed(0)
    callback = RepresentationSimilarity(every_n_epochs=1, num_examples=16, chunk_size=8)
    with pytest.warns(UserWarning, match=r"layers \['net\.attn\.cpb_mlp\.1'\] ran on inputs shared by the whole batch"):
        tiny_trainer(tmp_path, callbacks=[callback]).fit(ZOO["convnext_swin"].build())
    assert {key for key in callback.history[-1] if key.startswith("similarity/cka/")} == {
        "similarity/cka/net.convnext.block.4",
        "similarity/cka/net.mlp.1",
    }
    named = RepresentationSimilarity(layers=["net.mlp.1", "net.attn.cpb_mlp.1"], num_examples=16, chunk_size=8)
    with pytest.raises(ValueError, match=r"`layers`: \['net\.attn\.cpb_mlp\.1'\] returned outputs that don't hold"):
        tiny_trainer(tmp_path, callbacks=[named]).fit(ZOO["convnext_swin"].build())


def test_compression_names_the_fix_for_an_index_buffer_and_certifies_it_declared(tmp_path: Path) -> None:
    """Swin's integer ``relative_position_index`` is refused (not encoded) with the fix named: a buffer the
    architecture fixes is declared part of it by registering it again non-persistent; then the model is certified.
    A buffer training writes is told apart (the ``buffers`` entry's step counter)."""
    torch.manual_seed(0)
    reporter = CompressionBoundReporter(levels=(3, 9), prune=(0.0,), methods=("uniform",), finalists=1)
    with pytest.warns(UserWarning, match=r"\['net\.attn\.relative_position_index'\] .*persistent=False"):
        tiny_trainer(tmp_path, callbacks=[reporter]).fit(ZOO["convnext_swin"].build())
    assert reporter.report == {}
    module = ZOO["convnext_swin"].build()
    module.net.attn.register_buffer(
        "relative_position_index", module.net.attn.relative_position_index, persistent=False
    )
    tiny_trainer(tmp_path, callbacks=[reporter]).fit(module)
    assert 0 < reporter.report["compression/error_bound"] <= 1
    counter = CompressionBoundReporter(levels=(3, 9), prune=(0.0,), methods=("uniform",), finalists=1)
    with pytest.warns(UserWarning, match=r"integer buffers \['net\.steps'\] changed while training"):
        tiny_trainer(tmp_path, callbacks=[counter]).fit(ZOO["buffers"].build())


def test_dp_names_the_fix_for_in_place_changes_of_hooked_outputs(tmp_path: Path) -> None:
    """torchvision's CNNs under DP (GroupNorm, or BatchNorm swapped by fix_modules) apply ReLU(inplace=True) and
    ``out += identity`` to GroupNorm outputs, which Opacus's full backward hooks forbid: PyTorch's "Output 0 of
    BackwardHookFunctionBackward is a view and is being modified inplace" came from the first forward pass. Named, with
    grad_sample_mode='bk' (which trains it, and which 'auto' picks)."""
    torch.manual_seed(0)
    trainer = tiny_trainer(tmp_path, strategy=DPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, seed=0))
    with pytest.raises(RuntimeError, match=r"in-place operation .*full backward hook.*grad_sample_mode='bk'"):
        trainer.fit(ZOO["resnet_block"].build())
    assert trainer.global_step == 0
    strategy = DPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, seed=0, grad_sample_mode="auto")
    trainer = tiny_trainer(tmp_path, strategy=strategy)
    trainer.fit(ZOO["resnet_block"].build())
    assert trainer.global_step == 4
