"""De et al. (2022)'s DP-SGD recipe for CIFAR-10 with a WRN-16-4, for users who have the data and a GPU.

    python examples/dp_cifar10.py --data-dir /path/to/cifar10 --epsilon 8

WRN-16-4 with weight standardisation + GroupNorm(16), SGD with momentum 0 at a constant learning rate,
no weight decay, large batches, and an EMA of the parameters (IterateAveraging) for evaluation. The paper
reaches ~79.5% with WRN-16-4 at (8, 1e-5) using batch 4096 and augmentation multiplicity 16 (random crops
and flips); this script defaults to 4 views (memory) and processes each batch in physical parts of 256.
Needs torchvision (not a dependency of lightning_nt) and the CIFAR-10 files (`--download` fetches them).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from lightning_nt import DPStrategy, IterateAveraging
from lightning_nt.demos import wide_resnet
from lightning_nt.privacy import AugmentedViews


class CIFAR10Classifier(pl.LightningModule):
    def __init__(self, lr: float = 4.0) -> None:
        super().__init__()
        self.net = wide_resnet(16, 4, norm="group")
        self.accuracy = MulticlassAccuracy(num_classes=10, average="micro")
        self.lr = lr

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.accuracy(self.net(batch[0]), batch[1])
        self.log("val/acc", self.accuracy, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.0)


def loaders(data_dir: str, batch_size: int, download: bool, views: int) -> tuple[DataLoader, DataLoader]:
    try:
        import torchvision
        from torchvision import transforms
    except ImportError as error:
        raise SystemExit("This example needs torchvision: pip install torchvision") from error
    normalize = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))]
    )
    flip_and_crop = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()])
    plain = torchvision.datasets.CIFAR10(data_dir, train=True, transform=normalize, download=download)
    train = AugmentedViews(plain, flip_and_crop, multiplicity=views)
    test = torchvision.datasets.CIFAR10(data_dir, train=False, transform=normalize, download=download)
    return (
        DataLoader(train, batch_size=batch_size, num_workers=8, pin_memory=True),
        DataLoader(test, batch_size=1024, num_workers=8),
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--download", action="store_true")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--physical-batch-size", type=int, default=256)
    parser.add_argument("--views", type=int, default=4, help="augmentation multiplicity K")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--lr", type=float, default=2.0)
    args = parser.parse_args(argv)
    pl.seed_everything(0)
    train, test = loaders(args.data_dir, args.batch_size, args.download, args.views)
    strategy = DPStrategy(
        target_epsilon=args.epsilon,
        delta=1e-5,
        max_grad_norm=1.0,
        max_physical_batch_size=args.physical_batch_size,
        augmentation_multiplicity=args.views,
    )
    trainer = pl.Trainer(
        accelerator="gpu",
        max_epochs=args.epochs,
        strategy=strategy,
        precision="32-true",
        callbacks=[IterateAveraging(mode="ema", decay=0.999, bn="copy", apply_on_end=True)],
    )
    trainer.fit(CIFAR10Classifier(args.lr), train, test)
    accuracy = trainer.callback_metrics["val/acc"]
    print(f"(epsilon={strategy.epsilon:.2f}, delta=1e-5); test accuracy with the EMA {accuracy:.4f}")


if __name__ == "__main__":
    main()
