"""MMPareto: Pareto-style combination of the multimodal and unimodal gradients of each encoder.

Paper: Wei, Hu, "MMPareto: Boosting Multimodal Learning with Innocent Unimodal Assistance",
ICML 2024. Follows the official code (GeWu-Lab/MMPareto_ICML2024
@a339db39cc25b157df376b50bb894917dc6c01d6, `code/MMPareto.py`, `train_epoch`, and
`code/min_norm_solvers.py`); spec: docs/methods.md#mmpareto.

What it changes: each modality gets its own linear head (from `build_modules`, trained with its
own cross-entropy, never used for prediction). Per batch, the multimodal loss L_mm = CE(z) and
the unimodal losses L_m = CE(head_m(h_m)) give, on encoder m, the gradients g_mm and g_u. If
cos(g_mm, g_u) > 0 (over all of encoder m's parameters flattened) the weights are (1/2, 1/2);
otherwise the two-task min-norm solution (MGDA) w_mm = (g_u - g_mm) . g_u / |g_mm - g_u|^2,
set to 0.999 if g_mm . g_u >= |g_mm|^2 and to 0.001 if g_mm . g_u >= |g_u|^2. For every
parameter tensor p of encoder m, n = 2 (w_mm g_mm,p + w_u g_u,p) and the gradient becomes
gamma * n, rescaled to the norm of the plain summed gradient g_sum,p = g_mm,p + g_u,p when that
norm is larger. The fusion head and the unimodal heads keep the summed gradient.

In the conflict branch this follows the official code, not BalanceBenchmark's
`MMPareto_trainer.py`, which writes the min-norm result into its loop variable and so zeroes
the encoder gradient (spec flag). The official code also appends the concatenated vector to the
solver's list, which doubles every dot product and leaves the weights unchanged; it is left out.

How it is computed: the official code runs M + 2 backward passes (L_mm, each L_m, then the sum).
Since L_m reaches only encoder m and head m, one backward of L_mm and one of sum_m L_m give every
g_mm and g_u, and g_sum is their sum (up to floating-point rounding), so two passes suffice.
Where n is zero (no gradient) the parameter gets a zero gradient instead of the official 0/0.
The logged training loss is L_mm + sum_m L_m, as the official code logs; `w_mm_<m>` is the
multimodal weight of encoder m, averaged over the epoch.

M > 2: native; each encoder is combined from its own two gradients only. Any fusion works, since
the unimodal heads read the encoder features.

DDP: g_mm and g_u are each averaged over the ranks right after their backward pass
(`StepTools.reduce_gradients`), so the cosines, the min-norm weights and the rescaling use the
global batch's gradients and every rank writes the same combined gradient (one all-reduce more
per step than plain training).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from mmval.lazy import lazy_module
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


class MMParetoConfig(MethodConfig):
    min_modalities: ClassVar[int] = 2
    name: Literal["mmpareto"] = "mmpareto"
    source: ClassVar[str] = "GeWu-Lab/MMPareto_ICML2024@a339db39cc25b157df376b50bb894917dc6c01d6"
    gamma: float = Field(
        default=1.5, gt=0, description="scale of the combined encoder gradient (official 1.5)"
    )


def pareto_weights(g_mm: torch.Tensor, g_u: torch.Tensor) -> tuple[float, float]:
    """(w_mm, w_u) for two flat gradients: equal if they agree, else the min-norm point."""
    if F.cosine_similarity(g_mm, g_u, dim=0) > 0:
        return 0.5, 0.5
    v11, v12, v22 = (g_mm @ g_mm).item(), (g_mm @ g_u).item(), (g_u @ g_u).item()
    if v12 >= v11:
        w = 0.999
    elif v12 >= v22:
        w = 0.001
    else:
        w = (v22 - v12) / (v11 + v22 - 2 * v12)
    return w, 1 - w


def combine(
    g_mm: torch.Tensor, g_u: torch.Tensor, weights: tuple[float, float], gamma: float
) -> torch.Tensor:
    """One parameter's new gradient: gamma * n, n rescaled up to the summed gradient's norm."""
    new = 2 * (weights[0] * g_mm + weights[1] * g_u)
    new_norm, sum_norm = torch.linalg.vector_norm(new), torch.linalg.vector_norm(g_mm + g_u)
    grow = (sum_norm > new_norm) & (new_norm > 0)
    scale = torch.where(grow, sum_norm / new_norm.clamp_min(torch.finfo(new.dtype).tiny), 1.0)
    return scale * new * gamma


class MMPareto(Method):
    Config: ClassVar[type[MethodConfig]] = MMParetoConfig
    config: MMParetoConfig

    def build_modules(self, model: MultimodalModel) -> nn.ModuleDict:
        self.heads = nn.ModuleDict(
            {m: nn.Linear(d, self.num_classes) for m, d in model.feature_dims.items()}
        )
        return nn.ModuleDict({"heads": self.heads})

    def train_step(
        self, model: MultimodalModel, batch: Batch, ctx: TrainContext, tools: StepTools
    ) -> StepResult:
        with tools.autocast():
            out = self.forward(model, batch, ctx)
            loss_mm = F.cross_entropy(out.logits, batch.label)
            loss_u = {
                m: F.cross_entropy(self.heads[m](out.features[m]), batch.label)
                for m in model.modalities
            }
        tools.zero_grad()
        loss_mm.backward(retain_graph=True)
        tools.reduce_gradients()  # DDP: the global batch's g_mm
        g_mm = {n: p.grad for n, p in model.encoders.named_parameters()}
        head_grads = [p.grad for p in model.fusion.parameters()]
        tools.zero_grad()
        sum(loss_u.values()).backward()
        tools.reduce_gradients()  # DDP: the global batch's g_u
        figures = {}
        for m in model.modalities:
            # the parameters of encoder m that either loss reaches, with both gradients
            pairs = [
                (p, _or_zeros(g_mm[f"{m}.{n}"], p), _or_zeros(p.grad, p))
                for n, p in model.encoders[m].named_parameters()
                if g_mm[f"{m}.{n}"] is not None or p.grad is not None
            ]
            weights = pareto_weights(
                torch.cat([a.flatten() for _, a, _ in pairs]).float(),
                torch.cat([b.flatten() for _, _, b in pairs]).float(),
            )
            figures[f"w_mm_{m}"] = weights[0]
            for p, a, b in pairs:
                p.grad = combine(a, b, weights, self.config.gamma)
        for p, g in zip(model.fusion.parameters(), head_grads, strict=True):
            p.grad = g
        tools.step()
        loss = loss_mm.detach() + sum(v.detach() for v in loss_u.values())
        return StepResult(loss, out.logits.detach(), figures)


def _or_zeros(grad: torch.Tensor | None, param: torch.Tensor) -> torch.Tensor:
    return grad if grad is not None else torch.zeros_like(param)
