"""The run folder `output/name/seed<k>/`: its file names and readers for its plain files.

Torch-free: `mmval report` reads run folders through this module without importing torch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mmval.atomic import TEMP_SUFFIX
from mmval.errors import UserError
from mmval.locks import LOCK_FILE

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
EVALUATE_DIR = "evaluate"  # the recipe's evaluate: tables (mmval.valuation.evaluate)
CORRUPT_LAST = LAST + ".corrupt"  # a damaged last.pt set aside by --resume
TB_EVENTS = "events.out.tfevents.*"  # TensorBoard's files in tb/
# an MLflow store's database (train.tracking): the copies of run files below it are no runs
MLFLOW_DB = "mlflow.db"
# every file of a run folder that mmval writes under a fixed name
RUN_FILES = (RECIPE_FILE, LOG, METRICS, SUMMARY, LAST, PREVIOUS, CORRUPT_LAST, BEST, PREDICTIONS)
RUN_MARKERS = (RECIPE_FILE, SUMMARY)  # written first and last: a folder with one is a run folder


def contrib_file(epoch: int) -> str:
    """The file of the contributions valued after `epoch` (counted from 1)."""
    return f"contrib_epoch{epoch}.parquet"


def run_folder(output: Path | str, name: str, seed: int) -> Path:
    return Path(output) / name / f"seed{seed}"


def checkpoint_of(path: Path) -> Path:
    """The checkpoint a command reads: `path` itself, or the best.pt of the run folder `path`;
    a folder holding several runs (a sweep, a recipe's seeds) is refused, listing them."""
    path = Path(path)
    if not path.is_dir():
        return path
    if (path / BEST).is_file():
        return path / BEST
    if any((path / marker).is_file() for marker in RUN_MARKERS):
        raise UserError(
            f"{path} is a run folder without {BEST} yet (written after its first evaluation)."
        )
    runs = sorted(best.parent for best in path.rglob(BEST))
    if not runs:
        raise UserError(f"{path} holds no run folder (no {BEST} in it or below it).")
    if len(runs) == 1:
        return runs[0] / BEST
    listing = "\n".join(f"  {run}" for run in runs[:20])
    more = f"\n  and {len(runs) - 20} more" if len(runs) > 20 else ""
    raise UserError(
        f"{path} holds {len(runs)} runs; name one of them (its {BEST} is used):\n{listing}{more}"
    )


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


def check_predictions(run_dir: Path) -> None:
    """`DamagedRunFile` when the run's test predictions are there but cannot be read whole
    (read, not converted: a report checks every run's before it reads those it compares)."""
    if (Path(run_dir) / PREDICTIONS).is_file():
        _read_table(Path(run_dir), PREDICTIONS)


def _read_parquet(run_dir: Path, name: str) -> pd.DataFrame:
    if not (run_dir / name).is_file():
        return pd.DataFrame()
    return _read_table(run_dir, name).to_pandas()


def _read_table(run_dir: Path, name: str) -> pa.Table:
    try:
        # the file's own reader: pd.read_parquet's dataset layer costs a report of many runs
        # more than the reading (3 to 5 times as long on a small run's files, same frame)
        with pq.ParquetFile(run_dir / name) as file:
            return file.read(use_pandas_metadata=True)
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise DamagedRunFile(run_dir, f"{name} cannot be read ({error_line(exc)})") from exc


def error_line(exc: BaseException) -> str:
    """For a left-out reason: the first line of an error (pyarrow's run over several), cut."""
    text = str(exc).strip().splitlines()
    return text[0][:120] if text else type(exc).__name__


def run_files(run_dir: Path) -> list[Path]:
    """The files of `run_dir` that mmval wrote, known by name: RUN_FILES, contributions,
    TensorBoard's events in tb/, evaluate/'s tables and the temp files of interrupted writes.
    What `--overwrite` deletes; anything else in the folder is the user's and is kept."""
    run_dir = Path(run_dir)
    found = [run_dir / name for name in RUN_FILES]
    found += [p for p in run_dir.glob("contrib_epoch*.parquet") if CONTRIB_EPOCH.match(p.name)]
    found += run_dir.glob(f"{TB_DIR}/{TB_EVENTS}")
    found += run_dir.glob(f"{EVALUATE_DIR}/*.parquet")
    for folder in (run_dir, run_dir / TB_DIR, run_dir / EVALUATE_DIR):
        found += folder.glob(f".*{TEMP_SUFFIX}")
    return [path for path in found if path.is_file() and not path.is_symlink()]


def run_folder_state(run_dir: Path) -> Literal["empty", "run", "foreign"]:
    """The folder's kind: "empty" (or missing), "run" (it holds recipe.yaml or summary.json,
    or nothing but files mmval names), or "foreign": a folder of other files, which mmval
    neither writes into nor deletes from."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return "empty"
    entries = [p for p in run_dir.iterdir() if p.name != LOCK_FILE]
    if not entries:
        return "empty"
    if any((run_dir / name).is_file() for name in RUN_MARKERS):
        return "run"
    known = set(run_files(run_dir))
    mine = [
        p
        for p in entries
        if p in known
        or (p.name in (TB_DIR, EVALUATE_DIR) and p.is_dir() and set(p.iterdir()) <= known)
    ]
    return "run" if len(mine) == len(entries) else "foreign"
