"""Diagnosing and Re-learning: soft re-initialisation of the encoders that over-fit.

Paper: Wei, Li, Hu, "Diagnosing and Re-learning for Balanced Multimodal Learning", ECCV 2024.
Follows the official code (GeWu-Lab/Diagnosing_Relearning_ECCV2024, commit
025085ea82ed784c6ab6e5fb1b08bfe498dd0fc7, `code/ours.py`: `main`, `get_feature`, `reinit_score`,
`purity_score`, `reinit`); spec:
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
changes no purity but the augmentation's.

k-means: `reinit_score` calls scikit-learn's `KMeans(n_clusters=C, random_state=0)` with its
defaults. The repository pins no scikit-learn version; its code was released in July 2024 for
ECCV 2024 (submitted in March 2024) and silences all warnings (`warnings.filterwarnings
('ignore')`, which hides the n_init FutureWarning of 1.2 and 1.3): before 1.4 (January 2024)
the default n_init is 10, so mmval takes the assumption that the published runs kept the best
of 10 k-means++ starts by inertia (`kmeans_inits: 1` gives 1.4's "auto"). scikit-learn is not
installed here, so `kmeans` below re-implements that KMeans: the starts drawn in turn from one
`RandomState(0)` as scikit-learn 1.2 draws them, Lloyd iterations with its tolerance
(1e-4 x the mean feature variance), 300 iterations at most and its relocation of empty
clusters. It runs in float64 on the unshifted features, so on near ties it may still land on
another optimum than scikit-learn would.
theta_init is the model as built; it is not checkpointed, because the engine seeds the model
before building it, so a resumed run snapshots the same weights again.

M > 2: native, one weight per modality.

DDP: each rank computes the features of its share of each split (`TrainContext.rank_batches`)
and the shares are gathered in rank order, i.e. the split's order, so every rank clusters the
same arrays (k-means is deterministic) and moves its encoders by the same weights.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from mmval.distributed import gather_rows
from mmval.lazy import lazy_module, no_grad
from mmval.methods.base import Method, MethodConfig, TrainContext, never_acts
from mmval.settings import AddedLater

if TYPE_CHECKING:
    import torch

    from mmval.models import MultimodalModel
else:
    torch = lazy_module("torch")


class RelearningConfig(MethodConfig):
    min_modalities: ClassVar[int] = 2
    name: Literal["relearning"] = "relearning"
    source: ClassVar[str] = (
        "GeWu-Lab/Diagnosing_Relearning_ECCV2024@025085ea82ed784c6ab6e5fb1b08bfe498dd0fc7"
    )
    quick: ClassVar[dict[str, Any]] = {"method": {"reinit_epoch": 1}}
    move_lambda: float = Field(
        default=3.0, gt=0, description="lambda in w = tanh(lambda * purity gap) (official 3)"
    )
    reinit_epoch: int = Field(
        default=20, ge=1, description="R: re-initialise after 0-based epochs R, 2R, ... (ours.sh)"
    )
    reinit_num: int = Field(default=3, ge=0, description="N: at most this many re-inits (ours.sh)")
    kmeans_iters: int = Field(default=300, ge=1, description="Lloyd iterations (sklearn default)")
    # runs written before the field clustered once: they keep their settings hash as 1
    kmeans_inits: Annotated[int, AddedLater(before=1)] = Field(
        default=10,
        ge=1,
        description="k-means++ starts, the run of least inertia kept (KMeans n_init: 10 before "
        "scikit-learn 1.4, 1 from it)",
    )

    def inactive_reason(self, epochs: int) -> tuple[str, str] | None:
        """The first re-initialisation comes before 0-based epoch R + 1 (after epoch R)."""
        if self.reinit_num == 0:
            return ("reinit_num", "0 re-initialisations: the run would be concat; train concat")
        return never_acts("reinit_epoch", self.reinit_epoch + 1, epochs, "the re-initialisation")


def minmax_scale(x: np.ndarray) -> np.ndarray:
    """Each column to [-1, 1] (constant columns to -1, as scikit-learn's MinMaxScaler does)."""
    low, span = x.min(0), np.ptp(x, axis=0)
    return 2 * (x - low) / np.where(span == 0, 1.0, span) - 1


def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.RandomState) -> np.ndarray:
    """k initial centres by greedy k-means++, drawn as scikit-learn's `_kmeans_plusplus` (1.2)
    draws them: the first uniformly, then of 2 + int(log k) candidates drawn by D^2 (uniform
    draws on the cumulated potential) the one that lowers the potential most."""
    sq = (x**2).sum(1)

    def dist2(c: np.ndarray) -> np.ndarray:  # [len(c), N] squared distances
        return np.maximum((c**2).sum(1)[:, None] - 2 * c @ x.T + sq[None], 0.0)

    trials = 2 + int(np.log(k))
    centers = np.empty((k, x.shape[1]))
    centers[0] = x[rng.randint(len(x))]
    nearest = dist2(centers[:1])[0]
    potential = nearest.sum()
    for c in range(1, k):
        draws = rng.random_sample(trials) * potential
        picks = np.clip(np.searchsorted(np.cumsum(nearest), draws), None, len(x) - 1)
        candidates = np.minimum(nearest[None], dist2(x[picks]))  # [trials, N]
        best = int(candidates.sum(1).argmin())
        potential, nearest = candidates[best].sum(), candidates[best]
        centers[c] = x[picks[best]]
    return centers


def lloyd(x: np.ndarray, centers: np.ndarray, iters: int, tol: float) -> tuple[np.ndarray, float]:
    """Lloyd iterations from `centers` as scikit-learn's `_kmeans_single_lloyd`: stop when the
    assignment repeats or the squared centre shift is at most `tol`; an emptied cluster takes
    the point farthest from its centre (`_relocate_empty_clusters_dense`). Returns the
    assignment and its inertia."""
    sq = (x**2).sum(1)

    def nearest(c: np.ndarray) -> np.ndarray:
        return np.argmin(sq[:, None] - 2 * x @ c.T + (c**2).sum(1)[None], axis=1)

    old = np.full(len(x), -1)
    labels, converged = old, False
    for _ in range(iters):
        labels = nearest(centers)
        counts = np.bincount(labels, minlength=len(centers)).astype(np.float64)
        sums = np.zeros_like(centers)
        np.add.at(sums, labels, x)
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            dist = ((x - centers[labels]) ** 2).sum(1)
            for j, i in zip(empty, np.argsort(-dist, kind="stable"), strict=False):
                sums[labels[i]] -= x[i]
                counts[labels[i]] -= 1
                sums[j], counts[j] = x[i], 1.0
        new = sums / np.where(counts > 0, counts, 1.0)[:, None]
        shift = float(((new - centers) ** 2).sum())
        centers = new
        if np.array_equal(labels, old):
            converged = True
            break
        if shift <= tol:
            break
        old = labels
    if not converged:
        labels = nearest(centers)  # the assignment of the final centres
    return labels, float(((x - centers[labels]) ** 2).sum())


def kmeans(x: np.ndarray, k: int, iters: int, inits: int = 10, seed: int = 0) -> np.ndarray:
    """Cluster ids of the k-means run of least inertia among `inits` k-means++ starts, drawn in
    turn from one `RandomState(seed)` (scikit-learn's `KMeans(n_clusters=k,
    random_state=seed)`, n_init 10 before 1.4, tol 1e-4 of the mean feature variance)."""
    rng = np.random.RandomState(seed)
    x = x.astype(np.float64)
    tol = 1e-4 * float(x.var(0).mean())
    best, least = np.zeros(len(x), dtype=np.int64), np.inf
    for _ in range(inits):
        labels, inertia = lloyd(x, kmeans_plus_plus(x, k, rng), iters, tol)
        if inertia < least:
            best, least = labels, inertia
    return best


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
                purity(labels, self._clusters(h[m])) for h, labels in (feats["train"], feats["val"])
            )
            w = relearn_weight(p_train, p_val, cfg.move_lambda)
            with torch.no_grad():
                for n, param in model.encoders[m].named_parameters():
                    # one frozen by train.freeze has never trained: it is its initial value,
                    # which the formula would give back up to rounding
                    if param.requires_grad:
                        param.mul_(1 - w).add_(self.initial[f"{m}.{n}"], alpha=w)
            self.figures.update(
                {f"purity_train_{m}": p_train, f"purity_val_{m}": p_val, f"reinit_w_{m}": w}
            )
        model.train()

    def _clusters(self, features: np.ndarray) -> np.ndarray:
        """`reinit_score`: MinMaxScaler((-1, 1)), then KMeans(n_clusters=C, random_state=0)."""
        cfg = self.config
        return kmeans(minmax_scale(features), self.num_classes, cfg.kmeans_iters, cfg.kmeans_inits)

    def on_epoch_end(self, model: MultimodalModel, ctx: TrainContext) -> dict[str, float]:
        figures, self.figures = self.figures, {}
        return figures

    @staticmethod
    @no_grad
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
