"""PMR: prototypical modal rebalance.

Paper: Fan, Xu, Wei, Wu, Guo, "PMR: Prototypical Modal Rebalance for Multimodal Learning",
CVPR 2023. Follows the official code (fanyunfeng-bit/Modal-Imbalance-PMR, commit
3615e48983555089b0e693380087617c3797a641, `main_Prototype_grad.py`: `calculate_prototype`,
`train_epoch` with `--modulation Proto`; its CREMA-D runs in `bash.sh`, of which the concat ones
train with Adam on 3 frames: recipes/pmr-adam-crema-d.yaml); spec: docs/methods.md#pmr.

What it changes: the loss, plus an epoch hook for prototypes.
- Prototypes c_m^k: the mean encoder-m feature of the training samples of class k, computed in
  eval mode without grad before epoch 0 and after every epoch, read in order through
  `TrainContext.batches("train")`. `prototype_data: tenth` reads the first tenth of the training
  samples, as the official code reads the first N_batches // 10 batches of its (shuffled)
  loader; `all` reads the whole split, as BalanceBenchmark. After the epochs numbered 1, 2, ...
  (0-based) the new prototypes are blended as c = (1 - momentum) c_new + momentum c_old; the
  first two computations (before and after epoch 0) are taken as they are, as the official
  `epoch <= 0` test does.
- Per step: q_m^i[k] = -||h_m^i - c_m^k||_2, PCE_m = CE(q_m, y), prototype score
  s^p_m = sum_i softmax(q_m^i)[y_i]. Inside the modulation window (0-based, inclusive),
  L = CE(z, y) + alpha * sum_{m : s^p_m < max_k s^p_k} PCE_m, else L = CE(z, y).

M > 2: every modality that is not the best by prototype score gets alpha * PCE_m (our rule;
BalanceBenchmark switches to OGM-like gradient noise for three modalities). At M = 2 this is the
released binary switch: only the weaker modality gets the prototype loss, and none on a tie.

Deviations: the prototype entropy regulariser of the paper is not in the released code and is
not implemented. The official tenth is a random tenth (its loader shuffles); ours is the first
tenth in the split's order, and the split's size is learned by counting the first epoch's
training samples, so the prototypes before epoch 0 (from the random-init model) use the whole
split. A class absent from the samples read keeps its previous prototype (zero at first; the
official divides by zero). Works with any fusion: it needs only the encoder features.

DDP: each rank reads its share of the prototype samples (`TrainContext.rank_batches`; the same
first tenth or whole split) and the per-class feature sums and counts are summed over the ranks,
so every rank holds the global prototypes. The prototype scores s^p_m of a step are summed over
the ranks before the weakest modalities are picked, and the epoch's sample count (for the
tenth) too: the weights are the global batch's on every rank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from mmval.distributed import all_reduce, world_size
from mmval.lazy import lazy_module, no_grad
from mmval.methods.base import Method, MethodConfig, TrainContext, never_acts, window_problems
from mmval.models import ModelConfig, ModelOutput

if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F

    from mmval.data.dataset import Batch
    from mmval.models import MultimodalModel
else:
    torch = lazy_module("torch")
    F = lazy_module("torch.nn.functional")


class PMRConfig(MethodConfig):
    min_modalities: ClassVar[int] = 2
    name: Literal["pmr"] = "pmr"
    source: ClassVar[str] = (
        "fanyunfeng-bit/Modal-Imbalance-PMR@3615e48983555089b0e693380087617c3797a641"
    )
    quick: ClassVar[dict[str, Any]] = {"method": {"prototype_data": "tenth"}}
    alpha: float = Field(default=1.0, ge=0, description="prototype CE weight (official CLI 1.0)")
    momentum: float = Field(
        default=0.2, ge=0, lt=1, description="EMA weight of the old prototypes (official CLI 0.2)"
    )
    modulation_starts: int = Field(default=0, ge=0, description="first modulated epoch")
    modulation_ends: int = Field(
        default=100, ge=0, description="last modulated epoch (official 100)"
    )
    prototype_data: Literal["tenth", "all"] = Field(
        default="tenth",
        description="training samples the prototypes are computed from: the first tenth "
        "(official) or all (BalanceBenchmark)",
    )

    def problems(self, model: ModelConfig, modalities: list[str] | None) -> list[tuple[str, str]]:
        return window_problems(self.modulation_starts, self.modulation_ends)

    def inactive_reason(self, epochs: int) -> tuple[str, str] | None:
        return never_acts("modulation_starts", self.modulation_starts, epochs, "the prototype loss")


def prototype_logits(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """q[i, k] = -||h_i - c_k||_2."""
    return -torch.cdist(features.float(), prototypes)


def prototype_weights(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha for every modality whose prototype score is below the best one, else 0."""
    return torch.where(scores < scores.max(), alpha, 0.0)


def class_means(
    sums: torch.Tensor, counts: torch.Tensor, previous: torch.Tensor | None
) -> torch.Tensor:
    """Per-class means [C, d]; classes without samples keep `previous` (zeros at first)."""
    fallback = torch.zeros_like(sums) if previous is None else previous
    seen = counts > 0
    return torch.where(seen[:, None], sums / counts.clamp_min(1)[:, None], fallback)


class PMR(Method):
    Config: ClassVar[type[MethodConfig]] = PMRConfig
    config: PMRConfig

    def __init__(self, config: MethodConfig, num_classes: int) -> None:
        super().__init__(config, num_classes)
        self.prototypes: dict[str, torch.Tensor] | None = None
        self.train_size: int | None = None  # training samples per epoch, counted in epoch 0
        self._seen = 0

    @no_grad
    def compute_prototypes(self, model: MultimodalModel, ctx: TrainContext) -> None:
        limit = None
        if self.config.prototype_data == "tenth" and self.train_size is not None:
            limit = max(1, self.train_size // 10)
        positions = None  # under DDP the ranks share the samples read: name them
        if limit is not None and world_size() > 1:
            positions = np.arange(min(limit, ctx.train_size))
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        counts = torch.zeros(self.num_classes, device=device)
        sums = {
            m: torch.zeros(self.num_classes, model.feature_dims[m], device=device)
            for m in model.modalities
        }
        read = 0
        try:
            for batch in ctx.rank_batches("train", positions):
                if limit is not None and read >= limit:
                    break
                labels, inputs = batch.label, batch.inputs
                if limit is not None and read + len(labels) > limit:
                    keep = limit - read
                    labels, inputs = labels[:keep], {m: x[:keep] for m, x in inputs.items()}
                read += len(labels)
                onehot = F.one_hot(labels, self.num_classes).float()
                counts = counts + onehot.sum(0)
                for m, h in model.encode(inputs).items():
                    sums[m] = sums[m] + onehot.T @ h.float()
        finally:
            model.train(was_training)
        counts = all_reduce(counts)
        sums = {m: all_reduce(s) for m, s in sums.items()}
        assert counts.sum() > 0, "the training split is empty"
        old = self.prototypes
        new = {m: class_means(s, counts, None if old is None else old[m]) for m, s in sums.items()}
        if old is not None and ctx.epoch >= 1:
            mu = self.config.momentum
            new = {m: (1 - mu) * c + mu * old[m] for m, c in new.items()}
        self.prototypes = new

    def on_epoch_start(self, model: MultimodalModel, ctx: TrainContext) -> None:
        self._seen = 0
        if self.prototypes is None:
            self.compute_prototypes(model, ctx)

    def loss(
        self, model: MultimodalModel, out: ModelOutput, batch: Batch, ctx: TrainContext
    ) -> torch.Tensor:
        self._seen += len(batch)
        loss = F.cross_entropy(out.logits, batch.label)
        if not self.config.modulation_starts <= ctx.epoch <= self.config.modulation_ends:
            return loss
        assert self.prototypes is not None
        names = model.modalities
        q = {
            m: prototype_logits(h, self.prototypes[m].to(h.device)) for m, h in out.features.items()
        }
        with torch.no_grad():
            scores = torch.stack(
                [q[m].softmax(1).gather(1, batch.label[:, None]).sum() for m in names]
            )
            scores = all_reduce(scores)  # the global batch's
            weights = prototype_weights(scores, self.config.alpha).tolist()
        for m, w in zip(names, weights, strict=True):
            if w > 0:
                loss = loss + w * F.cross_entropy(q[m], batch.label)
        return loss

    def on_epoch_end(self, model: MultimodalModel, ctx: TrainContext) -> dict[str, float]:
        if ctx.epoch == 0:
            self.train_size = int(all_reduce(torch.tensor(self._seen)))
        self.compute_prototypes(model, ctx)
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"prototypes": self.prototypes, "train_size": self.train_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prototypes = state["prototypes"]
        self.train_size = state["train_size"]
