"""The run folder `output/name/seed<k>/`: its file names and readers for its plain files.

Torch-free: `mmval report` reads run folders through this module without importing torch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from mmval.errors import UserError

LAST = "last.pt"  # newest training state, for --resume
PREVIOUS = "last.prev.pt"  # the last.pt before the newest: resume falls back on it
BEST = "best.pt"  # weights at the best validation accuracy
SUMMARY = "summary.json"  # written when the run finished
METRICS = "metrics.parquet"  # one row per epoch
RECIPE_FILE = "recipe.yaml"  # the recipe as run, written when the run starts
LOG = "train.log"  # one JSON line per epoch
PREDICTIONS = "predictions.parquet"  # per-sample test predictions of best.pt
TB_DIR = "tb"  # TensorBoard event files (train.tensorboard)
CONTRIB_GLOB = "contrib_epoch*.parquet"  # valuation during training (the recipe's valuation:)
CONTRIB_EPOCH = re.compile(r"contrib_epoch(\d+)\.parquet$")


def contrib_file(epoch: int) -> str:
    """The file of the contributions valued after `epoch` (counted from 1)."""
    return f"contrib_epoch{epoch}.parquet"


def run_folder(output: Path | str, name: str, seed: int) -> Path:
    return Path(output) / name / f"seed{seed}"


class DamagedRunFile(UserError):
    """A run file that is there but cannot be read as what mmval wrote; `reason` says how,
    starting with the file's name (`summary.json is not JSON`)."""

    def __init__(self, run_dir: Path, reason: str) -> None:
        super().__init__(f"{run_dir}: {reason}")
        self.reason = reason


def read_summary(run_dir: Path) -> Any:
    """The run's summary.json as parsed (a mapping for mmval's own), or None before it
    finished; `DamagedRunFile` when it cannot be read or is not JSON."""
    path = Path(run_dir) / SUMMARY
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedRunFile(run_dir, f"{SUMMARY} is not JSON ({error_line(exc)})") from exc
    except OSError as exc:
        raise DamagedRunFile(run_dir, f"{SUMMARY} cannot be read ({exc.strerror})") from exc


def read_metrics(run_dir: Path) -> pd.DataFrame:
    """Every epoch's metrics of a run (empty before its first epoch ended); `DamagedRunFile`
    when the file cannot be read (cut short, overwritten)."""
    return _read_parquet(Path(run_dir), METRICS)


def read_predictions(run_dir: Path) -> pd.DataFrame | None:
    """The test predictions of best.pt, None when the run saved none; `DamagedRunFile` when
    the file cannot be read."""
    path = Path(run_dir) / PREDICTIONS
    return _read_parquet(Path(run_dir), PREDICTIONS) if path.is_file() else None


def _read_parquet(run_dir: Path, name: str) -> pd.DataFrame:
    path = run_dir / name
    if not path.is_file():
        return pd.DataFrame()
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise DamagedRunFile(run_dir, f"{name} cannot be read ({error_line(exc)})") from exc


def error_line(exc: BaseException) -> str:
    """For a left-out reason: the first line of an error (pyarrow's run over several), cut."""
    text = str(exc).strip().splitlines()
    return text[0][:120] if text else type(exc).__name__
