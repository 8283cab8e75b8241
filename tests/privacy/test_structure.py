"""The privacy package's structure: dependencies point down, and moved names stay the same objects."""

import ast
import importlib
import pickle
from pathlib import Path

import torch

import lightning_nt.privacy
from lightning_nt.common.layers import StandardizedConv2d

PRIVACY = Path(lightning_nt.privacy.__file__).parent
ABOVE_OR_BESIDE = ("averaging", "compression", "demos", "gradinit", "laziness", "sharpness", "similarity", "stats")


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    return found | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}


def test_privacy_imports_no_other_capability_and_no_demo():
    offending = {
        str(path.relative_to(PRIVACY)): sorted(m for m in _imported_modules(path) if m.split(".")[1:2] == [part])
        for path in PRIVACY.rglob("*.py")
        for part in ABOVE_OR_BESIDE
        if any(m.startswith(f"lightning_nt.{part}") for m in _imported_modules(path))
    }
    assert offending == {}


def test_the_standardized_conv_is_one_class_under_its_old_and_new_names():
    wide_resnet = importlib.import_module("lightning_nt.demos.wide_resnet")
    demos = importlib.import_module("lightning_nt.demos")
    common = importlib.import_module("lightning_nt.common")
    assert wide_resnet.StandardizedConv2d is demos.StandardizedConv2d is common.StandardizedConv2d is StandardizedConv2d


def test_a_layer_pickled_under_the_old_path_loads_as_the_same_class():
    torch.manual_seed(0)
    layer = StandardizedConv2d(2, 3, 1)
    old = pickle.dumps(layer, protocol=0).replace(b"lightning_nt.common.layers", b"lightning_nt.demos.wide_resnet")
    assert b"lightning_nt.demos.wide_resnet\nStandardizedConv2d" in old
    loaded = pickle.loads(old)
    assert type(loaded) is StandardizedConv2d
    inputs = torch.randn(4, 2, 5, 5)
    torch.testing.assert_close(loaded(inputs), layer(inputs), rtol=0, atol=0)


def test_the_strategy_module_keeps_its_public_names():
    strategy = importlib.import_module("lightning_nt.privacy.strategy")
    engines = importlib.import_module("lightning_nt.privacy.engines")
    assert strategy.GradSampleMode is engines.GradSampleMode
    assert strategy.DPStrategy is lightning_nt.privacy.DPStrategy
    assert strategy.DPDDPStrategy is lightning_nt.privacy.DPDDPStrategy
    assert callable(strategy.register_strategies) and strategy.__all__ == ["DPDDPStrategy", "DPStrategy"]
