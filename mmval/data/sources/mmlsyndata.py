"""MMLSynData: the synthetic causal benchmark of C3R (Wang et al., ICML 2025, App. D.5),
completed from its parent paper CaSN (Yang et al., NeurIPS 2023, App. B.1).

Every sample has a binary label y and, per modality m, four ground-truth variable blocks of size
d: the sufficient-and-necessary cause sn_m (SNC), a sufficient-but-unnecessary cause sf_m (SC), a
necessary-but-insufficient cause nc_m (NC) and a spurious block sp_m (SP) whose link to y is set
by the spurious degree s:

    sn ~ Bern(0.5);  y = sn XOR Bern(flip)              (flip 0.15: P(y = sn) = 0.85)
    sn_m = sn                                           [ours] (or sn_m ~ Bern(theta_m), below)
    sf_m = 1 if sn_m = 1 else Bern(sf_rate)             (sf_rate 0.1)
    nc_m = sn_m * Bern(nc_prob[m])                      (0.5, 0.7, 0.9)
    sp_m = s * sn_m * 1_d + (1 - s) * N(0, I_d)
    t_m  = [sn_m 1_d, sf_m 1_d, nc_m 1_d, sp_m] + N(0, noise_var * I_4d)   (noise_var 0.4)
    x_m  = sigmoid(A_m (Phi1(t_m) + Phi2(t_m))),  Phi1(t) = (t - 0.5) 1[t > 0],
                                                   Phi2(t) = (t + 0.5) 1[t < 0]

Deviations and resolved gaps:
- Both papers print x = sigmoid(Phi1(t) * Phi2(t)). Element-wise that product is identically 0
  (Phi1 is nonzero only for t > 0, Phi2 only for t < 0), so every x would be 0.5. We use the sum,
  a piecewise shift of t by -0.5 sign(t) ([ours]).
- C3R's "different parameters per modality": optional fixed random mixing A_m with i.i.d.
  N(0, 1/(4d)) entries (N(0, 1/20) for d = 5), drawn once from the seed
  (`mixing: true`; default off, A_m = I).
- C3R draws each modality's SNC from Bern(theta_m) with theta lost; by default every modality
  shares sn [ours]. `theta: [...]` draws sn_m ~ Bern(theta_m) independently and takes y from the
  majority of the sn_m (an odd number of modalities is then required), flipped as above.
- Splits: C3R uses 1,000 train / 200 test; we add a 200-sample val split [ours]. Samples are
  drawn i.i.d. (C3R's "250/50 per category" quota is not reproduced: classes are balanced only in
  expectation). Each split has its own generator stream seeded by (seed, split name), so changing
  one split's size leaves the others unchanged.

The variable blocks are stored as ground-truth columns (never model inputs), stacked over
modalities: `snc`, `sc`, `nc` [M] (one value per modality; its block is that value repeated d
times) and `sp` [M, d]. The same parameters always give the same bytes.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mmval.data.manifest import DatasetManifest
from mmval.data.shards import ModalitySpec, SplitSamples
from mmval.data.sources.base import BuiltData

GROUPS = {
    "snc": "sufficient and necessary cause sn_m (SNC), one per modality",
    "sc": "sufficient-but-unnecessary cause sf_m (SC), one per modality",
    "nc": "necessary-but-insufficient cause nc_m (NC), one per modality",
    "sp": "spurious block sp_m (SP), [modality, d]",
}


class MMLSynDataParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    modalities: list[str] = Field(default=["x1", "x2", "x3"], min_length=1)
    d: int = Field(default=5, ge=1, description="block size; each x_m has 4d features")
    s: float = Field(
        default=0.6, ge=0, le=1, description="spurious degree (C3R 0.1 / 0.6, CaSN 0.1 / 0.7)"
    )
    flip: float = Field(default=0.15, ge=0, le=1, description="P(y != sn): label noise")
    sf_rate: float = Field(default=0.1, ge=0, le=1, description="P(sf_m = 1 | sn_m = 0)")
    nc_prob: list[float] = Field(
        default=[0.5, 0.7, 0.9], description="P(nc_m = 1 | sn_m = 1), one per modality"
    )
    noise_var: float = Field(default=0.4, ge=0, description="variance of the noise on t_m")
    mixing: bool = Field(default=False, description="fixed random A_m ~ N(0, 1/(4d)) per modality")
    theta: list[float] | None = Field(
        default=None,
        description="sn_m ~ Bern(theta_m) per modality, y from their majority (default: shared sn)",
    )
    splits: dict[str, int] = Field(default={"train": 1000, "val": 200, "test": 200})
    seed: int = 0

    @model_validator(mode="after")
    def _per_modality(self) -> MMLSynDataParams:
        m = len(self.modalities)
        if len(set(self.modalities)) != m:
            raise ValueError("modalities must not repeat")
        if clash := set(self.modalities) & set(GROUPS):
            raise ValueError(f"modality names {sorted(clash)} are ground-truth column names")
        if len(self.nc_prob) != m or any(not 0 <= q <= 1 for q in self.nc_prob):
            raise ValueError(f"nc_prob needs one probability per modality ({m})")
        if self.theta is not None:
            if len(self.theta) != m or any(not 0 <= t <= 1 for t in self.theta):
                raise ValueError(f"theta needs one probability per modality ({m})")
            if m % 2 == 0:
                raise ValueError("theta takes y from a majority vote: use an odd modality count")
        if "train" not in self.splits or any(n < 1 for n in self.splits.values()):
            raise ValueError("splits needs a 'train' split and at least one sample per split")
        return self


def piecewise_shift(t: np.ndarray) -> np.ndarray:
    """Phi1(t) + Phi2(t): t - 0.5 for t > 0, t + 0.5 for t < 0, 0 at 0."""
    return np.where(t > 0, t - 0.5, 0.0) + np.where(t < 0, t + 0.5, 0.0)


def mixing_matrices(params: MMLSynDataParams) -> list[np.ndarray] | None:
    """One fixed [4d, 4d] matrix per modality, the same for every split."""
    if not params.mixing:
        return None
    rng = np.random.default_rng([params.seed, 0])
    k = 4 * params.d
    return [rng.normal(0.0, np.sqrt(1.0 / k), (k, k)) for _ in params.modalities]


def generate_split(
    params: MMLSynDataParams, n: int, rng: np.random.Generator, mixing: list[np.ndarray] | None
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Labels [n], inputs {modality: [n, 4d] float32}, ground truth {group: [n, M(, d)]}."""
    m, d = len(params.modalities), params.d
    if params.theta is None:
        sn = np.repeat((rng.random(n) < 0.5)[:, None], m, axis=1).astype(np.float64)
        cause = sn[:, 0]
    else:
        sn = (rng.random((n, m)) < np.asarray(params.theta)).astype(np.float64)
        cause = (sn.sum(axis=1) * 2 > m).astype(np.float64)
    labels = (cause.astype(np.int64) ^ (rng.random(n) < params.flip)).astype(np.int64)
    sf = np.where(sn == 1, 1.0, (rng.random((n, m)) < params.sf_rate).astype(np.float64))
    nc = sn * (rng.random((n, m)) < np.asarray(params.nc_prob)).astype(np.float64)
    sp = params.s * sn[:, :, None] + (1 - params.s) * rng.standard_normal((n, m, d))
    inputs = {}
    for j, name in enumerate(params.modalities):
        blocks = [np.repeat(v[:, j : j + 1], d, axis=1) for v in (sn, sf, nc)]
        t = np.concatenate([*blocks, sp[:, j]], axis=1)
        t = t + np.sqrt(params.noise_var) * rng.standard_normal(t.shape)
        u = piecewise_shift(t)
        if mixing is not None:
            u = u @ mixing[j].T
        inputs[name] = (1.0 / (1.0 + np.exp(-u))).astype(np.float32)
    truth = {"snc": sn, "sc": sf, "nc": nc, "sp": sp}
    return labels, inputs, {k: v.astype(np.float32) for k, v in truth.items()}


class MMLSynDataSource:
    name: ClassVar[str] = "mmlsyndata"
    needs_raw: ClassVar[bool] = False
    Params: ClassVar[type[BaseModel]] = MMLSynDataParams

    def build(
        self, manifest: DatasetManifest, params: MMLSynDataParams, raw: Path | None
    ) -> BuiltData:
        mixing = mixing_matrices(params)
        splits = {}
        for split, n in params.splits.items():
            rng = np.random.default_rng([params.seed, 1, zlib.crc32(split.encode())])
            labels, inputs, truth = generate_split(params, n, rng, mixing)
            ids = [f"{split}-{i:06d}" for i in range(n)]
            splits[split] = SplitSamples(ids, labels, ["generated"] * n, {**inputs, **truth})
        m, d = len(params.modalities), params.d
        modalities = [
            ModalitySpec(
                name=name,
                dtype="float32",
                shape=[4 * d],
                description=f"sigmoid of the shifted [sn, sf, nc, sp] blocks of modality {j + 1}",
            )
            for j, name in enumerate(params.modalities)
        ]
        ground_truth = [
            ModalitySpec(
                name=group,
                dtype="float32",
                shape=[m, d] if group == "sp" else [m],
                description=text,
            )
            for group, text in GROUPS.items()
        ]
        return BuiltData(["y0", "y1"], modalities, {}, splits, [], ground_truth)
