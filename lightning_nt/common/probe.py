"""A fixed set of training examples, cached once, for measurements that must compare like with like.

Sharpness measured every 100 steps means little if each measurement sees different data. A
:class:`ProbeSet` takes the first ``num_examples`` examples the train dataloader yields (without
disturbing the training run's random state), keeps them on the CPU in one tensor per batch field,
and hands them back in chunks on any device together with each chunk's share of the set, so a
mean over the whole set is ``sum(share * chunk_mean)``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import random
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.apply_func import move_data_to_device
from lightning_utilities.core.apply_func import apply_to_collection, is_dataclass_instance, is_namedtuple
from pytorch_lightning.trainer.states import RunningStage
from pytorch_lightning.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

from lightning_nt.common.batches import batch_size, concatenate_batches, select_examples, tensors_of, with_tensors
from lightning_nt.common.state import preserved_rng
from lightning_nt.common.validation import ArgumentError, at_least, checked_arguments, renamed_arguments

__all__ = [
    "ProbeLoader",
    "ProbeSet",
    "examples_of_this_rank",
    "first_validation_loader",
    "prepare_batch",
    "preserved_loader_rng",
    "running_stage",
]

ProbeLoader = Literal["train", "val"]
"""Which of the Trainer's loaders a probe set is read from: the train loader or the first validation loader."""


class ProbeSet:
    """``num_examples`` training examples, stored on the CPU, served in chunks on a device.

    Examples:
        >>> batches = [(torch.randn(4, 3), torch.arange(4)) for _ in range(3)]
        >>> probe = ProbeSet.from_batches(batches, num_examples=10)
        >>> len(probe), [(batch_size(b), share) for b, share in probe.chunks(chunk_size=6)]
        (10, [(6, 0.6), (4, 0.4)])
    """

    def __init__(self, batch: Any) -> None:
        self._batch = batch
        self._num_examples = batch_size(batch)

    @classmethod
    @checked_arguments(num_examples=at_least(1))
    @renamed_arguments(num_samples="num_examples")
    def from_batches(cls, batches: Iterable[Any], num_examples: int) -> ProbeSet:
        """Concatenate batches until ``num_examples`` examples are collected (fewer if ``batches`` runs out)."""
        collected: list[Any] = []
        count = 0
        for batch in batches:
            size = batch_size(batch)
            if size == 0:
                continue
            take = min(size, num_examples - count)
            collected.append(select_examples(batch, slice(0, take)))
            count += take
            if count == num_examples:
                break
        if not collected:
            raise ValueError("The dataloader yielded no examples to build the probe set from.")
        return cls(concatenate_batches(collected))

    @classmethod
    @renamed_arguments(num_samples="num_examples")
    def from_dataloader(
        cls, dataloader: DataLoader, num_examples: int, distinct_across_ranks: bool = False
    ) -> ProbeSet:
        """Cache the first ``num_examples`` examples of ``dataloader`` without advancing any random generator.

        Starting a shuffled loader draws from torch's global generator (and the sampler's own, if it has
        one); both are restored, so the training run sees the same batches as without the probe set.
        With ``distinct_across_ranks``, an example that a padding ``DistributedSampler`` (what Lightning gives a
        loader under DDP) repeats from another rank's shard, to make the shards even, is left out: for statistics
        pooled over ranks that need every example once.
        """
        own = examples_of_this_rank(dataloader) if distinct_across_ranks else None
        with preserved_loader_rng(dataloader):
            return cls.from_batches(dataloader, num_examples if own is None else min(num_examples, own))

    @classmethod
    @renamed_arguments(num_samples="num_examples")
    def from_trainer(
        cls,
        trainer: pl.Trainer,
        num_examples: int,
        loader: ProbeLoader = "train",
        argument: str | None = None,
        distinct_across_ranks: bool = False,
    ) -> ProbeSet:
        """Cache ``num_examples`` examples of the Trainer's train dataloader (available from ``on_train_start``), or
        with ``loader="val"`` of its first validation dataloader (set up here if validation has not run yet).
        ``argument``: the caller's option that chose ``loader`` (e.g. ``"data"``), named in the error when there is
        no validation dataloader. ``distinct_across_ranks``: as in :meth:`from_dataloader`."""
        return cls.from_dataloader(_loader(trainer, loader, argument), num_examples, distinct_across_ranks)

    def __len__(self) -> int:
        return self._num_examples

    def examples(self, index: slice) -> Any:
        """The examples ``index`` picks, as one batch on the CPU."""
        return select_examples(self._batch, index)

    def tensors(self) -> list[Tensor]:
        """The probe set's tensors, in :func:`~lightning_nt.common.batches.tensors_of` order."""
        return tensors_of(self._batch)

    def state_dict(self) -> dict[str, Any]:
        """The whole probe batch in a form ``torch.load(weights_only=True)`` reads back: what a checkpoint stores.

        Every value is kept (tensors, per-example columns such as a list of string ids, constant fields); only
        the classes of namedtuples and dataclasses are dropped (they become tuples and dicts, which
        ``weights_only`` loading accepts), and :meth:`from_state_dict` takes them back from the train loader.

        Examples:
            >>> probe = ProbeSet({"x": torch.zeros(2, 3), "id": ["a", "b"]})
            >>> probe.state_dict()["batch"]["id"]
            ['a', 'b']
        """
        return {"batch": _plain(self._batch)}

    @classmethod
    def from_state_dict(
        cls, state: dict[str, Any] | list[Tensor], trainer: pl.Trainer, loader: ProbeLoader = "train"
    ) -> ProbeSet:
        """The probe set saved by :meth:`state_dict`, its namedtuple and dataclass classes taken from one batch of
        the Trainer's ``loader`` it was read from (read with the random state untouched). A list of tensors, what
        checkpoints written before :meth:`state_dict` existed hold, is read by :meth:`from_tensors`."""
        if isinstance(state, list):
            return cls.from_tensors(state, trainer)
        return cls(_restored(_template(trainer, loader), state["batch"]))

    @classmethod
    def from_tensors(cls, tensors: list[Tensor], trainer: pl.Trainer) -> ProbeSet:
        """A probe set from its :meth:`tensors` alone, in the structure of the Trainer's train batches (RNG untouched).

        Non-tensor fields come from a fresh batch, not from the saved probe set: per-example columns (string
        ids) are lost. It reads checkpoints written before :meth:`state_dict`; use that pair for new ones.
        """
        return cls(with_tensors(_template(trainer), tensors))

    def chunks(
        self, chunk_size: int | None = None, device: torch.device | str | None = None
    ) -> Iterator[tuple[Any, float]]:
        """Yield ``(batch, share)`` with at most ``chunk_size`` examples each (all at once by default)."""
        size = chunk_size or self._num_examples
        if size < 1:
            raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size}.")
        for start in range(0, self._num_examples, size):
            stop = min(start + size, self._num_examples)
            chunk = select_examples(self._batch, slice(start, stop))
            yield (
                (move_data_to_device(chunk, device) if device is not None else chunk),
                (stop - start) / self._num_examples,
            )


def _template(trainer: pl.Trainer, loader: ProbeLoader = "train") -> Any:
    """A one-example batch of the Trainer's ``loader``: the structure (classes) of a saved probe batch."""
    return next(ProbeSet.from_trainer(trainer, 1, loader).chunks())[0]


def _loader(trainer: pl.Trainer, loader: ProbeLoader, argument: str | None = None) -> DataLoader:
    """The Trainer's train loader, or its first validation loader (refused naming ``argument`` when there is none)."""
    if loader == "train":
        dataloader = trainer.train_dataloader
        where = "Call this from `on_train_start` or later, with one train dataloader."
    else:
        dataloader = first_validation_loader(trainer)
        if dataloader is None and argument is not None:
            raise ArgumentError(
                f"`{argument}='val'` reads the probe set from the first validation DataLoader, but the module and the "
                f"datamodule have none: give them a `val_dataloader`, or use {argument}='train'."
            )
        where = "Give the module or datamodule a `val_dataloader`, or read the probe set from the train loader."
    if not isinstance(dataloader, DataLoader):
        raise TypeError(
            f"A probe set is built from a single {loader} DataLoader, but the Trainer has "
            f"{type(dataloader).__name__}. {where}"
        )
    return dataloader


def examples_of_this_rank(dataloader: DataLoader) -> int | None:
    """How many of this rank's examples no other rank holds too, where its ``DistributedSampler`` pads: the sampler
    makes the shards even by repeating examples at the end of its index list, and each rank whose shard ends with
    such a repeat holds one example twice over the ranks. None where nothing is repeated on this rank."""
    sampler = getattr(dataloader.batch_sampler, "sampler", None) or dataloader.sampler
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
        return None
    size, ranks = len(sampler.dataset), sampler.num_replicas  # type: ignore[arg-type]
    repeated = {(size + k) % ranks for k in range(sampler.total_size - size)}  # the padded positions' ranks
    return sampler.num_samples - 1 if sampler.rank in repeated else None


def first_validation_loader(trainer: pl.Trainer) -> Any:
    """The first of the fit's validation loaders (of a list, or of a mapping, in its order), also before the first
    validation (set up as the fit's validation loop would) and when ``limit_val_batches=0``; None without any."""
    loop = trainer.fit_loop.epoch_loop.val_loop
    if trainer.val_dataloaders is None:
        loop.setup_data()
    loader = trainer.val_dataloaders
    if loader is None and loop._data_source.is_defined():  # validation switched off: ask the source directly
        loader = loop._data_source.dataloader()
    if isinstance(loader, Mapping):
        loader = list(loader.values())
    return loader[0] if isinstance(loader, list | tuple) and loader else loader


_LOADABLE = (Tensor, str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device, torch.Size)
"""Leaves ``torch.load(weights_only=True)`` reads back."""

_FROM_TEMPLATE = {"lightning_nt.probe": "from the train loader"}
"""What a saved probe batch holds in place of a leaf ``weights_only`` loading can't read (a NumPy array, a path)."""


def _plain(value: Any) -> Any:
    """``value`` with dataclasses as dicts of their fields, namedtuples as tuples and other mappings, lists and
    tuples as plain ones: the containers ``torch.load(weights_only=True)`` accepts, every loadable leaf kept as it
    is (others, with a warning, replaced by a marker that :func:`_restored` fills from the template)."""
    if is_dataclass_instance(value):
        return {field.name: _plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(item) for item in value]
        return tuple(items) if isinstance(value, tuple) else items
    if isinstance(value, _LOADABLE):
        return value
    warnings.warn(
        f"A probe set's batch holds a {type(value).__name__}, which a checkpoint loaded with weights_only=True can't "
        "hold: it is not saved, and a resumed run takes that field from a batch of the train loader.",
        stacklevel=2,
    )
    return _FROM_TEMPLATE


def _restored(template: Any, plain: Any) -> Any:
    """:func:`_plain`'s ``plain`` with the container classes of ``template``, a batch of the same loader.

    The values all come from ``plain``; ``template`` only lends classes, so a list may be longer than the
    template's (a per-example column of the probe set against a one-example batch). A leaf that was not saved comes
    from ``template``.
    """
    if isinstance(plain, dict) and plain == _FROM_TEMPLATE:
        return template
    if is_dataclass_instance(template):
        if not isinstance(plain, dict) or {field.name for field in dataclasses.fields(template)} != plain.keys():
            raise _structure_error(template, plain)
        restored = copy.copy(template)
        for field in dataclasses.fields(template):  # frozen dataclasses too, as the loader built them
            object.__setattr__(restored, field.name, _restored(getattr(template, field.name), plain[field.name]))
        return restored
    if isinstance(template, Mapping) and isinstance(plain, dict):
        items = {key: _restored(template.get(key), item) for key, item in plain.items()}
        if isinstance(template, defaultdict):
            return type(template)(template.default_factory, items)
        return items if type(template) is dict else type(template)(items)
    if isinstance(template, (list, tuple)) and isinstance(plain, (list, tuple)):
        if is_namedtuple(template) and len(template) != len(plain):
            raise _structure_error(template, plain)
        items = [
            _restored(template[min(index, len(template) - 1)] if template else None, item)
            for index, item in enumerate(plain)
        ]
        return type(template)(*items) if is_namedtuple(template) else type(template)(items)
    return plain


def _structure_error(template: Any, plain: Any) -> TypeError:
    return TypeError(
        f"The checkpoint's probe set holds a {type(plain).__name__} where the train loader's batches hold a "
        f"{type(template).__name__}: resume with the train dataloader the checkpoint was written with."
    )


def prepare_batch(trainer: pl.Trainer, batch: Any, dataloader_idx: int = 0, *, probe: ProbeLoader | None = None) -> Any:
    """A loader's batch as Lightning's loops hand it to a step: converted for the Trainer's precision, through the
    module's (and datamodule's) ``on_before_batch_transfer``, moved to the module's device by
    ``transfer_batch_to_device`` and through ``on_after_batch_transfer``.

    The user's hooks, where the module or datamodule has any, get a copy (a hook may write into the batch it is
    given: a cached probe set must not change), and for a ``probe`` set (read from the ``"train"`` or ``"val"``
    loader) they run under that loader's stage
    (``trainer.training`` or ``trainer.validating``, as a hook that augments only training batches reads it) and
    from a fixed random state: a random augmentation draws the same each time, so the probe set stays fixed.
    The random state is put back afterwards.
    """
    hooks = _has_batch_hooks(trainer)
    if hooks:
        batch = apply_to_collection(batch, Tensor, Tensor.clone)
    with _probe_context(trainer, probe) if hooks and probe is not None else contextlib.nullcontext():
        batch = trainer.precision_plugin.convert_input(batch)
        batch = trainer.lightning_module._on_before_batch_transfer(batch, dataloader_idx=dataloader_idx)
        return trainer.strategy.batch_to_device(batch, dataloader_idx=dataloader_idx)


_BATCH_HOOKS = ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")


def _has_batch_hooks(trainer: pl.Trainer) -> bool:
    """Whether the module or the datamodule overrides a batch hook (which may write into the batch)."""
    owners = [(trainer.lightning_module, pl.LightningModule), (trainer.datamodule, pl.LightningDataModule)]
    return any(
        owner is not None and is_overridden(hook, owner, parent) for owner, parent in owners for hook in _BATCH_HOOKS
    )


@contextlib.contextmanager
def _probe_context(trainer: pl.Trainer, probe: ProbeLoader) -> Iterator[None]:
    """The stage of the loader a probe set was read from, and one fixed random state, for the block."""
    with running_stage(trainer, probe), preserved_rng():
        random.seed(0)
        np.random.seed(0)
        torch.manual_seed(0)
        yield


@contextlib.contextmanager
def running_stage(trainer: pl.Trainer, loader: ProbeLoader) -> Iterator[None]:
    """``trainer.training`` (``"train"``) or ``trainer.validating`` (``"val"``) for the block, the stage restored
    after: the user's hooks and steps that read the stage see the one of the loader whose examples they get."""
    stage = trainer.state.stage
    trainer.state.stage = RunningStage.TRAINING if loader == "train" else RunningStage.VALIDATING
    try:
        yield
    finally:
        trainer.state.stage = stage


@contextlib.contextmanager
def preserved_loader_rng(dataloader: DataLoader) -> Iterator[None]:
    """Leave the training run's data stream as it was while the block iterates ``dataloader``: restore every
    generator that iterating advances (the global ones and the loader's own), and give the block its own worker
    iterator when the loader has ``persistent_workers`` (see :func:`_own_workers`)."""
    generators = [
        generator
        for generator in (getattr(dataloader, "generator", None), getattr(dataloader.sampler, "generator", None))
        if isinstance(generator, torch.Generator)
    ]
    with preserved_rng(*generators), _own_workers(dataloader):
        yield


@contextlib.contextmanager
def _own_workers(dataloader: DataLoader) -> Iterator[None]:
    """With ``persistent_workers=True`` every ``iter(dataloader)`` resets and hands back one cached worker iterator,
    the training loop's own: a probe iterating the loader mid-epoch would restart the loop's epoch, and one iterating
    it before the first epoch would leave the loop a reset iterator that drops batches. The block gets a fresh
    iterator (shut down after it) and the loop's is put back untouched."""
    if not getattr(dataloader, "persistent_workers", False):
        yield
        return
    training = dataloader._iterator
    dataloader._iterator = None
    try:
        yield
    finally:
        probe, dataloader._iterator = dataloader._iterator, training
        if probe is not None and probe is not training:
            probe._shutdown_workers()
