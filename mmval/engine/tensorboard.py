"""TensorBoard event files beside metrics.parquet (`train.tensorboard: true`).

Written with `torch.utils.tensorboard.SummaryWriter` (PyTorch's writer over the official
`tensorboard` package, which also holds the viewer and the reader the tests use). One scalar per
metrics.parquet column and epoch, the step being the epoch (1-based) as in metrics.parquet:
column `val_acc_audio` becomes tag `val/acc_audio`, `method_coeff_a` becomes `method/coeff_a`,
and `lr` / `seconds` go under `train/`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

TB_DIR = "tb"
_GROUPS = ("train", "val", "test", "method")


def scalar_tag(column: str) -> str:
    """`val_acc` -> `val/acc`: TensorBoard draws one section per prefix."""
    head, _, rest = column.partition("_")
    return f"{head}/{rest}" if head in _GROUPS and rest else f"train/{column}"


@contextmanager
def epoch_writer(
    run_dir: Path, done: Sequence[dict[str, float]], *, enabled: bool
) -> Iterator[Callable[[dict[str, float]], None]]:
    """Yields `write(row)` for each finished epoch (a no-op when disabled).

    A run that starts again after epoch k (resumed, or restarted before its first checkpoint)
    opens its writer with `purge_step=k+1`, so TensorBoard hides any later epochs an interrupted
    attempt had logged past its last checkpoint: no step is shown twice. A run that gets
    TensorBoard turned on when resumed first writes the epochs it already has (`done`).
    """
    if not enabled:
        yield lambda row: None
        return
    from torch.utils.tensorboard import SummaryWriter

    directory = run_dir / TB_DIR
    logged_before = directory.is_dir() and any(directory.glob("events.out.tfevents.*"))
    writer = SummaryWriter(str(directory), purge_step=len(done) + 1 if logged_before else None)

    def write(row: dict[str, float]) -> None:
        step = int(row["epoch"])
        for column, value in row.items():
            if column != "epoch":
                writer.add_scalar(scalar_tag(column), float(value), step)
        writer.flush()  # a killed run keeps every epoch it finished

    try:
        if not logged_before:
            for row in done:
                write(row)
        yield write
    finally:
        writer.close()
