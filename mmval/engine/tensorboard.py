"""TensorBoard event files beside metrics.parquet (`train.tensorboard: true`).

Written with `torch.utils.tensorboard.SummaryWriter` (PyTorch's writer over the official
`tensorboard` package, which also holds the viewer and the reader the tests use). One scalar per
metrics.parquet column and epoch, the step being the epoch (1-based) as in metrics.parquet:
column `val_acc_audio` becomes tag `val/acc_audio`, `method_coeff_a` becomes `method/coeff_a`,
and `lr` / `seconds` go under `train/`.
"""

from __future__ import annotations

from typing import Any

from mmval import distributed
from mmval.artifacts.layout import TB_DIR
from mmval.engine.loop import Callback, Fit

_GROUPS = ("train", "val", "test", "method")


def scalar_tag(column: str) -> str:
    """`val_acc` -> `val/acc`: TensorBoard draws one section per prefix."""
    head, _, rest = column.partition("_")
    return f"{head}/{rest}" if head in _GROUPS and rest else f"train/{column}"


class TensorBoard(Callback):
    """Writes each finished epoch's row (rank 0, when `train.tensorboard` is on).

    A run that starts again after epoch k (resumed, or restarted before its first checkpoint)
    opens its writer with `purge_step=k+1`, so TensorBoard hides any later epochs an interrupted
    attempt had logged past its last checkpoint: no step is shown twice. A run that gets
    TensorBoard turned on when resumed first writes the epochs it already has.
    """

    def __init__(self) -> None:
        self._writer: Any = None

    def on_train_start(self, fit: Fit) -> None:
        if not (fit.recipe.train.tensorboard and distributed.is_main()):
            return
        from torch.utils.tensorboard import SummaryWriter

        directory = fit.run_dir / TB_DIR
        done = fit.state.rows
        logged_before = directory.is_dir() and any(directory.glob("events.out.tfevents.*"))
        purge_step = len(done) + 1 if logged_before else None
        self._writer = SummaryWriter(str(directory), purge_step=purge_step)
        if not logged_before:
            for row in done:
                self._write(row)

    def on_epoch_end(self, fit: Fit, row: dict[str, float]) -> None:
        if self._writer is not None:
            self._write(row)

    def teardown(self, fit: Fit) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _write(self, row: dict[str, float]) -> None:
        step = int(row["epoch"])
        for column, value in row.items():
            if column != "epoch":
                self._writer.add_scalar(scalar_tag(column), float(value), step)
        self._writer.flush()  # a killed run keeps every epoch it finished
