"""G-Blending: a loss weight per modality, from how each sub-model generalises versus overfits.

Paper: Wang, Tran, Feiszli, "What Makes Training Multi-Modal Classification Networks Hard?",
CVPR 2020. There is no official code; this is mmval's variant
(docs/methods.md#gblending): separate unimodal heads, a held-out set V
carved from the train split, and the paper's delta form of the weights. The data split, the
sub-model training and the schedule follow MultiBench (pliang279/MultiBench
@49f9be224f342de005b7f001281f33df4301eb22,
`training_structures/gradient_blend.py`: `train`, `gb_estimate`, `train_unimodal`,
`train_multimodal`), which carves V the same way; BalanceBenchmark's
(@4c1482fca5aaa8d4278af8e26020daa039e3ccf3) `balancemm/trainer/GBlending_trainer.py` is
not followed where it differs (it reuses the fused head for unimodal copies and takes V from the
val loader). Defaults: online, super_epoch 10 (BalanceBenchmark), v_rate 0.08 (MultiBench).

What it changes: the loss, L = w_mm CE(z) + sum_m w_m CE(head_m(h_m)), with unimodal heads from
`build_modules` (trained, never used for prediction). The first `v_rate` of the train split (by
position, as MultiBench) is V and is never trained on; the rest is T. At the start of every
super-epoch of N epochs (online; offline: once, before the first epoch) each sub-model is copied:
encoder m + head m for every modality, the whole model for mm. Each copy is trained N epochs on T
with a fresh optimizer of the run's kind and current learning rate, and its mean losses on T and
V are measured before (n) and after (n + N). With dG = L^V_n - L^V_{n+N} and
dO = (L^V - L^T)_{n+N} - (L^V - L^T)_n, w_k is proportional to |dG / dO^2|, normalised to sum 1.

Deviations and choices: the size of the train split is counted with one pass over it before the
first epoch (the protocol gives no length). The estimation runs at the first step of a
super-epoch, inside `train_step`, where the run's optimizer is known. T is read through
`TrainContext.batches` (index order, no augmentation, blocks of eval_batch_size); each block is
shuffled with a generator seeded by (seed, epoch, copy, copy epoch) and cut into batches of the
training batch size, so the copies see a shuffle within blocks, not across the whole split.
Losses are measured in eval mode (MultiBench leaves dropout on). |dO| is clamped below at 1e-4,
as MultiBench clamps its overfitting term. The weights are logged as `gb_w_<m>` and `gb_w_mm`.

M > 2: native; an estimate costs (M + 1) N epochs of sub-model training.

DDP: the estimate is replicated: every rank trains the same copies on the whole of T and V
(inside `replicated()`, so nothing in it is reduced over the ranks), with the global batch size,
and the weights of rank 0 are then broadcast, so every rank trains the main model with the same
ones. Its cost therefore does not shrink with the number of processes. The main step's loss is a
batch mean of per-sample terms, so the averaged gradients are the global batch's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from mmval.distributed import broadcast_object, replicated, world_size
from mmval.lazy import lazy_module, no_grad
from mmval.methods.base import Method, MethodConfig, StepResult, StepTools, TrainContext

if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from mmval.data.dataset import Batch
    from mmval.models import MultimodalModel
else:
    torch = lazy_module("torch")
    F = lazy_module("torch.nn.functional")
    nn = lazy_module("torch.nn")

MM = "mm"  # the key of the fused model's weight


class GBlendingConfig(MethodConfig):
    min_modalities: ClassVar[int] = 2
    name: Literal["gblending"] = "gblending"
    source: ClassVar[str] = (
        "no official code; pliang279/MultiBench@49f9be224f342de005b7f001281f33df4301eb22"
    )
    # v_rate 0.1 leaves 216 of the 240 samples of the test data to train on: even shares on 2 ranks
    quick: ClassVar[dict[str, Any]] = {"method": {"super_epoch": 1, "v_rate": 0.1}}
    schedule: Literal["online", "offline"] = Field(
        default="online", description="re-estimate every super_epoch (BalanceBenchmark) or once"
    )
    super_epoch: int = Field(
        default=10, ge=1, description="N: epochs each copy trains per estimate (BalanceBenchmark)"
    )
    v_rate: float = Field(
        default=0.08, gt=0, lt=1, description="share of train held out as V (MultiBench)"
    )
    seed: int = Field(default=0, description="seed of the copies' batch shuffling")


def blend_weights(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> dict[str, float]:
    """Normalised |dG / dO^2| from (L^T, L^V) before and after training each sub-model."""
    raw = {}
    for k, (t0, v0) in before.items():
        t1, v1 = after[k]
        gain = v0 - v1
        overfit = max(abs((v1 - t1) - (v0 - t0)), 1e-4)
        raw[k] = abs(gain / overfit**2)
    total = sum(raw.values())
    if total == 0:  # no sub-model improved on V at all: no evidence to weight by
        return {k: 1 / len(raw) for k in raw}
    return {k: w / total for k, w in raw.items()}


class GBlending(Method):
    Config: ClassVar[type[MethodConfig]] = GBlendingConfig
    config: GBlendingConfig

    def __init__(self, config: MethodConfig, num_classes: int) -> None:
        super().__init__(config, num_classes)
        self.weights: dict[str, float] = {}
        self.estimated_at = -1
        self.n_train = 0

    def build_modules(self, model: MultimodalModel) -> nn.ModuleDict:
        self.heads = nn.ModuleDict(
            {m: nn.Linear(d, self.num_classes) for m, d in model.feature_dims.items()}
        )
        return nn.ModuleDict({"heads": self.heads})

    def held_out(self) -> int:
        """V is positions [0, held_out()) of the train split."""
        return int(self.n_train * self.config.v_rate)

    def train_positions(self, ctx: TrainContext) -> np.ndarray:
        if not self.n_train:
            self.n_train = sum(len(b) for b in ctx.batches("train"))
        return np.arange(self.held_out(), self.n_train)

    def _due(self, epoch: int) -> bool:
        if self.config.schedule == "offline":
            return epoch == 0
        return epoch % self.config.super_epoch == 0

    def train_step(
        self, model: MultimodalModel, batch: Batch, ctx: TrainContext, tools: StepTools
    ) -> StepResult:
        figures = {}
        if self._due(ctx.epoch) and self.estimated_at != ctx.epoch:
            size = len(batch) * world_size()  # the global batch (a first batch is whole)
            with replicated():  # every rank estimates alike, on the whole split
                weights = self.estimate(model, ctx, tools, size)
            self.weights = broadcast_object(weights)
            self.estimated_at = ctx.epoch
            figures = {f"gb_w_{k}": w for k, w in self.weights.items()}
        with tools.autocast():
            out = self.forward(model, batch, ctx)
            loss = self.weights[MM] * F.cross_entropy(out.logits, batch.label)
            for m in model.modalities:
                head_loss = F.cross_entropy(self.heads[m](out.features[m]), batch.label)
                loss = loss + self.weights[m] * head_loss
        tools.zero_grad()
        loss.backward()
        tools.step()
        return StepResult(loss.detach(), out.logits.detach(), figures)

    def estimate(
        self, model: MultimodalModel, ctx: TrainContext, tools: StepTools, batch_size: int
    ) -> dict[str, float]:
        """Train a copy of each sub-model for N epochs on T; weights from its T and V losses."""
        subs: dict[str, Callable[[nn.Module, Batch], torch.Tensor]] = {
            m: _unimodal_logits(m) for m in model.modalities
        }
        subs[MM] = _fused_logits
        before, after = {}, {}
        for k, (key, logits_of) in enumerate(subs.items()):
            if key == MM:
                original: nn.Module = model
            else:
                original = nn.ModuleDict({"encoder": model.encoders[key], "head": self.heads[key]})
            sub = copy.deepcopy(original)  # frozen parts (train.freeze) stay frozen in it
            optimizer = _fresh_like(tools.optimizer, original.parameters(), sub.parameters())
            before[key] = self._losses(sub, logits_of, ctx, tools)
            for epoch in range(self.config.super_epoch):
                seed = [self.config.seed, ctx.epoch, k, epoch]
                sub.train()
                for part in self._split_batches(ctx, "T", batch_size, np.random.default_rng(seed)):
                    with tools.autocast():
                        loss = F.cross_entropy(logits_of(sub, part), part.label)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
            after[key] = self._losses(sub, logits_of, ctx, tools)
        model.train()
        return blend_weights(before, after)

    @no_grad
    def _losses(
        self,
        sub: nn.Module,
        logits_of: Callable[[nn.Module, Batch], torch.Tensor],
        ctx: TrainContext,
        tools: StepTools,
    ) -> tuple[float, float]:
        """Mean cross-entropy over T and over V, in eval mode."""
        sub.eval()
        result = []
        for part_name in ("T", "V"):
            total, count = 0.0, 0
            for part in self._split_batches(ctx, part_name, None, None):
                with tools.autocast():
                    loss = F.cross_entropy(
                        logits_of(sub, part).float(), part.label, reduction="sum"
                    )
                total, count = total + loss.item(), count + len(part.label)
            result.append(total / max(count, 1))
        return result[0], result[1]

    def _split_batches(
        self, ctx: TrainContext, part: str, size: int | None, rng: np.random.Generator | None
    ) -> Iterator[Batch]:
        """T or V from the train split; shuffled within blocks and re-cut to `size` if given."""
        cut = self.held_out()
        for block in ctx.batches("train"):
            keep = block.index >= cut if part == "T" else block.index < cut
            rows = torch.nonzero(keep).flatten()
            if rng is not None:
                rows = rows[torch.as_tensor(rng.permutation(len(rows)), device=rows.device)]
            step = size or len(rows)
            for start in range(0, len(rows), max(step, 1)):
                yield _take(block, rows[start : start + step])

    def state_dict(self) -> dict[str, Any]:
        return {"weights": dict(self.weights), "estimated_at": self.estimated_at, "n": self.n_train}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights = {k: float(v) for k, v in state["weights"].items()}
        self.estimated_at = int(state["estimated_at"])
        self.n_train = int(state["n"])


def _take(batch: Batch, rows: torch.Tensor) -> Batch:
    from mmval.data.dataset import Batch

    return Batch(
        inputs={m: x[rows] for m, x in batch.inputs.items()},
        label=batch.label[rows],
        index=batch.index[rows],
    )


def _unimodal_logits(modality: str) -> Callable[[nn.Module, Batch], torch.Tensor]:
    def logits(sub: nn.Module, batch: Batch) -> torch.Tensor:
        return sub["head"](sub["encoder"](batch.inputs[modality]))

    return logits


def _fused_logits(sub: nn.Module, batch: Batch) -> torch.Tensor:
    return sub(batch.inputs).logits


def _fresh_like(
    optimizer: torch.optim.Optimizer,
    originals: Iterator[nn.Parameter],
    copies: Iterator[nn.Parameter],
) -> torch.optim.Optimizer:
    """A new optimizer of the run's kind and settings for `copies` (of `originals`, in the same
    order), each at the current learning rate and the weight decay of its original's group
    (optim.groups)."""
    group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    members: dict[int, list[nn.Parameter]] = {}
    for original, param in zip(originals, copies, strict=True):
        members.setdefault(group_of[id(original)], []).append(param)
    groups = [
        {
            "params": params,
            "lr": optimizer.param_groups[i]["lr"],
            "weight_decay": optimizer.param_groups[i]["weight_decay"],
        }
        for i, params in sorted(members.items())
    ]
    return type(optimizer)(groups, **optimizer.defaults)
