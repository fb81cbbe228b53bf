"""`mmval value --method feature-mask`: IMML's probe of a frozen model's latent features.

Li et al., arXiv 2406.11490, Fig. 1c: on a trained, frozen model, random dimensions of the
latent multimodal features are masked at increasing ratios, per modality, and the accuracy is
drawn as a heatmap; masking some dimensions can raise the accuracy, so part of the latent is not
discriminative. IMML publishes no code and the figure's protocol is not spelled out, so every
choice below is [ours]:
- the latent of modality m is what the fusion head reads (`model.encode`: the encoder's output,
  after the plug-ins' necks and MMTM's mid-fusion where a recipe has them), D_m dimensions;
- ratio r masks round(r * D_m) of them (halves rounded up), set to 0 (as `--mask feature` removes
  a whole modality), the other modalities intact; ratio 1 is the subsets table's row without m;
- one draw of dimensions per (seed, repeat, modality, number of masked dimensions), shared by all
  samples (the figure masks "dimensions of the latent", not per-sample positions); draws of
  different ratios are independent, not nested;
- the default ratios are 0, 0.1, ..., 0.9; `repeats` draws, accuracy averaged over them.
The encoders run once per batch; the fusion head runs once per (repeat, modality, ratio), all
of them batched into calls of at most `MAX_ELEMENTS` feature values. Models without one encoder
per modality (whose fusion does not read per-modality features) are refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from mmval.data.corrupt import draw_seed
from mmval.errors import UserError
from mmval.lazy import lazy_module, no_grad
from mmval.valuation.config import ValuationConfig
from mmval.valuation.engine import MAX_ELEMENTS
from mmval.valuation.run import SplitOfCheckpoint, _device, open_split
from mmval.valuation.table import split_metadata, weights_fingerprint, write_parquet

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mmval.data.dataset import ParquetSamples
else:
    torch = lazy_module("torch")

DEFAULT_RATIOS = "0,0.1,...,0.9"  # [ours]


def parse_ratios(text: str) -> list[float]:
    """`0,0.25,0.5` or an arithmetic progression `0,0.1,...,0.9` (first, second, ..., last)."""
    items = [item.strip() for item in text.split(",")]
    problem = _ratio_problem(items)
    if problem:
        raise UserError(
            f"--ratios {text!r}: {problem}. Write comma-separated shares of each modality's "
            "feature dimensions to mask, each from 0 to 1 (e.g. 0,0.25,0.5), or a progression "
            "first,second,...,last (e.g. 0,0.1,...,0.9)."
        )
    if "..." not in items:
        return [float(item) for item in items]
    first, second, last = float(items[0]), float(items[1]), float(items[3])
    step = second - first
    count = round((last - first) / step)
    return [round(first + k * step, 10) for k in range(count + 1)]


def _ratio_problem(items: list[str]) -> str:
    if items == [""]:
        return "no ratio given"
    values = []
    for item in items:
        if item == "...":
            continue
        try:
            values.append(float(item))
        except ValueError:
            return f"{item!r} is not a number"
    outside = [v for v in values if not 0 <= v <= 1]  # NaN included
    if outside:
        return f"{outside[0]:g} lies outside [0, 1]"
    if "..." in items:
        if len(items) != 4 or items[2] != "..." or items.count("...") != 1:
            return "a progression is written first,second,...,last"
        first, second, last = values
        count = (last - first) / (second - first) if second > first else -1.0
        if count < 1 or abs(count - round(count)) > 1e-6:
            return "the progression must rise and reach its last value in whole steps"
    if len(set(values)) != len(values):
        return "a ratio is listed twice"
    return ""


def check_ratios(ratios: list[float]) -> None:
    """Ratios handed to the library directly: at least one, each in [0, 1], none twice."""
    problem = _ratio_problem([str(float(r)) for r in ratios] or [""])
    if problem:
        raise UserError(f"ratios {ratios}: {problem}.")


def masked_count(ratio: float, dims: int) -> int:
    """round(ratio * dims), halves rounded up."""
    return min(dims, math.floor(ratio * dims + 0.5))


def masked_dims(dims: int, ratio: float, *, seed: int, repeat: int, modality: int) -> torch.Tensor:
    """The indices of the dimensions masked at `ratio` for (seed, repeat, modality index),
    shared by every sample; the same for ratios that mask as many dimensions."""
    count = masked_count(ratio, dims)
    g = torch.Generator().manual_seed(draw_seed(seed, repeat, modality, count))
    return torch.randperm(dims, generator=g)[:count].sort().values


@dataclass(frozen=True)
class Variant:
    repeat: int
    modality: int
    ratio: float


def _keep_masks(
    dims: list[int], variants: list[Variant], seed: int, device: torch.device
) -> list[torch.Tensor]:
    """Per modality, [K, D_m] booleans: False where variant k masks that dimension."""
    keep = [torch.ones(len(variants), d, dtype=torch.bool) for d in dims]
    for k, v in enumerate(variants):
        dropped = masked_dims(
            dims[v.modality], v.ratio, seed=seed, repeat=v.repeat, modality=v.modality
        )
        keep[v.modality][k, dropped] = False
    return [mask.to(device) for mask in keep]


@no_grad
def feature_mask_dataset(
    model: nn.Module,
    dataset: ParquetSamples,
    ratios: list[float],
    *,
    device: torch.device,
    seed: int = 0,
    repeats: int = 1,
    batch_size: int = 256,
) -> pd.DataFrame:
    """One row per (repeat, modality, ratio, sample), in that order: repeat, modality, ratio,
    sample_id, label, pred, correct, p_true (the softmax probability of the label)."""
    from mmval.models import MultimodalModel

    if not isinstance(model, MultimodalModel):
        raise UserError(
            "--method feature-mask masks dimensions of each modality's features before the "
            "fusion head, which needs a model with one encoder per modality (MultimodalModel); "
            f"{type(model).__name__} takes all inputs at once."
        )
    check_ratios(ratios)
    if repeats < 1:
        raise UserError(f"repeats {repeats}: at least one draw is needed.")
    model.eval()
    modalities = [s.name for s in dataset.specs]
    dims = [model.feature_dims[m] for m in modalities]
    variants = [
        Variant(repeat, j, ratio)
        for repeat in range(repeats)
        for j in range(len(modalities))
        for ratio in ratios
    ]
    keep = _keep_masks(dims, variants, seed, device)
    preds, confidences, labels = [], [], []
    for start in range(0, len(dataset), batch_size):
        batch = dataset.__getitems__(range(start, min(start + batch_size, len(dataset))))
        batch = batch.to(device)
        features = model.encode(batch.inputs)
        chunk = max(1, MAX_ELEMENTS // (len(batch.label) * sum(dims)))
        parts = []
        for lo in range(0, len(variants), chunk):
            masked = {
                m: torch.where(keep[j][lo : lo + chunk, None, :], features[m][None], 0.0)
                for j, m in enumerate(modalities)
            }
            k = masked[modalities[0]].shape[0]
            logits = model.fuse({m: x.flatten(0, 1) for m, x in masked.items()})
            parts.append(logits.view(k, len(batch.label), -1))
        prob = torch.softmax(torch.cat(parts).double(), -1)  # [K, B, C]
        index = batch.label[None, :, None].expand(prob.shape[0], -1, 1)
        preds.append(prob.argmax(-1).cpu())
        confidences.append(prob.gather(-1, index)[..., 0].cpu())
        labels.append(batch.label.cpu())
    pred = torch.cat(preds, 1).numpy()  # [K, N]
    label = torch.cat(labels).numpy()
    n = len(label)
    return pd.DataFrame(
        {
            "repeat": np.repeat([v.repeat for v in variants], n),
            "modality": np.repeat(
                np.asarray([modalities[v.modality] for v in variants], dtype=object), n
            ),
            "ratio": np.repeat([v.ratio for v in variants], n),
            "sample_id": np.tile(np.asarray(dataset.sample_ids, dtype=object), len(variants)),
            "label": np.tile(label, len(variants)),
            "pred": pred.reshape(-1),
            "correct": (pred == label[None]).reshape(-1),
            "p_true": torch.cat(confidences, 1).numpy().reshape(-1),
        }
    )


@dataclass
class FeatureMaskResult:
    table: pd.DataFrame
    metadata: dict[str, str]
    modalities: list[str]


def feature_mask_checkpoint(
    checkpoint: Path,
    *,
    ratios: list[float],
    split: str = "test",
    data_dir: Path | None = None,
    seed: int = 0,
    repeats: int = 1,
    batch_size: int = 256,
    device: str = "cpu",
) -> FeatureMaskResult:
    """The feature-mask table of `split` with the data the checkpoint was trained on."""
    check_ratios(ratios)
    opened = open_split(checkpoint, split, data_dir, ValuationConfig(mask="feature"))
    return feature_mask_of_split(
        opened, ratios=ratios, seed=seed, repeats=repeats, batch_size=batch_size, device=device
    )


def feature_mask_of_split(
    opened: SplitOfCheckpoint,
    *,
    ratios: list[float],
    seed: int,
    repeats: int,
    batch_size: int,
    device: str,
) -> FeatureMaskResult:
    """`feature_mask_checkpoint` on a split already opened (it reads no fills), for ratios
    already checked."""
    torch_device = _device(device)
    loaded = opened.loaded
    if loaded.task.kind != "classification":
        raise UserError(
            f"--method feature-mask reports the accuracy of class predictions; "
            f"{opened.checkpoint} was trained for {loaded.task.kind}: use --method subsets "
            "(every subset of the modalities, with the task's own measures) instead."
        )
    model = loaded.model.to(torch_device)
    table = feature_mask_dataset(
        model,
        opened.dataset,
        ratios,
        device=torch_device,
        seed=seed,
        repeats=repeats,
        batch_size=batch_size,
    )
    modalities = loaded.modalities
    weights = weights_fingerprint(loaded.ckpt.model)
    split = opened.dataset.split
    metadata = split_metadata(
        "feature-mask", "feature", modalities, split, loaded.manifest, weights
    )
    metadata |= {
        "mmval.checkpoint": str(opened.checkpoint),
        "mmval.ratios": json.dumps(ratios),
        "mmval.repeats": str(repeats),
        "mmval.seed": str(seed),
        "mmval.feature_dims": json.dumps({m: model.feature_dims[m] for m in modalities}),
    }
    return FeatureMaskResult(table, metadata, modalities)


def feature_mask_accuracy(table: pd.DataFrame) -> pd.DataFrame:
    """The heatmap of IMML's Fig. 1c: a row per modality (model order), a column per ratio
    (named as `{ratio:g}`), the accuracy over samples averaged over repeats."""
    # every repeat holds every sample once, so the mean over rows is the mean over repeats
    accuracy = table.groupby(["modality", "ratio"], sort=False)["correct"].mean().unstack("ratio")
    accuracy = accuracy.reindex(index=list(dict.fromkeys(table["modality"])))
    accuracy = accuracy[list(dict.fromkeys(table["ratio"]))]
    accuracy.columns = [f"{r:g}" for r in accuracy.columns]
    return accuracy.rename_axis("modality").reset_index()


def write_feature_mask(result: FeatureMaskResult, out: Path) -> None:
    write_parquet(result.table, result.metadata, out)
