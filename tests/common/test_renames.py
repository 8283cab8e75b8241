"""Renamed names keep their old names for one release: the old name warns, naming the new one, and behaves the same.

``num_samples`` meant three things: the examples of a probe set or of a bound (now ``num_examples``), the size
of a dataset (``PoissonBatchSampler``: now ``dataset_size``) and random draws (private: ``num_draws``).
``IterateAverage`` (the core object, one letter from the ``IterateAveraging`` callback) is now
``RunningWeightAverage``.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.demos.boring_classes import BoringModel
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_nt import (
    CompressionBoundReporter,
    GradientSignalTest,
    LazinessMonitor,
    RepresentationSimilarity,
    SharpnessMonitor,
)
from lightning_nt.common import ProbeSet
from lightning_nt.common.validation import ArgumentError, at_least, checked_arguments, renamed_arguments
from lightning_nt.privacy import PoissonBatchSampler
from lightning_nt.stats import compare_models

CALLBACKS = [SharpnessMonitor, LazinessMonitor, RepresentationSimilarity, GradientSignalTest, CompressionBoundReporter]
DEPRECATED = "`num_samples` is deprecated.*pass `num_examples`"


class _Counter:
    @checked_arguments(count=at_least(1))
    @renamed_arguments(size="count")
    def __init__(self, count: int = 8, scale: float = 1.0) -> None:
        self.count, self.scale = count, scale


def test_the_old_name_joins_the_signature_keyword_only_and_optional():
    parameters = inspect.signature(_Counter).parameters
    assert list(parameters) == ["count", "scale", "size"]
    assert parameters["size"].kind is inspect.Parameter.KEYWORD_ONLY and parameters["size"].default is None
    assert parameters["size"].annotation == "int | None"


def test_the_old_name_warns_at_the_caller_and_passes_its_value_on():
    with pytest.warns(DeprecationWarning, match="`size` is deprecated.*pass `count` instead") as caught:
        counter = _Counter(size=3)
    assert counter.count == 3 and caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _Counter(count=3).count == 3 and _Counter(size=None).count == 8  # None: the old name not given


@pytest.mark.parametrize("value", [0, 2.5, "3", True])
def test_a_bad_value_under_the_old_name_is_refused_naming_the_old_name(value):
    with pytest.raises(ArgumentError, match="`size`"):
        _Counter(size=value)


def test_both_names_are_an_error_unless_the_new_one_is_at_its_default():
    with pytest.raises(ArgumentError, match="`size` is the deprecated name of `count`: pass only `count`"):
        _Counter(count=4, size=3)
    with pytest.raises(ArgumentError, match="deprecated name"):
        _Counter(5, size=3)  # positional counts too
    with pytest.warns(DeprecationWarning):  # LightningCLI passes every argument, unset ones at their default
        assert _Counter(count=8, size=3).count == 3


def test_renamed_arguments_must_sit_under_checked_arguments_and_name_real_arguments():
    with pytest.raises(TypeError, match="under checked_arguments"):
        renamed_arguments(size="count")(_Counter.__init__)
    with pytest.raises(TypeError, match="must take `total`"):

        @renamed_arguments(size="total")
        def count(count: int) -> int:
            return count


@pytest.mark.parametrize("callback", CALLBACKS, ids=lambda c: c.__name__)
def test_every_callback_takes_num_examples_and_the_old_num_samples(callback):
    assert "num_examples" in inspect.signature(callback).parameters
    new = callback(num_examples=24)
    with pytest.warns(DeprecationWarning, match=DEPRECATED):
        old = callback(num_samples=24)
    assert old.num_examples == new.num_examples == 24 and old.state_key == new.state_key
    assert "'num_samples': 24" in new.state_key  # unchanged key: checkpoints written before the rename still load
    with pytest.raises(ArgumentError, match="`num_samples` is the deprecated name of `num_examples`"):
        callback(num_examples=16, num_samples=24)
    with pytest.raises(ArgumentError, match="`num_samples`"):
        callback(num_samples=0)
    with pytest.warns(DeprecationWarning, match=f"`{callback.__name__}.num_samples` is deprecated.*num_examples"):
        assert new.num_samples == 24  # the attribute's old name too


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(4, 3, generator=torch.Generator().manual_seed(i)), torch.arange(4)) for i in range(3)]


@pytest.mark.parametrize(
    "build",
    [
        lambda **size: ProbeSet.from_batches(_batches(), **size),
        lambda **size: ProbeSet.from_dataloader(DataLoader(TensorDataset(torch.arange(20.0)), batch_size=4), **size),
    ],
    ids=["from_batches", "from_dataloader"],
)
def test_probe_sets_take_num_examples_and_the_old_num_samples(build: Callable[..., ProbeSet]):
    new = build(num_examples=10)
    with pytest.warns(DeprecationWarning, match=DEPRECATED):
        old = build(num_samples=10)
    assert len(old) == len(new) == 10
    assert all(torch.equal(a, b) for a, b in zip(old.tensors(), new.tensors(), strict=True))
    with pytest.raises(ArgumentError, match="deprecated name"):
        build(num_examples=10, num_samples=5)


def test_compare_models_takes_num_examples_and_the_old_num_samples():
    torch.manual_seed(0)
    a, b = nn.Linear(5, 3), nn.Linear(5, 3)
    loader = DataLoader(TensorDataset(torch.randn(64, 5)), batch_size=16)
    new = compare_models(a, b, loader, num_examples=40)
    with pytest.warns(DeprecationWarning, match=DEPRECATED):
        old = compare_models(a, b, loader, num_samples=40)
    assert old == new and new.n == 40
    with pytest.raises(ArgumentError, match="deprecated name"):
        compare_models(a, b, loader, num_examples=40, num_samples=20)


def test_poisson_batch_sampler_takes_dataset_size_and_the_old_num_samples():
    new = PoissonBatchSampler(dataset_size=50, sample_rate=0.2, seed=3)
    with pytest.warns(DeprecationWarning, match="`num_samples` is deprecated.*pass `dataset_size`"):
        old = PoissonBatchSampler(num_samples=50, sample_rate=0.2, seed=3)
    assert old.dataset_size == 50 and list(old) == list(new)
    with pytest.warns(DeprecationWarning, match="`PoissonBatchSampler.num_samples` is deprecated.*dataset_size"):
        assert new.num_samples == 50
    with pytest.raises(ArgumentError, match="deprecated name"):
        PoissonBatchSampler(dataset_size=50, sample_rate=0.2, num_samples=40)


def _cli(tmp_path, init_args: dict[str, Any]) -> LightningCLI:
    """A LightningCLI run=False from a YAML config listing every renamed callback with ``init_args``."""
    config = {"trainer": {"callbacks": [{"class_path": c.__name__, "init_args": init_args} for c in CALLBACKS]}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    arguments = ["--config", str(path), "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"]
    return LightningCLI(BoringModel, run=False, args=arguments, save_config_callback=None)


def test_a_yaml_config_with_the_old_key_still_runs_through_lightning_cli(tmp_path):
    with pytest.warns(DeprecationWarning, match=DEPRECATED) as caught:
        old = _cli(tmp_path, {"num_samples": 48})
    assert sum("num_samples" in str(w.message) for w in caught) == len(CALLBACKS)
    new = _cli(tmp_path, {"num_examples": 48})
    for callbacks in (old.trainer.callbacks, new.trainer.callbacks):
        measured = [c for c in callbacks if isinstance(c, tuple(CALLBACKS))]
        assert [c.num_examples for c in measured] == [48] * len(CALLBACKS)
    with pytest.raises(ValueError, match="deprecated name of `num_examples`"):  # jsonargparse wraps the error
        _cli(tmp_path, {"num_samples": 48, "num_examples": 24})


def test_running_weight_average_keeps_its_old_name_iterate_average():
    import lightning_nt.averaging as averaging
    import lightning_nt.averaging.core as core
    from lightning_nt.averaging import RunningWeightAverage

    for module in (averaging, core):
        with pytest.warns(DeprecationWarning, match=r"IterateAverage` is deprecated.*use `lightning_nt\.averaging"):
            old = module.IterateAverage
        assert old is RunningWeightAverage and "IterateAverage" not in module.__all__
    with pytest.warns(DeprecationWarning, match="RunningWeightAverage"):
        from lightning_nt.averaging import IterateAverage
    net = nn.Linear(2, 1)
    assert isinstance(IterateAverage(net), RunningWeightAverage) and isinstance(RunningWeightAverage(net), old)
    with pytest.raises(AttributeError, match="no attribute 'IterateAverager'"):
        averaging.IterateAverager  # noqa: B018


def test_public_identifiers_are_spelled_the_american_way_and_keep_the_british_spelling():
    import lightning_nt.compression.subspace as subspace

    with pytest.warns(DeprecationWarning, match="`lightning_nt.compression.subspace.seeded_initialization`"):
        old = subspace.seeded_initialisation
    assert old is subspace.seeded_initialization and "seeded_initialisation" not in subspace.__all__
    net = nn.Linear(3, 2)
    assert all(torch.equal(a, b) for a, b in zip(old(net, 7).values(), subspace.seeded_initialization(net, 7).values()))


def test_the_deprecation_is_shown_by_python_default_filters_outside_main(tmp_path):
    """Python hides a plain DeprecationWarning raised from code outside ``__main__`` (a YAML run through a CLI
    module would never show it); Lightning's category, which the old names use, is shown by default."""
    (tmp_path / "user_code.py").write_text(
        "from lightning_nt import SharpnessMonitor\nSharpnessMonitor(num_samples=8)\n"
    )
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONWARNINGS"}
    environment["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(Path(__file__).parents[2])])
    result = subprocess.run(
        [sys.executable, "-c", "import user_code"], capture_output=True, text=True, env=environment, check=True
    )
    assert "`num_samples` is deprecated" in result.stderr
