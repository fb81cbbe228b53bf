"""MLA: multimodal learning with alternating unimodal adaptation and a shared head.

Paper: Zhang, Latham, Yao, "Multimodal Representation Learning by Alternating Unimodal
Adaptation", CVPR 2024. Follows the official code (Cecile-hi/Multimodal-Learning-with-
Alternating-Unimodal-Adaptation at ab6c184579f9ff390e9c9b8216c9900c2a43545b: `main.py`
`train_epoch` with `gs_flag`, lines 419-476, and `utils/utils.py` `GSPlugin`, lines 12-41);
BalanceBenchmark's `balancemm/trainer/MLA_trainer.py` for the optional projection; spec:
docs/methods.md#mla.

What it changes: the step schedule. The `shared` fusion (mmval/models/fusions/shared.py)
applies one linear head H to every modality and predicts with fixed or entropy-based weights.
Per batch, for each modality m in model order: z_m = H(E_m(x_m)), backward CE(z_m, y), one
optimizer step: M steps per batch, each encoder trained by its own loss only, H by all of them
in turn. The reported loss is the mean of the M unimodal losses (official: 0.5 / 0.5).

`projection` (default `none`): the paper's text controls H's updates with a gradient
modification (OWM), but the official code as released never applies it: `main.py` (line 437)
passes the bare `nn.Linear` `fusion_module.fc_out` to `GSPlugin.before_update`, whose loop over
its `named_parameters()` (`utils/utils.py` line 30) acts only on a parameter named
"module.weight" (line 32), while that layer's weight is named "weight". The published numbers
therefore come from alternating steps without projection, which `none` reproduces. `owm` is the
projection as BalanceBenchmark fixed the name (mmval's behaviour before this field existed): one
P shared by all modalities, P = I at the start, skipped on the run's very first update;
r = batch mean of h_m (detached), k = P r^T, P <- P - k k^T / (a + r k), P <- P / ||P||_F,
grad_W <- grad_W P^T, with a = 0.1 ** (1 + batch_idx / batches_per_epoch).

Deviations: (`owm`) both codes divide by `torch.mm(k, r)`, a d x d matrix (element-wise
division), where OWM's recursive projector, which they copy, has the scalar r k; the scalar is
used here, as OWM defines it, so that P stays a projector; BalanceBenchmark adds the projected
gradient to the raw one (grad + grad P^T), the official grad P^T is kept. The encoders run one
modality at a time (BalanceBenchmark) rather than all before the first step (official); the
results are the same, since the steps before modality m's forward do not touch encoder m.
Gradients are set to None after each step, where the official code (torch 1.8, whose
`zero_grad` zeroes) leaves zeros, so that its later steps of the same batch move the earlier
modalities' encoders by momentum and weight decay alone; here those encoders step once per
batch. BalanceBenchmark's modulation window (plain CE on the fused output outside epochs 0-80)
is not part of the official method and is left out.

M > 2: native (the official code has a three-modality branch, which this generalises).

DDP: after each modality's backward the gradients are averaged over the ranks
(`StepTools.reduce_gradients`); with `owm` H's is then projected, r being the global batch's
mean feature (`batch_mean`), so that every rank updates the same P and steps with the same
gradient.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import Field

from mmval.distributed import batch_mean
from mmval.lazy import lazy_module
from mmval.methods.base import Method, MethodConfig, StepResult, StepTools, TrainContext
from mmval.models import ModelConfig
from mmval.settings import AddedLater

if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F

    from mmval.data.dataset import Batch
    from mmval.models import MultimodalModel
else:
    torch = lazy_module("torch")
    F = lazy_module("torch.nn.functional")


class MLAConfig(MethodConfig):
    fusion: ClassVar[str] = "shared"
    fusions: ClassVar[tuple[str, ...] | None] = ("shared",)
    min_modalities: ClassVar[int] = 2
    name: Literal["mla"] = "mla"
    source: ClassVar[str] = (
        "Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation@"
        "ab6c184579f9ff390e9c9b8216c9900c2a43545b"
    )
    # runs written before the field projected: they keep their settings hash as `owm`
    projection: Annotated[Literal["none", "owm"], AddedLater(before="owm")] = Field(
        default="none",
        description="gradient projection of the shared head: none (the official code as "
        "released, whose projection never runs) or owm (the paper's, as BalanceBenchmark "
        "fixed it; mmval's MLA before this field)",
    )

    def problems(self, model: ModelConfig, modalities: list[str] | None) -> list[tuple[str, str]]:
        fusion = model.fusion
        if self.projection == "owm" and getattr(fusion, "hidden", None) is not None:
            return [
                (
                    "model.fusion.hidden",
                    "MLA's owm projection edits the gradient of one Linear head; leave hidden "
                    "unset, or use projection: none",
                )
            ]
        return []


def update_projection(projection: torch.Tensor, mean_feature: torch.Tensor, a: float) -> None:
    """One OWM step on P [d, d] in place, for the batch-mean feature r [d]."""
    r = mean_feature[None, :]
    k = projection @ r.T
    projection -= (k @ k.T) / (a + r @ k)
    projection /= torch.linalg.matrix_norm(projection)


class MLA(Method):
    Config: ClassVar[type[MethodConfig]] = MLAConfig
    config: MLAConfig

    def __init__(self, config: MethodConfig, num_classes: int) -> None:
        super().__init__(config, num_classes)
        self.projection: torch.Tensor | None = None
        self.updates = 0  # optimizer steps of the run (the official `exp_count`)
        self.epoch_first_step = 0

    def on_epoch_start(self, model: MultimodalModel, ctx: TrainContext) -> None:
        self.epoch_first_step = ctx.step

    def train_step(
        self, model: MultimodalModel, batch: Batch, ctx: TrainContext, tools: StepTools
    ) -> StepResult:
        fusion = model.fusion
        from mmval.models.fusions.heads import SharedFusion

        assert isinstance(fusion, SharedFusion)
        project = self.config.projection == "owm"
        weight = fusion.fc.weight if project else None  # a Linear head (problems())
        if project and self.projection is None:
            assert isinstance(weight, torch.Tensor)
            self.projection = torch.eye(weight.shape[1], device=weight.device)
        progress = (ctx.step - self.epoch_first_step) / max(ctx.steps_per_epoch, 1)
        a = 0.1 ** (1 + progress)
        logits, losses = {}, {}
        for m in model.modalities:
            with tools.autocast():
                features = model.encoders[m](batch.inputs[m])
                z = fusion.fc(features)
                loss = F.cross_entropy(z, batch.label)
            tools.zero_grad()
            loss.backward()
            tools.reduce_gradients()  # DDP: the projection edits the global batch's gradient
            if project and self.updates > 0:
                assert self.projection is not None and isinstance(weight, torch.Tensor)
                with torch.no_grad():
                    # a resumed run loads P on the CPU
                    self.projection = self.projection.to(weight.device)
                    mean = batch_mean(features.detach().float().mean(0), len(batch))
                    update_projection(self.projection, mean, a)
                    weight.grad = weight.grad @ self.projection.T.to(weight.grad.dtype)
            tools.step()
            self.updates += 1
            logits[m], losses[m] = z.detach(), loss.detach()
        tools.zero_grad()
        with torch.no_grad():
            fused = fusion.combine(logits)
        figures = {f"loss_{m}": float(v) for m, v in losses.items()}
        return StepResult(torch.stack(list(losses.values())).mean(), fused, figures)

    def state_dict(self) -> dict[str, Any]:
        return {"projection": self.projection, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.projection, self.updates = state["projection"], int(state["updates"])
