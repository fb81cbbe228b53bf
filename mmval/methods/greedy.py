"""Greedy: balancing the conditional learning speeds of a mid-fusion model.

Paper: Wu, Jastrzebski, Cho, Geras, "Characterizing and Overcoming the Greedy Nature of Learning
in Multi-modal Deep Neural Networks", ICML 2022. Follows the official code
(nyukat/greedy_multimodal_learning @a190e03755bd8d0883b2c5c0cd7921d2561ce2ee:
`src/callbacks.py::Bias_Mitigation_Strong`,
`src/balanced_mmtm.py`, `src/model.py`, `train.py`, `configs/training_guided.gin`); spec:
docs/methods.md#greedy. BalanceBenchmark's (@4c1482fca5aaa8d4278af8e26020daa039e3ccf3)
`balancemm/trainer/Greedy_trainer.py` was read for comparison.

The model: two branches exchanging information through MMTM blocks (`model.mmtm`, see
mmval/models/mmtm.py; official after ResNet stages 2, 3, 4), each branch with its own head; the
official prediction is the mean of the two heads' logits, i.e. `model.fusion: late`, and the
official loss the sum of the branches' cross-entropies (`blend_loss`; `loss: fused` trains the
fused logits instead, as BalanceBenchmark does).

What it changes, after every backward (the official `on_backward_end`): for modality m, the
"main" parameters are its encoder and its head, the "bypass" ones its MMTM excitation layers plus
the shared squeeze layers (which count for both). It accumulates over the run
M_main,m += sum |g|^2 / sum |theta|^2 and M_bypass,m likewise, and the conditional utilisation
rate BDR_m = log10(M_bypass,m / M_main,m), d = BDR_0 - BDR_1. From `starting_epoch` on, when
not re-balancing and |d| > epsilon, it re-balances for the next `window` steps with caring
modality 0 if d > 0 else 1: in those training forwards the caring modality's MMTM gates are
replaced by their running means (its conditioning on the other modality is cut). The
accumulators are not updated during re-balancing steps, as in the official code. Before
`starting_epoch` they are updated but nothing is re-balanced.

Defaults: official epsilon 0.01, window 5 (`curation_windowsize`), starting epoch 2 of its
1-based epochs, which is 0-based epoch 1 here. BalanceBenchmark uses alpha = 0.001 as epsilon
and re-balances from the first epoch.

M > 2: not defined (BDR differences are pairwise, the caring modality is one of two); a recipe
with other than two modalities is refused.
DDP: nothing is reduced here. The gradients the speeds are computed from are already averaged
over the ranks (and the parameters are the same on every rank), so the accumulators, d and the
re-balancing decisions are the global batch's and the same everywhere; the MMTM blocks update
their running gates from the global batch's mean gate (mmval/models/mmtm.py).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from mmval.lazy import lazy_module
from mmval.methods.base import (
    Method,
    MethodConfig,
    TrainContext,
    never_acts,
    unimodal_cross_entropy,
)
from mmval.models import ModelConfig, ModelOutput

if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from mmval.data.dataset import Batch
    from mmval.models import MultimodalModel
else:
    torch = lazy_module("torch")
    F = lazy_module("torch.nn.functional")


class GreedyConfig(MethodConfig):
    fusion: ClassVar[str] = "late"
    min_modalities: ClassVar[int] = 2
    max_modalities: ClassVar[int | None] = 2
    name: Literal["greedy"] = "greedy"
    source: ClassVar[str] = (
        "nyukat/greedy_multimodal_learning@a190e03755bd8d0883b2c5c0cd7921d2561ce2ee"
    )
    quick: ClassVar[dict[str, Any]] = {
        "model": {"mmtm": {"stages": [1]}},
        "method": {"starting_epoch": 0, "epsilon": 1e-6},
    }
    epsilon: float = Field(
        default=0.01, gt=0, description="|d BDR| that starts re-balancing (official 0.01)"
    )
    window: int = Field(default=5, ge=1, description="re-balancing steps (official 5)")
    starting_epoch: int = Field(
        default=1, ge=0, description="first 0-based epoch that may re-balance (official 2nd)"
    )
    loss: Literal["branches", "fused"] = Field(
        default="branches",
        description="branches: sum of the per-modality heads' CE (official); fused: CE of the "
        "fused logits (BalanceBenchmark)",
    )

    def problems(self, model: ModelConfig, modalities: list[str] | None) -> list[tuple[str, str]]:
        found = []
        if model.mmtm is None:
            found.append(
                ("model.mmtm", "greedy needs the MMTM mid-fusion model: set model.mmtm: {}")
            )
        if self.loss == "branches" and model.fusion and not model.fusion.decomposable:
            found.append(
                (
                    "model.fusion",
                    f"greedy's branch loss needs per-modality logits; {model.fusion.name} fusion "
                    "has none (official: late)",
                )
            )
        return found

    def inactive_reason(self, epochs: int) -> tuple[str, str] | None:
        return never_acts("starting_epoch", self.starting_epoch, epochs, "the re-balancing")


def utilisation_gap(main: list[float], bypass: list[float]) -> float:
    """d = BDR_0 - BDR_1 with BDR_m = log10(bypass_m / main_m) (accumulated speeds)."""
    bdr = [math.log10(b / m) for m, b in zip(main, bypass, strict=True)]
    return bdr[0] - bdr[1]


def _speed(params: list[nn.Parameter]) -> float:
    """sum |g|^2 / sum |theta|^2 over the parameters that received a gradient."""
    grads = [(p.grad.float().square().sum(), p.detach().float().square().sum()) for p in params]
    if not grads:
        return 0.0
    g, w = (torch.stack(x).sum() for x in zip(*grads, strict=True))
    return float(g / w) if float(w) > 0 else 0.0


class Greedy(Method):
    Config: ClassVar[type[MethodConfig]] = GreedyConfig
    config: GreedyConfig

    def __init__(self, config: MethodConfig, num_classes: int) -> None:
        super().__init__(config, num_classes)
        self.main = [0.0, 0.0]
        self.bypass = [0.0, 0.0]
        self.caring: int | None = None
        self.curation_step = 0
        self.gap = 0.0

    def _groups(self, model: MultimodalModel) -> tuple[list[list[nn.Parameter]], ...]:
        """(main, bypass) parameter lists per modality."""
        assert model.mid_fusion is not None
        heads = getattr(model.fusion, "heads", None)
        main, bypass = [], []
        for m in model.modalities:
            own = list(model.encoders[m].parameters())
            if heads is not None:
                own += list(heads[m].parameters())
            main.append(own)
            bypass.append(
                [
                    p
                    for block in model.mid_fusion.blocks.values()
                    for p in [*block.excite[m].parameters(), *block.squeeze.parameters()]
                ]
            )
        return main, bypass

    def _with_grad(self, params: list[nn.Parameter]) -> list[nn.Parameter]:
        return [p for p in params if p.grad is not None]

    def on_epoch_start(self, model: MultimodalModel, ctx: TrainContext) -> None:
        self._apply(model)  # after a resume, the re-balancing state returns to the model

    def _apply(self, model: MultimodalModel) -> None:
        assert model.mid_fusion is not None
        model.mid_fusion.caring = None if self.caring is None else model.modalities[self.caring]

    def loss(
        self, model: MultimodalModel, out: ModelOutput, batch: Batch, ctx: TrainContext
    ) -> torch.Tensor:
        if self.config.loss == "fused":
            return F.cross_entropy(out.logits, batch.label)
        return unimodal_cross_entropy(out, batch.label)

    def after_backward(
        self, model: MultimodalModel, out: ModelOutput, batch: Batch, ctx: TrainContext
    ) -> dict[str, float]:
        rebalancing = float(self.caring is not None)
        if self.caring is not None:
            self.curation_step += 1
            if self.curation_step == self.config.window:
                self.caring = None
        else:
            main, bypass = self._groups(model)
            for i in range(2):
                self.main[i] += _speed(self._with_grad(main[i]))
                self.bypass[i] += _speed(self._with_grad(bypass[i]))
            if min(self.main) > 0 and min(self.bypass) > 0:
                self.gap = utilisation_gap(self.main, self.bypass)
            if ctx.epoch >= self.config.starting_epoch and abs(self.gap) > self.config.epsilon:
                self.caring, self.curation_step = (0 if self.gap > 0 else 1), 0
        self._apply(model)
        return {"d_bdr": self.gap, "rebalancing": rebalancing}

    def state_dict(self) -> dict[str, Any]:
        return {
            "main": list(self.main),
            "bypass": list(self.bypass),
            "caring": -1 if self.caring is None else self.caring,
            "curation_step": self.curation_step,
            "gap": self.gap,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.main = [float(v) for v in state["main"]]
        self.bypass = [float(v) for v in state["bypass"]]
        caring = int(state["caring"])
        self.caring = None if caring < 0 else caring
        self.curation_step = int(state["curation_step"])
        self.gap = float(state["gap"])
