"""Linear probe: a new fusion head trained on the frozen encoders of a finished run.

Follows BalanceBenchmark (GeWu-Lab/BalanceBenchmark @4c1482fca5aaa8d4278af8e26020daa039e3ccf3,
`balancemm/trainer/LinearProbe_trainer.py`: `LinearProbeTrainer`, `NewLinearHead`): the probed
run's model is loaded, every encoder is frozen and kept in eval mode, and a new concat linear head
is trained with cross-entropy on the encoder features. It measures how linearly separable the
jointly learnt features are (docs/methods.md#linear_probe).

What it changes: `build_modules` copies the encoders of `method.checkpoint` (a local checkpoint of
any mmval run with these modalities and encoders, e.g. `runs/ogm_ge-uci-mfeat/seed0/best.pt`) into
the model; `forward` runs them in eval mode without gradient, so only the fusion head (freshly
initialised; `model.fusion`, concat as BalanceBenchmark's) is trained. BalanceBenchmark finds the
newest run of a named trainer by directory; here the checkpoint is named explicitly.

M > 2: native.

DDP: nothing is reduced: every rank loads the same encoders and the head's loss is a batch
mean, so the gradients averaged over the ranks are the global batch's.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from mmval.artifacts.checkpoint import load_checkpoint
from mmval.errors import UserError
from mmval.lazy import lazy_module
from mmval.methods.base import Method, MethodConfig, TrainContext
from mmval.models import ModelOutput

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mmval.data.dataset import Batch
    from mmval.models import MultimodalModel
else:
    torch = lazy_module("torch")
    nn = lazy_module("torch.nn")


class LinearProbeConfig(MethodConfig):
    name: Literal["linear_probe"] = "linear_probe"
    source: ClassVar[str] = "GeWu-Lab/BalanceBenchmark@4c1482fca5aaa8d4278af8e26020daa039e3ccf3"
    quick: ClassVar[dict[str, Any]] = {"method": {"checkpoint": "{checkpoint}"}}
    checkpoint: Path = Field(description="checkpoint (.pt) of the run whose encoders are probed")


def load_encoder(path: Path, modality: str, encoder: nn.Module, field: str) -> None:
    """Copy modality's encoder weights from an mmval checkpoint into `encoder` (same config)."""
    from mmval.models.encoders import load_state

    ckpt = load_checkpoint(path)
    prefix = f"encoders.{modality}."
    state = {k[len(prefix) :]: v for k, v in ckpt.model.items() if k.startswith(prefix)}
    if not state:
        raise UserError(
            f"{field}: {path} holds no encoder for modality {modality!r} (its run was trained "
            f"on {', '.join(ckpt.data.modalities)})."
        )
    load_state(encoder, state, f"{field}: the {modality!r} encoder in {path}")


class LinearProbe(Method):
    Config: ClassVar[type[MethodConfig]] = LinearProbeConfig
    config: LinearProbeConfig

    def build_modules(self, model: MultimodalModel) -> nn.ModuleDict:
        for m in model.modalities:
            load_encoder(self.config.checkpoint, m, model.encoders[m], "method.checkpoint")
        return nn.ModuleDict()

    def forward(self, model: MultimodalModel, batch: Batch, ctx: TrainContext) -> ModelOutput:
        model.encoders.eval()
        with torch.no_grad():
            features = model.encode(batch.inputs)
        unimodal = model.fusion.unimodal_logits(features) if model.decomposable else None
        return ModelOutput(model.fuse(features), features, unimodal)
