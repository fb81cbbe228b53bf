"""MMLSynData: the synthetic causal benchmark of C3R (Wang et al., ICML 2025, App. D.5),
completed from its parent paper CaSN (Yang et al., NeurIPS 2023, App. B.1).

Every sample has a binary label y and, per modality m, four ground-truth variable blocks of size
d: the sufficient-and-necessary cause sn_m (column `snc`), a sufficient-but-unnecessary cause
(`sc`), a necessary-but-insufficient cause (`nc`) and a spurious block (`sp`) whose link to the
cause is set by the spurious degree s. Defaults (manifest version 2.0):

    sn_m ~ Bern(theta_m), independent over m        (C3R: each modality's SNC ~ Bern(theta_m))
    y    = maj_m(sn_m) XOR Bern(flip)               [ours] rule; flip 0.15 (CaSN)
    sc_m = sn_m * Bern(sc_prob[m])                  (0.5, 0.7, 0.9; C3R's q list)
    nc_m = 1 if sn_m = 1 else Bern(nc_rate)         (nc_rate 0.1, CaSN)
    sp_m = s * sn_m * 1_d + (1 - s) * N(0, I_d)     (s 0.6; C3R 0.1 / 0.6, CaSN 0.1 / 0.7)
    t_m  = [sn_m 1_d, nc_m 1_d, sc_m 1_d, sp_m] + N(0, noise_var * I_4d)   (noise_var 0.4, C3R)
    x_m  = sigmoid(A_m (Phi1(t_m) + Phi2(t_m))),  Phi1(t) = (t - 0.5) 1[t > 0],
                                                   Phi2(t) = (t + 0.5) 1[t < 0]

What each column is, with y's noise flip = 0.15 (so P(y = 1 | cause) = 0.85 at best):
- `snc`: its rule value maj(snc) is y's cause: P(y=1 | 1) = 0.85 and P(y=0 | 0) = 0.85.
- `sc` (sufficient, unnecessary): sc_m = 1 only where sn_m = 1, so sc keeps the sufficiency of
  sn (P(y=1 | maj(sc) = 1) = 0.85) but y = 1 often comes with sc = 0 (P(y=0 | maj(sc) = 0) < 0.85).
- `nc` (necessary, insufficient): nc_m = 0 only where sn_m = 0, so nc keeps the necessity
  (P(y=0 | maj(nc) = 0) = 0.85) but nc = 1 also occurs without the cause (P(y=1 | 1) < 0.85).
- `sp`: correlated with sn_m (corr = s v^0.5 / (s^2 v + (1 - s)^2)^0.5, v = theta_m (1 - theta_m))
  but no cause of y: given the sn_m, y does not depend on it.
tests/test_mmlsyndata.py checks these by simulation.

The papers' names are swapped. Both define SF (sufficient, unnecessary) and NC (necessary,
insufficient) as above (CaSN App. B.1: SF has P(Y=1|do(SF=1)) = P(Y=1|do(SN=1)) and a lower
P(Y=0|do(SF=0)); NC the reverse), but generate sf = 1 if sn else Bern(0.1), which is necessary
and insufficient, and nc = sn * Bern(0.9), which is sufficient and unnecessary. We keep the two
formulas and name each column for what it is: the papers' "sf" formula fills `nc`, their "nc"
formula (with C3R's per-modality q) fills `sc`. t_m keeps the papers' block order [sn, sf, nc,
sp], hence [snc, nc, sc, sp] here. Manifest version 1.0 stored the papers' names (its `sc`
column held the necessary-but-insufficient variable and its `nc` the sufficient one).

Resolved gaps ([ours] unless a paper is named):
- The transform. C3R prints x = sigmoid(Phi1(t) * Phi2(t)); element-wise that product is 0
  everywhere (Phi1 is nonzero only for t > 0, Phi2 only for t < 0), so every x would be 0.5 and
  carry nothing. CaSN prints x = sigmoid(kappa1(t) * kappa1(t)) with the same kappa1 = Phi1 and
  kappa2 = Phi2 defined but unused: (t - 0.5)^2 for t > 0, else 0, which maps t = 0.2 and t =
  0.8 alike and every t <= 0 to 0, so x does not determine the block values. We use the sum
  Phi1 + Phi2 (both defined pieces; a shift of t by -0.5 sign(t), invertible), so x_m carries
  every block.
- C3R's "functions with different parameters" per modality: a fixed random A_m per modality with
  i.i.d. N(0, 1/(4d)) entries (N(0, 1/20) for d = 5), drawn once from the seed (`mixing: true`,
  the default; `mixing: false` gives A_m = I).
- theta_m: lost in C3R; default evenly spaced in [0.3, 0.7] (0.3, 0.5, 0.7 for three
  modalities), symmetric about 0.5 so the classes are balanced. y from the majority of the sn_m
  (so an odd number of modalities); `causes: shared` instead draws one sn ~ Bern(0.5) for all
  modalities with y = sn XOR Bern(flip), CaSN's single-cause rule (version 1.0's default).
- Splits: C3R uses 1,000 train / 200 test; we add a 200-sample val split. `sampling: iid`
  (default) draws `splits` samples i.i.d. (classes balanced only in expectation).
  `sampling: per_class` is C3R's "250/50 per category": samples are drawn i.i.d. and the first
  `per_class[split]` of each class are kept (250 / 50 / 50 by default, 500 / 100 / 100 with the
  binary y). C3R's totals, 1,000 / 200, would need four categories; a binary y has two, and we
  read "category" as class (set per_class to 500 / 100 to reach the totals instead).
- Each split has its own generator stream seeded by (seed, split name), so changing one split's
  size leaves the others unchanged.

Version 1.0 data are explained by `causes: shared, mixing: false, sampling: iid` with their
parameters (values identical; the `sc` / `nc` columns exchanged). A version-1.0 parameter set
(`sf_rate`, `nc_prob`, `theta`) still validates and means that.

The variable blocks are stored as ground-truth columns (never model inputs), stacked over
modalities: `snc`, `sc`, `nc` [M] (one value per modality; its block is that value repeated d
times) and `sp` [M, d]. The same parameters always give the same bytes.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mmval.data.manifest import DatasetManifest
from mmval.data.shards import ModalitySpec, SplitSamples
from mmval.data.sources.base import BuiltData

GROUPS = {
    "snc": "sufficient-and-necessary cause sn_m (SNC), one per modality",
    "sc": "sufficient-but-unnecessary cause sn_m * Bern(sc_prob_m) (SC), one per modality",
    "nc": "necessary-but-insufficient cause: 1 if sn_m else Bern(nc_rate) (NC), one per modality",
    "sp": "spurious block s * sn_m + (1 - s) N(0, 1) (SP), [modality, d]",
}
CLASSES = ["y0", "y1"]


class MMLSynDataParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    modalities: list[str] = Field(default=["x1", "x2", "x3"], min_length=1)
    d: int = Field(default=5, ge=1, description="block size; each x_m has 4d features")
    s: float = Field(
        default=0.6, ge=0, le=1, description="spurious degree (C3R 0.1 / 0.6, CaSN 0.1 / 0.7)"
    )
    flip: float = Field(default=0.15, ge=0, le=1, description="P(y != cause): label noise")
    causes: Literal["per_modality", "shared"] = Field(
        default="per_modality",
        description="per_modality: sn_m ~ Bern(theta_m), y from their majority; "
        "shared: one sn ~ Bern(0.5) for every modality (CaSN, version 1.0)",
    )
    theta: list[float] | None = Field(
        default=None,
        description="P(sn_m = 1) per modality (causes: per_modality); default evenly spaced "
        "in [0.3, 0.7]",
    )
    sc_prob: list[float] = Field(
        default=[0.5, 0.7, 0.9], description="P(sc_m = 1 | sn_m = 1), one per modality"
    )
    nc_rate: float = Field(default=0.1, ge=0, le=1, description="P(nc_m = 1 | sn_m = 0)")
    noise_var: float = Field(default=0.4, ge=0, description="variance of the noise on t_m")
    mixing: bool = Field(default=True, description="fixed random A_m ~ N(0, 1/(4d)) per modality")
    sampling: Literal["iid", "per_class"] = Field(
        default="iid",
        description="iid: `splits` samples per split; per_class: `per_class` samples of each "
        "class per split (C3R's '250/50 per category')",
    )
    splits: dict[str, int] = Field(
        default={"train": 1000, "val": 200, "test": 200},
        description="samples per split (sampling: iid)",
    )
    per_class: dict[str, int] = Field(
        default={"train": 250, "val": 50, "test": 50},
        description="samples of each class per split (sampling: per_class)",
    )
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _version_1_names(cls, data: Any) -> Any:
        """A complete version-1.0 parameter set (as a 1.0 manifest records it) is translated;
        a 1.0 name mixed with 2.0 names is refused, as the columns were renamed."""
        if not isinstance(data, dict) or not {"sf_rate", "nc_prob"} & set(data):
            return data
        if not {"sf_rate", "nc_prob", "theta"} <= set(data) or {"sc_prob", "nc_rate"} & set(data):
            raise ValueError(
                "sf_rate and nc_prob are the version-1.0 names: the 1.0 `nc_prob` is now "
                "`sc_prob` (P(sc_m = 1 | sn_m = 1)) and `sf_rate` is `nc_rate` "
                "(P(nc_m = 1 | sn_m = 0)); use the new names"
            )
        data = dict(data)
        data["sc_prob"], data["nc_rate"] = data.pop("nc_prob"), data.pop("sf_rate")
        data.setdefault("causes", "shared" if data["theta"] is None else "per_modality")
        return data

    @model_validator(mode="after")
    def _per_modality(self) -> MMLSynDataParams:
        m = len(self.modalities)
        if len(set(self.modalities)) != m:
            raise ValueError("modalities must not repeat")
        if clash := set(self.modalities) & set(GROUPS):
            raise ValueError(f"modality names {sorted(clash)} are ground-truth column names")
        if len(self.sc_prob) != m or any(not 0 <= q <= 1 for q in self.sc_prob):
            raise ValueError(f"sc_prob needs one probability per modality ({m})")
        if self.causes == "shared":
            if self.theta is not None:
                raise ValueError("theta applies to causes: per_modality (shared uses Bern(0.5))")
        else:
            if self.theta is not None and (
                len(self.theta) != m or any(not 0 <= t <= 1 for t in self.theta)
            ):
                raise ValueError(f"theta needs one probability per modality ({m})")
            if m % 2 == 0:
                raise ValueError(
                    "causes: per_modality takes y from a majority vote: use an odd modality "
                    "count, or causes: shared"
                )
        sizes = self.splits if self.sampling == "iid" else self.per_class
        field = "splits" if self.sampling == "iid" else "per_class"
        if "train" not in sizes or any(n < 1 for n in sizes.values()):
            raise ValueError(f"{field} needs a 'train' split and at least one sample per split")
        return self


def thetas(params: MMLSynDataParams) -> np.ndarray:
    """P(sn_m = 1) per modality: the given theta, else evenly spaced in [0.3, 0.7]."""
    if params.theta is not None:
        return np.asarray(params.theta, dtype=np.float64)
    m = len(params.modalities)
    return np.full(1, 0.5) if m == 1 else np.linspace(0.3, 0.7, m)


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
    """n i.i.d. samples: labels [n], inputs {modality: [n, 4d] float32}, ground truth
    {group: [n, M(, d)]}. The draw order is version 1.0's, so its data are reproduced."""
    m, d = len(params.modalities), params.d
    if params.causes == "shared":
        sn = np.repeat((rng.random(n) < 0.5)[:, None], m, axis=1).astype(np.float64)
    else:
        sn = (rng.random((n, m)) < thetas(params)).astype(np.float64)
    cause = (sn.sum(axis=1) * 2 > m).astype(np.int64)
    labels = (cause ^ (rng.random(n) < params.flip)).astype(np.int64)
    nc = np.where(sn == 1, 1.0, (rng.random((n, m)) < params.nc_rate).astype(np.float64))
    sc = sn * (rng.random((n, m)) < np.asarray(params.sc_prob)).astype(np.float64)
    sp = params.s * sn[:, :, None] + (1 - params.s) * rng.standard_normal((n, m, d))
    inputs = {}
    for j, name in enumerate(params.modalities):
        blocks = [np.repeat(v[:, j : j + 1], d, axis=1) for v in (sn, nc, sc)]
        t = np.concatenate([*blocks, sp[:, j]], axis=1)
        t = t + np.sqrt(params.noise_var) * rng.standard_normal(t.shape)
        u = piecewise_shift(t)
        if mixing is not None:
            u = u @ mixing[j].T
        inputs[name] = (1.0 / (1.0 + np.exp(-u))).astype(np.float32)
    truth = {"snc": sn, "sc": sc, "nc": nc, "sp": sp}
    return labels, inputs, {k: v.astype(np.float32) for k, v in truth.items()}


def sample_split(
    params: MMLSynDataParams, split: str, mixing: list[np.ndarray] | None
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One split from its own stream: `splits[split]` i.i.d. samples, or under per_class the
    first `per_class[split]` samples of each class, in the order they were drawn."""
    rng = np.random.default_rng([params.seed, 1, zlib.crc32(split.encode())])
    if params.sampling == "iid":
        return generate_split(params, params.splits[split], rng, mixing)
    quota = params.per_class[split]
    chunks = []
    counts = np.zeros(len(CLASSES), dtype=np.int64)
    while (counts < quota).any():
        chunk = generate_split(params, 2 * len(CLASSES) * quota, rng, mixing)
        chunks.append(chunk)
        counts += np.bincount(chunk[0], minlength=len(CLASSES))
    labels = np.concatenate([c[0] for c in chunks])
    rank = np.zeros(len(labels), dtype=np.int64)
    for cls in range(len(CLASSES)):
        rank[labels == cls] = np.arange((labels == cls).sum())
    keep = rank < quota
    inputs = {k: np.concatenate([c[1][k] for c in chunks])[keep] for k in chunks[0][1]}
    truth = {k: np.concatenate([c[2][k] for c in chunks])[keep] for k in chunks[0][2]}
    return labels[keep], inputs, truth


class MMLSynDataSource:
    name: ClassVar[str] = "mmlsyndata"
    needs_raw: ClassVar[bool] = False
    Params: ClassVar[type[BaseModel]] = MMLSynDataParams

    def build(
        self, manifest: DatasetManifest, params: MMLSynDataParams, raw: Path | None
    ) -> BuiltData:
        mixing = mixing_matrices(params)
        names = params.splits if params.sampling == "iid" else params.per_class
        splits = {}
        for split in names:
            labels, inputs, truth = sample_split(params, split, mixing)
            n = len(labels)
            ids = [f"{split}-{i:06d}" for i in range(n)]
            splits[split] = SplitSamples(ids, labels, ["generated"] * n, {**inputs, **truth})
        m, d = len(params.modalities), params.d
        transform = "A_m times the" if params.mixing else "the"
        modalities = [
            ModalitySpec(
                name=name,
                dtype="float32",
                shape=[4 * d],
                description=f"sigmoid of {transform} shifted [snc, nc, sc, sp] blocks of "
                f"modality {j + 1}",
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
        # the theta_m used, recorded where the parameters leave them to the default
        extraction = {"theta": thetas(params).tolist()} if params.causes == "per_modality" else {}
        return BuiltData(CLASSES, modalities, extraction, splits, [], ground_truth)
