"""Diagnosing and Re-learning: soft re-initialisation of the encoders that over-fit.

Paper: Wei, Li, Hu, "Diagnosing and Re-learning for Balanced Multimodal Learning", ECCV 2024.
Follows the official code (GeWu-Lab/Diagnosing_Relearning_ECCV2024, `code/ours.py`: `main`,
`get_feature`, `reinit_score`, `purity_score`, `reinit`); spec:
docs/methods.md#relearning.

What it changes: nothing in the step. After epoch e (0-based) with e > 0 and e % R == 0 has been
trained and evaluated (so at the start of epoch e + 1, as the official loop orders it), at most
N times, every modality is diagnosed: its encoder features of the whole train and val splits
(eval mode) are MinMax-scaled to [-1, 1] per dimension, clustered by k-means with C clusters, and
the purity of the clusters (share of samples carrying their cluster's majority label) is taken on
each split. A modality whose train purity is far from its val purity is learnt in a way that does
not carry over, so it is pulled back towards its initialisation: with w_m = tanh(lambda *
|P_train - P_val|), every parameter of encoder m becomes w_m * theta_init + (1 - w_m) * theta.
Buffers (BatchNorm statistics), the fusion head and the optimizer state are left alone. The
purities and weights are logged in the row of epoch e + 1.

Deviations: the official code reads the train features through its shuffled, augmenting train
loader; here both splits come from `TrainContext.batches` (index order, no augmentation), which
changes no purity but the augmentation's. k-means is scikit-learn's `KMeans(random_state=0)` there;
scikit-learn is not installed here, so `kmeans` below is a small deterministic one: greedy
k-means++ seeding as scikit-learn's (fixed seed, one initialisation, as its n_init="auto") and
Lloyd iterations; with another random stream it may land on another local optimum.
theta_init is the model as built; it is not checkpointed, because the engine seeds the model
before building it, so a resumed run snapshots the same weights again.

M > 2: native, one weight per modality.

DDP: each rank computes the features of its share of each split (`TrainContext.rank_batches`)
and the shares are gathered in rank order, i.e. the split's order, so every rank clusters the
same arrays (k-means is deterministic) and moves its encoders by the same weights.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from mmval.distributed import gather_rows
from mmval.methods.base import Method, MethodConfig, TrainContext
from mmval.models import MultimodalModel


class RelearningConfig(MethodConfig):
    min_modalities: ClassVar[int] = 2
    name: Literal["relearning"] = "relearning"
    quick: ClassVar[dict[str, Any]] = {"method": {"reinit_epoch": 1}}
    move_lambda: float = Field(
        default=3.0, gt=0, description="lambda in w = tanh(lambda * purity gap) (official 3)"
    )
    reinit_epoch: int = Field(
        default=20, ge=1, description="R: re-initialise after 0-based epochs R, 2R, ... (ours.sh)"
    )
    reinit_num: int = Field(default=3, ge=0, description="N: at most this many re-inits (ours.sh)")
    kmeans_iters: int = Field(default=300, ge=1, description="Lloyd iterations (sklearn default)")


def minmax_scale(x: np.ndarray) -> np.ndarray:
    """Each column to [-1, 1] (constant columns to -1, as scikit-learn's MinMaxScaler does)."""
    low, span = x.min(0), np.ptp(x, axis=0)
    return 2 * (x - low) / np.where(span == 0, 1.0, span) - 1


def kmeans(x: np.ndarray, k: int, iters: int, seed: int = 0) -> np.ndarray:
    """Cluster ids from k-means++ seeding (a fixed seed) and Lloyd iterations."""
    rng = np.random.default_rng(seed)
    x = x.astype(np.float64)
    sq = (x**2).sum(1)

    def dist2(c: np.ndarray) -> np.ndarray:  # [N, len(c)] squared distances
        return np.maximum(sq[:, None] - 2 * x @ c.T + (c**2).sum(1)[None], 0.0)

    # greedy k-means++ as scikit-learn seeds it: of 2 + log(k) candidates drawn by D^2, keep the
    # one that lowers the potential most
    trials = 2 + int(np.log(k))
    centers = x[[rng.integers(len(x))]]
    nearest = dist2(centers)[:, 0]
    while len(centers) < k:
        total = nearest.sum()
        if total > 0:
            picks = rng.choice(len(x), size=trials, p=nearest / total)
        else:
            picks = rng.integers(len(x), size=trials)
        candidates = np.minimum(nearest[:, None], dist2(x[picks]))  # [N, trials]
        best = candidates.sum(0).argmin()
        centers = np.concatenate([centers, x[picks[[best]]]])
        nearest = candidates[:, best]
    assign = np.full(len(x), -1)
    for _ in range(iters):
        new = dist2(centers).argmin(1)
        if np.array_equal(new, assign):
            break
        assign = new
        for j in np.unique(assign):
            centers[j] = x[assign == j].mean(0)
    return assign


def purity(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Share of samples whose label is the majority label of their cluster."""
    hits = sum(np.bincount(labels[clusters == c]).max() for c in np.unique(clusters))
    return float(hits) / len(labels)


def relearn_weight(purity_train: float, purity_val: float, move_lambda: float) -> float:
    return math.tanh(move_lambda * abs(purity_train - purity_val))


class Relearning(Method):
    Config: ClassVar[type[MethodConfig]] = RelearningConfig
    config: RelearningConfig

    def __init__(self, config: MethodConfig, num_classes: int) -> None:
        super().__init__(config, num_classes)
        self.reinits = 0
        self.figures: dict[str, float] = {}

    def build_modules(self, model: MultimodalModel) -> torch.nn.ModuleDict:
        self.initial = {n: p.detach().clone() for n, p in model.encoders.named_parameters()}
        return torch.nn.ModuleDict()

    def on_epoch_start(self, model: MultimodalModel, ctx: TrainContext) -> None:
        """Re-initialise after epoch e = ctx.epoch - 1, once that epoch has been evaluated."""
        cfg, done = self.config, ctx.epoch - 1
        if done <= 0 or done % cfg.reinit_epoch or self.reinits >= cfg.reinit_num:
            return
        self.reinits += 1
        feats = {role: self._features(model, ctx, role) for role in ("train", "val")}
        for m in model.modalities:
            p_train, p_val = (
                purity(labels, kmeans(minmax_scale(h[m]), self.num_classes, cfg.kmeans_iters))
                for h, labels in (feats["train"], feats["val"])
            )
            w = relearn_weight(p_train, p_val, cfg.move_lambda)
            with torch.no_grad():
                for n, param in model.encoders[m].named_parameters():
                    param.mul_(1 - w).add_(self.initial[f"{m}.{n}"], alpha=w)
            self.figures.update(
                {f"purity_train_{m}": p_train, f"purity_val_{m}": p_val, f"reinit_w_{m}": w}
            )
        model.train()

    def on_epoch_end(self, model: MultimodalModel, ctx: TrainContext) -> dict[str, float]:
        figures, self.figures = self.figures, {}
        return figures

    @staticmethod
    @torch.no_grad()
    def _features(
        model: MultimodalModel, ctx: TrainContext, role: str
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        model.eval()
        feats: dict[str, list[torch.Tensor]] = {m: [] for m in model.modalities}
        labels = [torch.zeros(0, dtype=torch.int64)]
        for batch in ctx.rank_batches(role):
            for m, h in model.encode(batch.inputs).items():
                feats[m].append(h.float().cpu())
            labels.append(batch.label.cpu())
        out = {
            m: gather_rows(torch.cat(v or [torch.zeros(0, model.feature_dims[m])])).numpy()
            for m, v in feats.items()
        }
        return out, gather_rows(torch.cat(labels)).numpy()

    def state_dict(self) -> dict[str, Any]:
        return {"reinits": self.reinits}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reinits = int(state["reinits"])
