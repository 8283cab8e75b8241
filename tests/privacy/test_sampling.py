import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_nt.privacy.sampling import private_train_loader, warn_if_autotuning_every_batch_size


@pytest.fixture
def autotuning():
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    yield
    torch.backends.cudnn.benchmark = before


def _loaders():
    loader = DataLoader(TensorDataset(torch.zeros(100, 2)), batch_size=10)
    poisson, _, _ = private_train_loader(loader, None, True, 0, 1, lambda: 0)
    return loader, poisson


def test_cudnn_autotuning_beside_poisson_batches_on_cuda_is_warned(autotuning):
    """A real fit of WRN-16-4 on an H200 with cudnn.benchmark on took 1.3 s a DP step (Opacus alone: 57 ms at a
    fixed batch size); cuDNN tunes every convolution again for each new input shape, and Poisson batches bring one
    at almost every step (the likely cause, not yet measured apart)."""
    _, poisson = _loaders()
    with pytest.warns(UserWarning, match=r"cudnn.benchmark is on .* Pass Trainer\(benchmark=False\)"):
        warn_if_autotuning_every_batch_size(poisson, torch.device("cuda", 0))


def test_no_autotuning_warning_without_cuda_poisson_batches_or_the_autotuner(autotuning):
    fixed, poisson = _loaders()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_autotuning_every_batch_size(poisson, torch.device("cpu"))
        warn_if_autotuning_every_batch_size(fixed, torch.device("cuda", 0))
        torch.backends.cudnn.benchmark = False
        warn_if_autotuning_every_batch_size(poisson, torch.device("cuda", 0))
