"""Valuation outputs: the long and wide tables, their Parquet metadata, modality summaries."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mmval.atomic import atomic_path
from mmval.data.shards import DataManifest
from mmval.errors import UserError
from mmval.lazy import lazy_module
from mmval.valuation.config import ValuationConfig

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_module("torch")

SAMPLE_COLUMNS = ["sample_id", "label", "class", "pred", "correct", "v_full"]


@dataclass
class Values:
    """Everything a valuation pass computed, one row per valued sample."""

    sample_ids: list[str]
    labels: np.ndarray  # [N]
    pred: np.ndarray  # [N]
    v_full: np.ndarray  # [N]
    contribution: np.ndarray  # [N, M]
    stderr: np.ndarray | None  # [N, M], sampled methods only
    # [N]: the prediction from all modalities is right (`Task.correct`; None where the task
    # has no single right answer: localisation, segmentation)
    correct: np.ndarray | None = None
    # [N]: the segment of the clip `sample_ids[i]` each row values (per-segment valuation)
    segments: np.ndarray | None = None


def long_table(
    values: Values, modalities: list[str], classes: list[str] | None = None
) -> pd.DataFrame:
    """One row per (sample, modality), sorted by sample_id, modalities in model order:
    sample_id, label[, class], modality, contribution, pred[, correct], v_full[, stderr];
    `class` names the label from the data manifest's `classes` (given: every task's label is
    one of them, the score's binary class for regression, the segment's class per segment);
    `pred` is the class for classification, else the task's score (the predicted score, the
    clip's segment accuracy, the case's mean Dice)."""
    n, m = values.contribution.shape
    order = np.array(sorted(range(n), key=values.sample_ids.__getitem__), dtype=np.int64)
    rows, cols = np.repeat(order, m), np.tile(np.arange(m), n)
    label, pred = values.labels[rows], values.pred[rows]
    frame = pd.DataFrame(
        {
            "sample_id": string_column(values.sample_ids, rows),
            **({} if values.segments is None else {"segment": values.segments[rows]}),
            "label": label,
            **({} if classes is None else {"class": class_names(label, classes)}),
            "modality": string_column(modalities, cols),
            "contribution": values.contribution[rows, cols],
            "pred": pred,
            **({} if values.correct is None else {"correct": values.correct[rows]}),
            "v_full": values.v_full[rows],
        }
    )
    if values.stderr is not None:
        frame["stderr"] = values.stderr[rows, cols]
    return frame


def string_column(values: Sequence[str], order: np.ndarray) -> pd.Series:
    """`values[order]` as a string column, gathered in Arrow: built from Python strings, a
    column that repeats each sample id once per modality or subset costs more than the
    valuation that fills the other columns."""
    return pa.array(values, pa.string()).take(order).to_pandas()


def class_names(labels: np.ndarray, classes: list[str]) -> np.ndarray:
    """The manifest's name of each label (empty for a label outside the classes)."""
    names = np.asarray([*classes, ""], dtype=object)
    index = np.asarray(labels, dtype=np.int64)
    return names[np.where((index >= 0) & (index < len(classes)), index, len(classes))]


def wide_table(table: pd.DataFrame, modalities: list[str]) -> pd.DataFrame:
    """One row per sample (per repeat and sample under corruptions, `repeat` first): the
    sample columns, one contribution column per modality (named after it) and, for sampled
    methods, `stderr_<modality>`."""
    keys = [k for k in ("repeat", "sample_id", "segment") if k in table]
    clash = sorted(set(modalities) & {*keys, *SAMPLE_COLUMNS})
    if clash:
        raise UserError(
            f"--wide names a column after each modality, and {', '.join(clash)} is already a "
            "column of the table; write the long table (without --wide) instead."
        )
    columns = [c for c in SAMPLE_COLUMNS[1:] if c in table]
    per_sample = table.drop_duplicates(keys)[[*keys, *columns]].set_index(keys)
    parts = [per_sample, table.pivot(index=keys, columns="modality", values="contribution")]
    if "stderr" in table:
        stderr = table.pivot(index=keys, columns="modality", values="stderr")
        parts.append(stderr[modalities].add_prefix("stderr_"))
    wide = pd.concat([parts[0], parts[1][modalities], *parts[2:]], axis=1)
    wide.columns.name = None
    return wide.reset_index()


def weights_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 of the weights (names, dtypes, shapes, bytes), not of the file: a table written
    during training carries the same fingerprint as a checkpoint saved at that epoch."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)};".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def split_metadata(
    method: str,
    mask: str,
    modalities: list[str],
    split: str,
    manifest: DataManifest,
    weights: str,
) -> dict[str, str]:
    """What every table of a model on a split records: method, masking, modalities, the split
    and the fingerprints of the data and the weights."""
    return {
        "mmval.method": method,
        "mmval.mask": mask,
        "mmval.modalities": json.dumps(modalities),
        "mmval.split": split,
        "mmval.dataset": manifest.dataset,
        "mmval.data_fingerprint": manifest.fingerprint(),
        "mmval.checkpoint_fingerprint": weights,
    }


def valuation_metadata(
    config: ValuationConfig,
    modalities: list[str],
    split: str,
    manifest: DataManifest,
    weights: str,
) -> dict[str, str]:
    """How a table was computed, stored as Parquet key-value metadata (keys `mmval.*`)."""
    meta = split_metadata(config.method, config.mask, modalities, split, manifest, weights)
    meta["mmval.benefit"] = config.resolved_benefit
    if config.method == "shapley-mc":
        meta["mmval.permutations"] = str(config.n_permutations)
        meta["mmval.seed"] = str(config.rng_seed)
    if config.method == "cmob":
        meta["mmval.confidence"] = config.cmob_confidence
        meta["mmval.confidence_score"] = config.cmob_confidence_score
    return meta


def write_parquet(frame: pd.DataFrame, metadata: dict[str, str], out: Path) -> None:
    """Write atomically, with `metadata` in the Parquet schema's key-value metadata."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    extra = {key.encode(): value.encode() for key, value in metadata.items()}
    with atomic_path(Path(out)) as tmp:
        pq.write_table(
            table.replace_schema_metadata({**(table.schema.metadata or {}), **extra}), tmp
        )
