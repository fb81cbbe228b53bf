"""`mmval value --method subsets`: every sample's prediction from every non-empty subset of the
model's modalities, the missing ones removed as `--mask` says: the missing-modality protocol of
C3R's Table 2 (all 15 combinations of four modalities and their mean). The table holds each
sample once per subset, so any aggregate (per-subset accuracy, the mean over subsets, the worst
subset) is a groupby. With `corruptions` (`mmval.data.corrupt`) the inputs are corrupted
first, `repeats` times, and the full-set rows are QMF's accuracy under noise. The encoders run
once per batch (`Game`), so the table costs about what the exact Shapley table does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from mmval.data.corrupt import (
    Corrupt,
    Corruption,
    check_corruptions,
    corruption_metadata,
    corruptor,
)
from mmval.errors import UserError
from mmval.lazy import lazy_module, no_grad
from mmval.tasks import CLASSIFICATION, Task
from mmval.valuation.base import Game
from mmval.valuation.config import MaskName, ValuationConfig
from mmval.valuation.engine import SubsetEvaluator, build_evaluator, subset_masks
from mmval.valuation.run import SplitOfCheckpoint, _device, open_split
from mmval.valuation.table import (
    split_metadata,
    string_column,
    weights_fingerprint,
    write_parquet,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mmval.data.dataset import ParquetSamples
else:
    torch = lazy_module("torch")

MAX_MODALITIES = 10  # 1023 subsets per sample


def subset_names(modalities: list[str]) -> tuple[torch.Tensor, list[str]]:
    """The non-empty subsets as keep masks [K, M] and their names (`fac+pix`, in the model's
    modality order), smallest first, then in mask order."""
    keep = subset_masks(len(modalities))[1:]
    order = sorted(range(len(keep)), key=lambda k: (int(keep[k].sum()), k))
    keep = keep[order]
    names = [
        "+".join(m for m, on in zip(modalities, row.tolist(), strict=True) if on) for row in keep
    ]
    return keep, names


@no_grad
def subsets_dataset(
    model: nn.Module,
    dataset: ParquetSamples,
    mask: MaskName,
    *,
    fills: dict[str, torch.Tensor] | None,
    device: torch.device,
    task: Task = CLASSIFICATION,
    batch_size: int = 256,
    corruptions: Sequence[Corruption] = (),
    seed: int = 0,
    repeats: int = 1,
) -> pd.DataFrame:
    """One row per (repeat, sample, non-empty subset): repeat, sample_id, label, subset, size,
    then the task's columns (`Task.subset_columns`; classification: pred, correct, p_true, the
    softmax probability of the label). Each repeat draws the corruptions anew
    (`mmval.data.corrupt`); without corruptions one repeat is enough."""
    modalities = [s.name for s in dataset.specs]
    if len(modalities) > MAX_MODALITIES:
        raise UserError(
            f"--method subsets evaluates all 2^M - 1 subsets, exact up to {MAX_MODALITIES} "
            f"modalities; this model has {len(modalities)}."
        )
    check_corruptions(list(corruptions), modalities)
    model.eval()
    keep, names = subset_names(modalities)
    evaluator = build_evaluator(model, modalities, mask, fills, device=device)
    frames = [
        _one_repeat(
            evaluator,
            dataset,
            keep,
            names,
            device,
            task,
            batch_size,
            corruptor(corruptions, dataset, seed=seed, repeat=repeat),
            repeat,
        )
        for repeat in range(repeats)
    ]
    return frames[0] if repeats == 1 else pd.concat(frames, ignore_index=True)


def _one_repeat(
    evaluator: SubsetEvaluator,
    dataset: ParquetSamples,
    keep: torch.Tensor,
    names: list[str],
    device: torch.device,
    task: Task,
    batch_size: int,
    corrupt: Corrupt,
    repeat: int,
) -> pd.DataFrame:
    columns: dict[str, list[torch.Tensor]] = {}
    labels = []
    for start in range(0, len(dataset), batch_size):
        batch = dataset.__getitems__(range(start, min(start + batch_size, len(dataset))))
        batch.inputs = corrupt(batch.inputs, batch.index)
        batch = batch.to(device)
        outcome = Game(evaluator, batch, task.default_benefit(), task).play(keep, confidences=True)
        for name, values in task.subset_columns(outcome, batch).items():
            columns.setdefault(name, []).append(values.T.cpu())  # [B, K]
        labels.append(batch.label.cpu())
    label = torch.cat(labels).numpy()
    k = len(names)
    return pd.DataFrame(
        {
            "repeat": np.full(len(label) * k, repeat),
            "sample_id": string_column(dataset.sample_ids, np.repeat(np.arange(len(label)), k)),
            "label": np.repeat(label, k),
            "subset": string_column(names, np.tile(np.arange(k), len(label))),
            "size": np.tile(keep.sum(1).numpy(), len(label)),
            **{name: torch.cat(parts).numpy().reshape(-1) for name, parts in columns.items()},
        },
        copy=False,  # every column is built fresh here: no need to copy it into blocks
    )


@dataclass
class SubsetsResult:
    table: pd.DataFrame
    metadata: dict[str, str]
    modalities: list[str]

    @property
    def metrics(self) -> list[str]:
        """The columns the task averages per subset (`Task.subset_metrics`)."""
        return json.loads(self.metadata["mmval.subset_metrics"])


def subsets_checkpoint(
    checkpoint: Path,
    *,
    split: str = "test",
    data_dir: Path | None = None,
    mask: MaskName = "feature",
    batch_size: int = 256,
    device: str = "cpu",
    corruptions: Sequence[Corruption] = (),
    seed: int = 0,
    repeats: int = 1,
) -> SubsetsResult:
    """The subsets table of `split` with the data the checkpoint was trained on, under
    `corruptions` drawn `repeats` times from `seed`."""
    opened = open_split(checkpoint, split, data_dir, ValuationConfig(mask=mask))
    return subsets_of_split(
        opened,
        mask=mask,
        batch_size=batch_size,
        device=device,
        corruptions=corruptions,
        seed=seed,
        repeats=repeats,
    )


def subsets_of_split(
    opened: SplitOfCheckpoint,
    *,
    mask: MaskName,
    batch_size: int,
    device: str,
    corruptions: Sequence[Corruption],
    seed: int,
    repeats: int,
) -> SubsetsResult:
    """`subsets_checkpoint` on a split already opened (several tables of one checkpoint, as
    the recipe's `evaluate:` section writes, load it once); `opened`'s fills must be `mask`'s."""
    torch_device = _device(device)
    loaded = opened.loaded
    table = subsets_dataset(
        loaded.model.to(torch_device),
        opened.dataset,
        mask,
        fills=opened.fills,
        device=torch_device,
        task=loaded.task,
        batch_size=batch_size,
        corruptions=corruptions,
        seed=seed,
        repeats=repeats,
    )
    weights = weights_fingerprint(loaded.ckpt.model)
    modalities = loaded.modalities
    split = opened.dataset.split
    metadata = split_metadata("subsets", mask, modalities, split, loaded.manifest, weights)
    metadata |= {
        "mmval.checkpoint": str(opened.checkpoint),
        "mmval.task": loaded.task.kind,
        "mmval.subset_metrics": json.dumps(loaded.task.subset_metrics),
    }
    metadata |= corruption_metadata(corruptions, seed, repeats)
    return SubsetsResult(table, metadata, modalities)


def subset_accuracy(table: pd.DataFrame, columns: Sequence[str] = ("correct",)) -> pd.DataFrame:
    """Accuracy (the mean of `correct`; or of the task's other `subset_metrics` columns) per
    subset, in the table's subset order, and the mean over subsets, as C3R's Table 2 reports
    them."""
    order = list(dict.fromkeys(table["subset"]))
    # over samples and repeats: every repeat holds every sample once
    per_subset = table.groupby("subset", sort=False)[list(columns)].mean().reindex(order)
    per_subset = per_subset.rename(columns={"correct": "accuracy"})
    mean = per_subset.mean().to_frame().T.assign(subset="mean over subsets")
    return pd.concat([per_subset.reset_index(), mean], ignore_index=True)


def write_subsets(result: SubsetsResult, out: Path) -> None:
    write_parquet(result.table, result.metadata, out)
