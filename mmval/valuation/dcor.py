"""Distance correlation (Szekely, Rizzo & Bakirov, Ann. Statist. 2007) of a model's joint
representation with the ground-truth variables of a synthetic data set (`mmval value --method
dcor`), as C3R (Wang et al., ICML 2025) evaluates its representation on MMLSynData.

For samples X [n, p] and Y [n, q], with pairwise Euclidean distances a_ij = |X_i - X_j| and
their double-centred form A_ij = a_ij - a_i. - a_.j + a_.. (likewise B from Y), the V-statistics
are dCov^2 = mean(A * B), dVar^2(X) = mean(A * A), and dCor = sqrt(dCov^2 / sqrt(dVar^2(X)
dVar^2(Y))), defined as 0 when either variance is 0. dCor lies in [0, 1], is 0 in the population
exactly under independence, is 1 for X = a Y R + b (scalar a != 0, orthogonal R), and is
invariant to rotations and shifts of either side.

Numerics: everything in float64; distances are exact row differences (not the |x|^2 + |y|^2 -
2xy expansion, which loses precision for near points); the centred matrix of the representation
is computed once for all groups. Memory is O(n^2): a few n x n float64 matrices at once
(0.8 GB each for n = 10,000), so evaluate splits of a few thousand samples.

Lives here rather than in a new package because it is reached through `mmval value` and shares
its checkpoint and data loading (`run.load_with_data`); the statistic itself is generic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mmval.data.dataset import ParquetSamples
from mmval.data.shards import read_ground_truth
from mmval.errors import UserError
from mmval.models import MultimodalModel
from mmval.valuation.run import _device, load_with_data
from mmval.valuation.table import weights_fingerprint, write_parquet


def double_centred_distances(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A = a - row means - column means + grand mean of the distances of the rows of `x`
    (samples first; further axes are flattened), in float64."""
    values = torch.as_tensor(x).detach().to("cpu", torch.float64)
    values = values.reshape(values.shape[0], -1)
    dist = torch.cdist(values, values, compute_mode="donot_use_mm_for_euclid_dist")
    return dist - dist.mean(0, keepdim=True) - dist.mean(1, keepdim=True) + dist.mean()


def dcor_from_centred(a: torch.Tensor, b: torch.Tensor) -> float:
    """dCor of two samples given their double-centred distance matrices."""
    dcov2 = (a * b).mean()
    denom = torch.sqrt((a * a).mean() * (b * b).mean())
    if denom <= torch.finfo(torch.float64).tiny:
        return 0.0
    return float(torch.sqrt((dcov2 / denom).clamp(0.0, 1.0)))


def distance_correlation(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """Sample distance correlation (V-statistic) of paired samples x [n, ...] and y [n, ...]."""
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples, y has {len(y)}")
    return dcor_from_centred(double_centred_distances(x), double_centred_distances(y))


def group_dcor(representation: torch.Tensor, groups: dict[str, np.ndarray]) -> dict[str, float]:
    """dCor of one representation with each group (its per-sample values flattened)."""
    a = double_centred_distances(representation)
    return {name: dcor_from_centred(a, double_centred_distances(v)) for name, v in groups.items()}


@torch.no_grad()
def representations(
    model: MultimodalModel, dataset: ParquetSamples, device: torch.device, batch_size: int = 256
) -> torch.Tensor:
    """`model.representation` of every sample of the dataset, in its order (eval mode)."""
    model.eval()
    parts = []
    for start in range(0, len(dataset), batch_size):
        batch = dataset.__getitems__(list(range(start, min(start + batch_size, len(dataset)))))
        parts.append(model.representation(batch.to(device).inputs).float().cpu())
    return torch.cat(parts)


@dataclass
class DcorResult:
    table: pd.DataFrame  # group, dcor, n, split
    metadata: dict[str, str]


def dcor_checkpoint(
    checkpoint: Path,
    *,
    split: str = "test",
    data_dir: Path | None = None,
    batch_size: int = 256,
    device: str = "cpu",
) -> DcorResult:
    """dCor of the checkpoint's joint representation on `split` with every ground-truth
    column of its data (one row per column, in the manifest's order)."""
    torch_device = _device(device)
    loaded = load_with_data(checkpoint, data_dir)
    manifest = loaded.manifest
    if not manifest.ground_truth:
        raise UserError(
            f"data set {manifest.dataset!r} in {loaded.root} stores no ground-truth variables, "
            "so --method dcor has nothing to correlate with; use a data set that has them "
            "(mmval prep mmlsyndata) or another --method."
        )
    dataset = ParquetSamples(loaded.root, split, loaded.modalities, manifest=manifest)
    if len(dataset) < 2:
        raise UserError(
            f"split {split!r} of {loaded.root} has {len(dataset)} sample(s); dCor needs at "
            "least 2: pick another with --split."
        )
    z = representations(loaded.model.to(torch_device), dataset, torch_device, batch_size)
    values = group_dcor(z, read_ground_truth(loaded.root, split, manifest))
    table = pd.DataFrame(
        {
            "group": list(values),
            "dcor": list(values.values()),
            "n": len(dataset),
            "split": split,
        }
    )
    metadata = {
        "mmval.method": "dcor",
        "mmval.modalities": json.dumps(loaded.modalities),
        "mmval.representation_dim": str(z.shape[1]),
        "mmval.split": split,
        "mmval.dataset": manifest.dataset,
        "mmval.data_fingerprint": manifest.fingerprint(),
        "mmval.checkpoint_fingerprint": weights_fingerprint(loaded.ckpt.model),
        "mmval.checkpoint": str(checkpoint),
    }
    return DcorResult(table, metadata)


def write_dcor(result: DcorResult, out: Path) -> None:
    """Write the table atomically, with how it was computed as Parquet metadata."""
    write_parquet(result.table, result.metadata, out)
