"""Poisson sampling for DP-SGD, on one process or sharded over many, with empty batches kept.

The privacy accounting of DP-SGD assumes that each step's batch contains every example independently
with probability ``q`` (Poisson sampling). :class:`PoissonBatchSampler` draws that one global batch per
step from a generator seeded identically on every process and hands each process the examples of its
own shard (``index % world_size == rank``): the union over processes is exactly one Poisson batch, and
every process yields the same number of batches, empty ones included, so data-parallel processes stay in
lockstep (Opacus's distributed sampler skips empty local batches, and the processes then fall out of step).
:func:`private_train_loader` is this stage as the strategy runs it: the train loader, its rate ``q`` and the
expected batch per process.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler
from torch.utils.data.dataloader import default_collate

from lightning_nt.common.batches import select_examples
from lightning_nt.common.validation import renamed_arguments, renamed_property
from lightning_nt.privacy.guards import check_train_loader

__all__ = [
    "AugmentedViews",
    "PoissonBatchSampler",
    "empty_batch_collate",
    "poisson_dataloader",
    "private_train_loader",
    "shared_seed",
    "steps_per_epoch",
]


class PoissonBatchSampler(Sampler[list[int]]):
    """Yields ``steps`` batches of dataset indices, each example included with probability ``sample_rate``.

    Args:
        dataset_size: number of examples in the dataset.
        sample_rate: inclusion probability ``q`` of every example in every batch.
        steps: batches per epoch (default ``round(1 / q)``: one pass over the data in expectation).
        rank: this process's index; it takes its shard of every batch.
        world_size: number of processes sharing every batch.
        seed: seed of the batch draws, the same on every process. Each pass over the sampler is an epoch, and its
            draws come from ``(seed, epoch)``, so a run resumed at an epoch boundary draws what the uninterrupted
            run drew.
        epoch: the epoch of the first pass (:meth:`set_epoch` sets the next one).

    Examples:
        >>> sampler = PoissonBatchSampler(dataset_size=10, sample_rate=0.5, seed=0)
        >>> len(sampler), all(0 <= i < 10 for batch in sampler for i in batch)
        (2, True)
    """

    num_samples = renamed_property("num_samples", "dataset_size")

    @renamed_arguments(num_samples="dataset_size")
    def __init__(
        self,
        dataset_size: int,
        sample_rate: float,
        steps: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        epoch: int = 0,
    ) -> None:
        if not 0 < sample_rate <= 1:
            raise ValueError(f"`sample_rate` must be in (0, 1], got {sample_rate}.")
        self.dataset_size, self.sample_rate = dataset_size, sample_rate
        self.steps = steps if steps is not None else max(1, round(1 / sample_rate))
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, epoch
        self.generator = torch.Generator()

    def set_epoch(self, epoch: int) -> None:
        """Draw the next pass's batches from ``(seed, epoch)``."""
        self.epoch = epoch

    @property
    def sampler(self) -> PoissonBatchSampler:
        """Itself: Lightning calls ``set_epoch`` on a batch sampler's ``sampler`` at the start of every epoch."""
        return self

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        shard = torch.arange(self.dataset_size) % self.world_size == self.rank
        self.generator.manual_seed(_epoch_seed(self.seed, self.epoch))
        self.epoch += 1
        for _ in range(self.steps):
            chosen = torch.rand(self.dataset_size, generator=self.generator) < self.sample_rate
            yield torch.nonzero(chosen & shard).flatten().tolist()


def _epoch_seed(seed: int, epoch: int) -> int:
    return hash((seed, epoch)) % 2**62


class AugmentedViews(Dataset):
    """``K`` augmented views of every example, stacked along a new dimension 1 of each of its tensors.

    Use with ``DPStrategy(augmentation_multiplicity=K)`` (De et al. 2022): an item of the wrapped dataset
    becomes ``(views [K, ...], labels [K])`` and a batch ``[B, K, ...]``; the strategy flattens it to ``B x K``
    rows for ``training_step`` and averages each example's views' gradients before clipping.

    Args:
        dataset: map-style dataset of ``(input, label)`` (or any tuple) items, without augmentation.
        augment: ``augment(input) -> input``, random (it draws from torch's RNG), applied to the first field.
        multiplicity: ``K``.

    Examples:
        >>> data = torch.utils.data.TensorDataset(torch.zeros(4, 2), torch.arange(4))
        >>> views = AugmentedViews(data, lambda x: x + torch.randn_like(x), multiplicity=3)
        >>> [tuple(t.shape) for t in views[0]]
        [(3, 2), (3,)]
    """

    def __init__(self, dataset: Dataset, augment: Callable[[Any], Any], multiplicity: int) -> None:
        if multiplicity < 1:
            raise ValueError(f"`multiplicity` must be >= 1, got {multiplicity}.")
        self.dataset, self.augment, self.multiplicity = dataset, augment, multiplicity

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        first, *rest = self.dataset[index]
        views = torch.stack([torch.as_tensor(self.augment(first)) for _ in range(self.multiplicity)])
        return (
            views,
            *(torch.as_tensor(field).expand(self.multiplicity, *torch.as_tensor(field).shape) for field in rest),
        )


def empty_batch_collate(dataset: Dataset, collate: Callable[[list[Any]], Any]) -> Callable[[list[Any]], Any]:
    """Wrap ``collate`` so that an empty list of examples gives a batch of the right structure with 0 rows.

    The empty batch is the collated first example sliced to length 0, so it works for tuples, dicts and
    datasets that return bare tensors alike.
    """

    def collate_or_empty(examples: list[Any]) -> Any:
        if examples:
            return collate(examples)
        template = collate([dataset[0]])
        return select_examples(template, slice(0, 0))

    return collate_or_empty


def poisson_dataloader(
    dataloader: DataLoader, sample_rate: float, rank: int = 0, world_size: int = 1, seed: int = 0, epoch: int = 0
) -> DataLoader:
    """A loader over the same dataset and collate as ``dataloader``, with Poisson-sampled batches."""
    dataset = dataloader.dataset
    sampler = PoissonBatchSampler(
        len(dataset),  # type: ignore[arg-type]
        sample_rate,
        rank=rank,
        world_size=world_size,
        seed=seed,
        epoch=epoch,
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=empty_batch_collate(dataset, dataloader.collate_fn or default_collate),
        num_workers=dataloader.num_workers,
        pin_memory=dataloader.pin_memory,
        worker_init_fn=dataloader.worker_init_fn,
        persistent_workers=dataloader.persistent_workers if dataloader.num_workers > 0 else False,
    )


def private_train_loader(
    dataloader: DataLoader,
    sample_rate: float | None,
    poisson_sampling: bool,
    rank: int,
    world_size: int,
    draw_seed: Callable[[], int],
) -> tuple[DataLoader, float | None, float]:
    """The loader DP-SGD trains on, its sample rate ``q`` and the expected batch per process.

    A map-style dataset gets Poisson batches at ``q`` (default: the loader's batch size x ``world_size`` over the
    dataset size), sharded over the processes, seeded by ``draw_seed()`` (called once, on every process). An
    iterable dataset keeps its loader: the user samples at the given ``sample_rate`` and the loader's batch size is
    the expected batch. ``poisson_sampling=False`` keeps the loader's own batches (warned: epsilon is then
    approximate).

    Examples:
        >>> loader = DataLoader(torch.utils.data.TensorDataset(torch.zeros(100, 2)), batch_size=10)
        >>> sampled, rate, expected = private_train_loader(loader, None, True, 0, 1, lambda: 0)
        >>> type(sampled.batch_sampler).__name__, rate, expected
        ('PoissonBatchSampler', 0.1, 10.0)
    """
    if isinstance(dataloader.dataset, IterableDataset):
        return dataloader, sample_rate, _expected_batch_of_iterable(dataloader, sample_rate)
    num_examples = len(dataloader.dataset)  # type: ignore[arg-type]
    if poisson_sampling:
        check_train_loader(dataloader, sample_rate)
    rate = min(sample_rate or (dataloader.batch_size or 1) * world_size / num_examples, 1.0)
    expected = rate * num_examples / world_size
    if not poisson_sampling:
        rank_zero_warn("poisson_sampling=False: batches are not Poisson-sampled, so epsilon is approximate.")
        return dataloader, rate, expected
    return poisson_dataloader(dataloader, rate, rank, world_size, draw_seed()), rate, expected


def warn_if_autotuning_every_batch_size(loader: DataLoader, device: torch.device) -> None:
    """Once: cuDNN's autotuner (``torch.backends.cudnn.benchmark``, ``Trainer(benchmark=True)``) tunes every
    convolution again for each new input shape, and Poisson batches have a new size at almost every step."""
    if (
        device.type == "cuda"
        and torch.backends.cudnn.benchmark
        and isinstance(loader.batch_sampler, PoissonBatchSampler)
    ):
        rank_zero_warn(
            "torch.backends.cudnn.benchmark is on (Trainer(benchmark=True), or set by the script), and DP-SGD's "
            "Poisson batches change size at almost every step: cuDNN then tunes every convolution again at almost "
            "every step, which can make each step many times slower. Pass Trainer(benchmark=False)."
        )


def steps_per_epoch(dataloader: Any) -> int | None:
    """The batches of one epoch of ``dataloader``, or ``None`` if it has no length (an iterable dataset's)."""
    try:
        return len(dataloader)
    except TypeError:
        return None


def _expected_batch_of_iterable(dataloader: DataLoader, sample_rate: float | None) -> float:
    if sample_rate is None or not dataloader.batch_size:
        raise RuntimeError(
            "DP-SGD can't Poisson-sample an IterableDataset: use a map-style dataset, or sample each example with "
            "rate q yourself, pass `sample_rate=q`, and give the DataLoader `batch_size` = the expected batch q*N."
        )
    return float(dataloader.batch_size)


def shared_seed(strategy: Any, seed: int | None) -> int:
    """The sampler's seed, the same on every process of ``strategy``; each epoch draws from ``(seed, epoch)``.

    Without a ``seed`` (``None``) process 0 draws one from the OS for every loader and broadcasts it (reloads and
    resumes never replay batches), so that batch membership stays secret, as the privacy amplification by sampling
    assumes. With a ``seed`` (reproducible experiments, warned) a run resumed at an epoch boundary draws the
    batches the uninterrupted run drew.
    """
    if seed is not None:
        return seed
    value = torch.tensor(secrets.randbits(62), device=strategy.root_device)
    return int(strategy.broadcast(value, src=0))
