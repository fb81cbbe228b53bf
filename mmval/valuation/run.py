"""`mmval value`: per-sample, per-modality contributions of a checkpoint (or a model) on a split,
optionally under test-time corruptions of the inputs (`mmval.data.corrupt`), so one can see
how contributions shift when a modality degrades."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from pydantic import TypeAdapter, ValidationError

from mmval.artifacts.checkpoint import Checkpoint, load_checkpoint
from mmval.atomic import write_text_atomic
from mmval.data.corrupt import (
    Corrupt,
    Corruption,
    check_corruptions,
    corruption_metadata,
    corruptor,
)
from mmval.data.shards import DataManifest, ModalitySpec, check_data_dir, read_sources
from mmval.errors import UserError
from mmval.lazy import lazy_module, no_grad
from mmval.models import ModelConfig
from mmval.plugins import PluginField
from mmval.tasks import CLASSIFICATION, Task, TaskField, resolve_task
from mmval.valuation.base import Game, ValuationMethod
from mmval.valuation.config import ValuationConfig
from mmval.valuation.engine import EvalPath, SegmentUnits, build_evaluator, mask_fills
from mmval.valuation.registry import build_method
from mmval.valuation.summary import lowest_contributions
from mmval.valuation.table import (
    Values,
    long_table,
    valuation_metadata,
    weights_fingerprint,
    wide_table,
    write_parquet,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mmval.data.dataset import ParquetSamples
else:
    torch = lazy_module("torch")


@no_grad
def value_dataset(
    model: nn.Module,
    dataset: ParquetSamples,
    method: ValuationMethod,
    config: ValuationConfig,
    *,
    fills: dict[str, torch.Tensor] | None,
    device: torch.device,
    task: Task = CLASSIFICATION,
    batch_size: int = 256,
    positions: Sequence[int] | None = None,
    path: EvalPath = "auto",
    corrupt: Corrupt | None = None,
    per_segment: bool = False,
) -> Values:
    """Value `positions` of the dataset (default: all) in eval mode, their inputs passed
    through `corrupt` first (`mmval.data.corrupt.corruptor`) when given. Batches are read
    without a DataLoader, which would draw from the global RNG and so change a training run.
    With `per_segment` (localisation), every segment of a clip is valued on its own: the game's
    units are the segments, each with its class as label (`SegmentUnits`)."""
    from mmval.data.dataset import Batch

    model.eval()
    config = config.for_task(task)
    if per_segment and task.kind != "localisation":
        raise UserError(f"--per-segment values the segments of clips; this is a {task.kind} model.")
    modalities = [s.name for s in dataset.specs]
    evaluator = build_evaluator(model, modalities, config.mask, fills, device=device, path=path)
    order = np.arange(len(dataset)) if positions is None else np.asarray(positions, np.int64)
    parts = []
    for start in range(0, len(order), batch_size):
        batch = dataset.__getitems__(order[start : start + batch_size].tolist())
        if corrupt is not None:
            batch.inputs = corrupt(batch.inputs, batch.index)
        batch = batch.to(device)
        if per_segment:
            assert batch.target is not None
            segments = batch.target.shape[1]
            units = Batch(
                batch.inputs, batch.target.flatten(), batch.index.repeat_interleave(segments)
            )
            game = Game(SegmentUnits(evaluator, segments), units, config.resolved_benefit)
        else:
            game = Game(evaluator, batch, config.resolved_benefit, task)
        parts.append((game.labels, method.value(game)))
    stderr = [o.stderr for _, o in parts]
    labels = torch.cat([label for label, _ in parts]).cpu().numpy()
    pred = torch.cat([o.pred for _, o in parts]).cpu().numpy()
    ids = [dataset.sample_ids[i] for i in order.tolist()]
    units = len(labels) // max(len(ids), 1)  # segments per clip, or 1
    return Values(
        sample_ids=[i for i in ids for _ in range(units)],
        labels=labels,
        pred=pred,
        v_full=torch.cat([o.v_full for _, o in parts]).cpu().numpy(),
        contribution=torch.cat([o.contribution for _, o in parts]).cpu().numpy(),
        stderr=None if stderr[0] is None else torch.cat(stderr).cpu().numpy(),
        correct=(CLASSIFICATION if per_segment else task).correct(pred, labels),
        segments=np.tile(np.arange(units), len(ids)) if per_segment else None,
    )


PLUGIN_LIST = TypeAdapter(list[PluginField])  # a checkpoint recipe's `plugins:`
TASK_FIELD = TypeAdapter(TaskField | None)  # a checkpoint recipe's `task:`


def split_fills(
    config: ValuationConfig,
    root: Path,
    manifest: DataManifest,
    specs: list[ModalitySpec],
    train_split: str,
) -> dict[str, torch.Tensor] | None:
    """The stand-in inputs for removed modalities; reads the training split for `mean`."""
    from mmval.data.dataset import ParquetSamples

    train = None
    if config.mask == "mean" and train_split in manifest.splits:
        train = ParquetSamples(root, train_split, [s.name for s in specs], manifest=manifest)
    return mask_fills(config.mask, specs, train)


def _device(name: str) -> torch.device:
    """`--device`: cpu, cuda (or cuda:N), or auto (cuda when available, as `train.device`)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use cpu, cuda or auto.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is available; use --device cpu.")
    return device


@dataclass
class ValuationResult:
    table: pd.DataFrame  # long format, one row per ([repeat,] sample, modality)
    metadata: dict[str, str]
    modalities: list[str]
    data_root: Path | None = None  # the data folder valued (where the samples' sources are)


def checkpoint_task(ckpt: Checkpoint, manifest: DataManifest) -> Task:
    """The task the checkpoint was trained for: its recipe's, else its data's."""
    try:
        config = TASK_FIELD.validate_python(ckpt.recipe.get("task"))
    except ValidationError:
        raise UserError(
            "the checkpoint's recipe names a task this mmval version does not know."
        ) from None
    return resolve_task(config, manifest.task, len(manifest.classes))


def _load_weights(
    ckpt: Checkpoint, specs: list[ModalitySpec], task: Task
) -> tuple[nn.Module | None, str]:
    """The checkpoint's model built for these modality specs, or why its weights do not fit."""
    from mmval.models import build_model

    try:
        config = ModelConfig.model_validate(ckpt.recipe["model"])
        plugins = PLUGIN_LIST.validate_python(ckpt.recipe.get("plugins", []))
    except ValidationError:
        return None, "its recipe's model or plugins section is not valid for this mmval version"
    model = build_model(config, specs, task.out_dim(), plugins, task=task.kind)
    try:
        model.load_state_dict(ckpt.model)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = next((line for line in lines if "size mismatch" in line), lines[-1])
        return None, f"its weights do not fit the modality shapes of this data ({detail})"
    return model, ""


def _data_problems(ckpt: Checkpoint, manifest: DataManifest) -> list[str]:
    """What differs between the data a checkpoint was trained on and `manifest`."""
    data = ckpt.data
    names = [s.name for s in manifest.modalities]
    missing = [m for m in data.modalities if m not in names]
    problems = []
    if missing:
        problems.append(
            f"modalities {', '.join(data.modalities)} were trained on, the data has "
            f"{', '.join(names)}"
        )
    trained, classes = list(data.classes), list(manifest.classes)
    if len(trained) != len(classes):
        problems.append(f"{len(trained)} classes were trained on, the data has {len(classes)}")
    elif trained != classes:
        problems.append("the class names or their order differ")
    elif not missing:
        specs = [manifest.modality(m) for m in data.modalities]
        model, why = _load_weights(ckpt, specs, checkpoint_task(ckpt, manifest))
        if model is None:
            problems.append(why)
    return problems


@dataclass
class LoadedCheckpoint:
    """A checkpoint's model with the data it was trained on."""

    ckpt: Checkpoint
    root: Path
    manifest: DataManifest
    model: nn.Module
    modalities: list[str]
    task: Task


def load_with_data(checkpoint: Path, data_dir: Path | None = None) -> LoadedCheckpoint:
    """Load the checkpoint's model and its training data (from `data_dir` if it moved);
    refuse data whose manifest fingerprint differs, naming what differs."""
    from mmval.models.encoders import refuse_untrusted_code

    ckpt = load_checkpoint(checkpoint)
    refuse_untrusted_code(ckpt.recipe.get("model"), checkpoint)
    data = ckpt.data
    root = Path(data_dir) if data_dir is not None else Path(data.path)
    manifest = check_data_dir(root, verify_checksums=True, cached=True)
    if manifest.fingerprint() != data.fingerprint:
        detail = "; ".join(_data_problems(ckpt, manifest)) or (
            "same modalities, shapes and classes, other samples"
        )
        raise UserError(
            f"the data in {root} is not the data {checkpoint} was trained on (manifest "
            f"fingerprints differ: {detail}); pass --data with the directory it was trained on."
        )
    modalities: list[str] = data.modalities
    specs = [manifest.modality(m) for m in modalities]
    task = checkpoint_task(ckpt, manifest)
    model, why = _load_weights(ckpt, specs, task)
    if model is None:
        raise UserError(f"{checkpoint} does not match its own recipe: {why}.")
    return LoadedCheckpoint(ckpt, root, manifest, model, modalities, task)


@dataclass
class SplitOfCheckpoint:
    """A checkpoint's model, one split of its data, and the stand-ins for removed modalities."""

    checkpoint: Path
    loaded: LoadedCheckpoint
    dataset: ParquetSamples
    fills: dict[str, torch.Tensor] | None


def open_split(
    checkpoint: Path, split: str, data_dir: Path | None, config: ValuationConfig
) -> SplitOfCheckpoint:
    """The checkpoint with `split` of the data it was trained on (refused when empty) and the
    fills `config.mask` needs."""
    from mmval.data.dataset import ParquetSamples

    loaded = load_with_data(checkpoint, data_dir)
    root, manifest, modalities = loaded.root, loaded.manifest, loaded.modalities
    dataset = ParquetSamples(root, split, modalities, manifest=manifest)
    if len(dataset) == 0:
        raise UserError(f"split {split!r} of {root} has no samples; pick another with --split.")
    specs = [manifest.modality(m) for m in modalities]
    train_split = loaded.ckpt.recipe.get("data", {}).get("splits", {}).get("train", "train")
    return SplitOfCheckpoint(
        checkpoint, loaded, dataset, split_fills(config, root, manifest, specs, train_split)
    )


def value_checkpoint(
    checkpoint: Path,
    *,
    split: str = "test",
    data_dir: Path | None = None,
    config: ValuationConfig | None = None,
    batch_size: int = 256,
    device: str = "cpu",
    path: EvalPath = "auto",
    corruptions: Sequence[Corruption] = (),
    seed: int = 0,
    repeats: int = 1,
    per_segment: bool = False,
) -> ValuationResult:
    """Value every sample of `split` with the data the checkpoint was trained on. With
    `corruptions`, the inputs are corrupted before the encoders, drawn anew in each of
    `repeats` repeats from `seed` (the table gains a first column `repeat`); without them the
    table is the clean one, with no `repeat` column. shapley-mc's orders come from the config's
    seed and are the same in every repeat, so repeats differ by the corruption draws alone."""
    config = config or ValuationConfig()
    torch_device = _device(device)
    opened = open_split(checkpoint, split, data_dir, config)
    loaded = opened.loaded
    config = config.for_task(loaded.task)
    ckpt, manifest, modalities = loaded.ckpt, loaded.manifest, loaded.modalities
    check_corruptions(list(corruptions), modalities)
    method = build_method(config, modalities)
    model = loaded.model.to(torch_device)
    frames = []
    for repeat in range(repeats if corruptions else 1):
        values = value_dataset(
            model,
            opened.dataset,
            method,
            config,
            fills=opened.fills,
            device=torch_device,
            task=loaded.task,
            batch_size=batch_size,
            path=path,
            corrupt=corruptor(corruptions, opened.dataset, seed=seed, repeat=repeat)
            if corruptions
            else None,
            per_segment=per_segment,
        )
        frames.append(long_table(values, modalities, list(manifest.classes)))
    metadata = valuation_metadata(
        config, modalities, split, manifest, weights_fingerprint(ckpt.model)
    )
    metadata["mmval.checkpoint"] = str(checkpoint)
    metadata["mmval.task"] = loaded.task.kind
    if per_segment:
        metadata["mmval.units"] = "segment"
    if not corruptions:
        return ValuationResult(frames[0], metadata, modalities, loaded.root)
    metadata |= corruption_metadata(corruptions, seed, repeats)
    table = pd.concat(
        [frame.assign(repeat=repeat) for repeat, frame in enumerate(frames)], ignore_index=True
    )
    return ValuationResult(
        table[["repeat", *table.columns[:-1]]], metadata, modalities, loaded.root
    )


def write_valuation(result: ValuationResult, out: Path, *, wide: bool = False) -> None:
    """Write the long (or wide) table atomically, with how it was computed as metadata."""
    frame = wide_table(result.table, result.modalities) if wide else result.table
    write_parquet(frame, {**result.metadata, "mmval.layout": "wide" if wide else "long"}, out)


def lowest_samples(result: ValuationResult, modality: str, k: int) -> pd.DataFrame:
    """The k samples of the valued split in which `modality` contributes least
    (`lowest_contributions`), each with its `source`: the input prep made it of, read from the
    data folder's shards, so the samples can be looked at (a silent clip, a blurred frame)."""
    if modality not in result.modalities:
        raise UserError(
            f"--lowest {modality}: the model has no modality {modality!r} "
            f"({', '.join(result.modalities)})."
        )
    if k < 1:
        raise UserError(f"--k must be at least 1, not {k}.")
    lowest = lowest_contributions(result.table, modality, k)
    if result.data_root is not None:
        split = result.metadata["mmval.split"]
        lowest["source"] = read_sources(result.data_root, split, lowest["sample_id"].tolist())
    return lowest


def write_lowest(frame: pd.DataFrame, result: ValuationResult, modality: str, out: Path) -> None:
    """The lowest-contribution samples as CSV (a `.csv` file) or Parquet. The Parquet metadata
    says how they were valued, under `mmval.valued_with` rather than `mmval.method`, so that
    reports do not take the k rows for a contribution table."""
    if Path(out).suffix.lower() == ".csv":
        write_text_atomic(Path(out), frame.to_csv(index=False, float_format="%.6g"))
        return
    metadata = {k: v for k, v in result.metadata.items() if k != "mmval.method"}
    metadata |= {
        "mmval.valued_with": result.metadata["mmval.method"],
        "mmval.lowest": modality,
        "mmval.k": str(len(frame)),
    }
    write_parquet(frame, metadata, out)
