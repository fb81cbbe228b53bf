"""`mmval value`: per-sample, per-modality contributions of a checkpoint on one split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader

from mmval.atomic import atomic_path
from mmval.data.dataset import ParquetSamples, collate_batch
from mmval.data.shards import check_data_dir
from mmval.engine.checkpoint import load_checkpoint
from mmval.errors import UserError
from mmval.models import ModelConfig, build_model
from mmval.valuation.shapley import correctness_benefit, exact_shapley, subset_logits, subset_masks

MAX_EXACT_MODALITIES = 10


@dataclass
class ValuationResult:
    table: pd.DataFrame  # long format, one row per (sample, modality)
    metadata: dict[str, str]


def value_checkpoint(
    checkpoint: Path,
    *,
    split: str = "test",
    data_dir: Path | None = None,
    batch_size: int = 256,
    device: str = "cpu",
) -> ValuationResult:
    ckpt = load_checkpoint(checkpoint)
    data = ckpt["data"]
    root = Path(data_dir) if data_dir is not None else Path(data["path"])
    manifest = check_data_dir(root)
    if manifest.fingerprint() != data["fingerprint"]:
        raise UserError(
            f"the data in {root} is not the data {checkpoint} was trained on (manifest "
            "fingerprints differ); pass --data with the directory it was trained on."
        )
    modalities: list[str] = data["modalities"]
    if len(modalities) > MAX_EXACT_MODALITIES:
        raise UserError(
            f"exact Shapley over {len(modalities)} modalities needs 2^{len(modalities)} subsets; "
            f"at most {MAX_EXACT_MODALITIES} are supported."
        )
    torch_device = torch.device(device)
    specs = [manifest.modality(m) for m in modalities]
    model_cfg = ModelConfig.model_validate(ckpt["recipe"]["model"])
    model = build_model(model_cfg, specs, len(manifest.classes))
    model.load_state_dict(ckpt["model"])
    model.to(torch_device).eval()

    dataset = ParquetSamples(root, split, modalities, manifest=manifest)
    masks = subset_masks(len(modalities))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_batch)
    parts = []
    with torch.no_grad():
        for batch in loader:
            batch = batch.to(torch_device)
            logits = subset_logits(model, model.encode(batch.inputs), masks)
            benefit = correctness_benefit(logits, batch.label, masks)
            phi = exact_shapley(benefit, len(modalities)).cpu().numpy()
            full = logits[-1]
            pred = full.argmax(1).cpu().numpy()
            label = batch.label.cpu().numpy()
            ids = [dataset.sample_ids[i] for i in batch.index.tolist()]
            for j, name in enumerate(modalities):
                parts.append(
                    pd.DataFrame(
                        {
                            "sample_id": ids,
                            "label": label,
                            "modality": name,
                            "contribution": phi[:, j],
                            "pred": pred,
                            "correct": pred == label,
                            "v_full": benefit[:, -1].cpu().numpy(),
                        }
                    )
                )
    table = pd.concat(parts, ignore_index=True)
    table["modality"] = pd.Categorical(table["modality"], categories=modalities)
    table = table.sort_values(["sample_id", "modality"], kind="stable").reset_index(drop=True)
    table["modality"] = table["modality"].astype(str)
    metadata = {
        "mmval.valuation": "shapley",
        "mmval.benefit": "correct",
        "mmval.mask": "feature",
        "mmval.split": split,
        "mmval.checkpoint": str(checkpoint),
        "mmval.dataset": manifest.dataset,
        "mmval.data_fingerprint": manifest.fingerprint(),
    }
    return ValuationResult(table, metadata)


def write_valuation(result: ValuationResult, out: Path) -> None:
    """Write the table atomically, with how it was computed in the Parquet schema metadata."""
    table = pa.Table.from_pandas(result.table, preserve_index=False)
    extra = {key.encode(): value.encode() for key, value in result.metadata.items()}
    meta = {**(table.schema.metadata or {}), **extra}
    with atomic_path(Path(out)) as tmp:
        pq.write_table(table.replace_schema_metadata(meta), tmp)


def contribution_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per modality: mean and std of the contribution, and the share of samples in which it
    alone has the lowest contribution (ties count for no modality)."""
    per_sample = table.groupby("sample_id")["contribution"]
    is_min = table["contribution"] == per_sample.transform("min")
    unique_min = is_min & (is_min.groupby(table["sample_id"]).transform("sum") == 1)
    return (
        table.assign(weakest=unique_min)
        .groupby("modality", sort=False)
        .agg(
            mean=("contribution", "mean"),
            std=("contribution", "std"),
            weakest_share=("weakest", "mean"),
        )
        .reset_index()
    )
