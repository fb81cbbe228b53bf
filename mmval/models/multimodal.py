"""The model every method trains: encoders by modality name, then a fusion head."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mmval.data.shards import ModalitySpec
from mmval.errors import UserError
from mmval.models.ave_att import AVAttModel
from mmval.models.config import ModelConfig
from mmval.models.encoders import build_encoder
from mmval.models.fusions import build_fusion
from mmval.models.mmbt import MMBTModel
from mmval.models.mmtm import MMTMFusion
from mmval.models.output import ModelOutput
from mmval.models.unet3d import UNet3D, UNet3DConfig

if TYPE_CHECKING:
    from mmval.models.neck import NeckSource


class MultimodalModel(nn.Module):
    """Encoders, the necks of the recipe's plug-ins in their order (none without plug-ins), the
    fusion head on what the last neck gives."""

    def __init__(
        self,
        config: ModelConfig,
        specs: list[ModalitySpec],
        num_classes: int,
        plugins: Sequence[NeckSource] = (),
    ) -> None:
        super().__init__()
        self.modalities = [s.name for s in specs]
        self.encoders = nn.ModuleDict(
            {s.name: build_encoder(s, config.encoders.get(s.name, config.encoder)) for s in specs}
        )
        self.mid_fusion = None if config.mmtm is None else MMTMFusion(config.mmtm, self.encoders)
        dims = {m: enc.out_dim for m, enc in self.encoders.items()}
        self.necks = nn.ModuleList()
        for plugin in plugins:
            neck = plugin.build_neck(dims, num_classes)
            self.necks.append(neck)
            dims = dict(neck.out_dims)
        self.feature_dims = dims  # of what `encode` gives the fusion
        if config.fusion is None:
            raise ValueError("model.fusion is unset (a recipe sets it to the method's own fusion)")
        self.fusion = build_fusion(config.fusion, dims, num_classes)
        self.decomposable = config.fusion.decomposable
        self.additive = config.fusion.additive
        if config.init == "xavier":
            loaded = [
                m
                for m in self.modalities
                if getattr(config.encoders.get(m, config.encoder), "pretrained", None) is not None
            ]
            kept = {id(module) for m in loaded for module in self.encoders[m].modules()}
            for module in self.modules():
                if id(module) not in kept:
                    xavier_init(module)

    def encode(
        self, inputs: dict[str, torch.Tensor], necks: int | None = None
    ) -> dict[str, torch.Tensor]:
        """The features the fusion head reads: through the plug-ins' necks, or only the first
        `necks` of them (what a neck reads)."""
        if self.mid_fusion is not None:
            features = self.mid_fusion.encode(self.encoders, inputs)
        else:
            features = {m: self.encoders[m](inputs[m]) for m in self.modalities}
        for neck in self.necks[:necks]:
            features = neck(features)
        return features

    def fuse(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """The fusion head's logits; on per-segment features [B, T, D] (temporal encoders) the
        head is applied to every segment alike, giving [B, T, C]."""
        return _per_position(self.fusion, features)

    def unimodal_logits(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each modality's share of the fused logits (decomposable fusions), per segment as
        `fuse`."""
        return _per_position(self.fusion.unimodal_logits, features)

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
        unimodal = self.unimodal_logits(features) if self.decomposable else None
        return ModelOutput(self.fuse(features), features, unimodal)


def _per_position(head: Any, features: dict[str, torch.Tensor]) -> Any:
    """`head` on features [B, D]; on [B, T, D] on the B x T positions, reshaped back."""
    first = next(iter(features.values()))
    if first.dim() != 3:
        return head(features)
    b, t = first.shape[:2]
    out = head({m: x.flatten(0, 1) for m, x in features.items()})
    if isinstance(out, dict):
        return {m: z.unflatten(0, (b, t)) for m, z in out.items()}
    return out.unflatten(0, (b, t))


def xavier_init(module: nn.Module) -> None:
    """`model.init: xavier` on one module: the `weight_init` of the official OGM-GE, PMR and MLA
    codes (`utils/utils.py`, applied by `model.apply(weight_init)` after the model is built;
    GeWu-Lab/OGM-GE_CVPR2022 343dc1d95c9bda88f105c0da8d24f185e0e98b54,
    fanyunfeng-bit/Modal-Imbalance-PMR 3615e48983555089b0e693380087617c3797a641,
    Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation
    ab6c184579f9ff390e9c9b8216c9900c2a43545b). AGM's (lihong2303/AGM_ICCV2023
    `utils/function_tools.py`) draws the Conv2d weights kaiming-uniform instead, with the same
    variance. Their BatchNorm2d weight 1 and bias 0 are PyTorch's own."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_normal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


def build_model(
    config: ModelConfig,
    specs: list[ModalitySpec],
    out_dim: int,
    plugins: Sequence[NeckSource] = (),
    *,
    task: str = "classification",
) -> nn.Module:
    """The model of `config` predicting `out_dim` values per position (classes, or 1 for a
    score) for `task`: for segmentation the 3-D U-Net, Tian et al.'s model where `ave_att` is
    set, MMBT where `mmbt` is, else encoders and a fusion head."""
    if config.ave_att is not None:
        if task != "localisation":
            raise UserError(
                f"model.ave_att is a localisation model (a class per segment); the task is {task}."
            )
        if plugins:
            raise UserError("plug-ins act on per-modality feature vectors; model.ave_att has none.")
        return AVAttModel(config.ave_att, specs, out_dim)
    if config.mmbt is not None:
        if task != "classification":
            raise UserError(f"model.mmbt is a classification model; the task is {task}.")
        if plugins:
            raise UserError("plug-ins act on per-modality feature vectors; model.mmbt has none.")
        return MMBTModel(config.mmbt, specs, out_dim)
    if task == "segmentation":
        if plugins:
            raise UserError("plug-ins act on per-modality feature vectors; the 3-D U-Net has none.")
        return UNet3D(config.unet or UNet3DConfig(), [s.name for s in specs], out_dim)
    return MultimodalModel(config, specs, out_dim, plugins)
