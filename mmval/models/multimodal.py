"""The model every method trains: encoders by modality name, then a fusion head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from mmval.data.shards import ModalitySpec
from mmval.models.encoders import EncoderConfig, MLPEncoderConfig, build_encoder
from mmval.models.fusion import ADDITIVE, DECOMPOSABLE, FusionName, InferenceName, build_fusion
from mmval.models.mmtm import MMTMConfig, MMTMFusion


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    encoder: EncoderConfig = Field(default_factory=MLPEncoderConfig, description="default encoder")
    encoders: dict[str, EncoderConfig] = Field(
        default_factory=dict, description="per-modality encoders, overriding `encoder`"
    )
    fusion: FusionName = "concat"
    mmtm: MMTMConfig | None = Field(
        default=None,
        description="mid-fusion: MMTM blocks between encoder stages (Greedy's model); "
        "resnet18 or mlp encoders",
    )
    fusion_hidden: int = Field(default=128, ge=1, description="hidden size of gated fusion")
    fusion_scale: float = Field(
        default=10.0, gt=0, description="cosine fusion: logit scale s (MMCosine official 10)"
    )
    fusion_inference: InferenceName = Field(
        default="dynamic",
        description="shared fusion (MLA): per-sample entropy weights, or fixed fusion_weights",
    )
    fusion_weights: dict[str, float] | None = Field(
        default=None,
        description="shared fusion with fusion_inference fixed: weight by modality (default "
        "1/M; MLA official 0.5/0.5, three modalities a 0.35, v 0.25, t 0.4)",
    )
    fusion_predominant: str | None = Field(
        default=None,
        description="imml fusion: the predominant modality (the front-door query); unset, the "
        "imml method picks the one with the higher unimodal val accuracy after its warm-up",
    )
    fusion_bank_size: int = Field(
        default=4096, ge=1, description="imml fusion: rows of the FIFO feature bank [ours]"
    )


@dataclass
class ModelOutput:
    logits: torch.Tensor
    features: dict[str, torch.Tensor]
    unimodal_logits: dict[str, torch.Tensor] | None


class MultimodalModel(nn.Module):
    def __init__(self, config: ModelConfig, specs: list[ModalitySpec], num_classes: int) -> None:
        super().__init__()
        self.modalities = [s.name for s in specs]
        self.encoders = nn.ModuleDict(
            {s.name: build_encoder(s, config.encoders.get(s.name, config.encoder)) for s in specs}
        )
        self.mid_fusion = None if config.mmtm is None else MMTMFusion(config.mmtm, self.encoders)
        dims = {m: enc.out_dim for m, enc in self.encoders.items()}
        self.fusion = build_fusion(
            config.fusion,
            dims,
            num_classes,
            config.fusion_hidden,
            config.fusion_scale,
            config.fusion_weights,
            config.fusion_inference,
            config.fusion_predominant,
            config.fusion_bank_size,
        )
        self.decomposable = config.fusion in DECOMPOSABLE
        self.additive = config.fusion in ADDITIVE

    def encode(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.mid_fusion is not None:
            return self.mid_fusion.encode(self.encoders, inputs)
        return {m: self.encoders[m](inputs[m]) for m in self.modalities}

    def fuse(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fusion(features)

    def representation(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The joint representation the head classifies (for distance-correlation analyses):
        the fusion's own where it builds one, else the concatenated modality features."""
        features = self.encode(inputs)
        own = getattr(self.fusion, "representation", None)
        if own is not None:
            return own(features)
        return torch.cat([features[m] for m in self.modalities], dim=1)

    def forward(self, inputs: dict[str, torch.Tensor]) -> ModelOutput:
        features = self.encode(inputs)
        unimodal = self.fusion.unimodal_logits(features) if self.decomposable else None
        return ModelOutput(self.fuse(features), features, unimodal)


def build_model(
    config: ModelConfig, specs: list[ModalitySpec], num_classes: int
) -> MultimodalModel:
    return MultimodalModel(config, specs, num_classes)
