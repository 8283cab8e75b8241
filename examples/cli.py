"""LightningCLI entry point: every callback and strategy of lightning_nt can be set from YAML.

The model is any digits classifier (``model.class_path``: ``lightning_nt.demos.DigitsCNN`` or ``DigitsMLP``).

python examples/cli.py fit --config examples/configs/digits.yaml
python examples/cli.py fit --config examples/configs/digits.yaml --trainer.max_epochs 3
"""

from __future__ import annotations

from collections.abc import Sequence

from pytorch_lightning.cli import LightningCLI
from summary import summarize

import lightning_nt  # noqa: F401  (registers the strategies by name)
from lightning_nt.demos import DigitsClassifier, DigitsDataModule


class SummarizingCLI(LightningCLI):
    """LightningCLI that says, after ``fit``, what each lightning_nt capability of the run did."""

    def after_fit(self) -> None:
        if self.trainer.is_global_zero:
            for line in summarize(self.trainer):
                print(line)
            print(f"TensorBoard: tensorboard --logdir {self.trainer.log_dir}")


def main(args: Sequence[str] | None = None) -> LightningCLI:
    return SummarizingCLI(
        DigitsClassifier,
        DigitsDataModule,
        subclass_mode_model=True,
        args=args,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
