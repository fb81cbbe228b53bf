"""The model every method trains: encoders by modality name, then a fusion head."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Annotated, Any, Literal

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    create_model,
    model_validator,
)
from torch import nn

from mmval.data.shards import ModalitySpec
from mmval.errors import UserError
from mmval.models.ave_att import AVAttConfig, AVAttModel
from mmval.models.encoders import EncoderConfig, MLPEncoderConfig, build_encoder
from mmval.models.fusions import FUSIONS, FusionConfig, FusionField, build_fusion
from mmval.models.mmbt import MMBTConfig, MMBTModel
from mmval.models.mmtm import MMTMConfig, MMTMFusion
from mmval.models.neck import NeckSource
from mmval.models.output import ModelOutput
from mmval.models.unet3d import UNet3D, UNet3DConfig
from mmval.registry import tag_of
from mmval.settings import ADDED_LATER

InitName = Literal["default", "xavier"]


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    encoder: EncoderConfig = Field(default_factory=MLPEncoderConfig, description="default encoder")
    encoders: dict[str, EncoderConfig] = Field(
        default_factory=dict, description="per-modality encoders, overriding `encoder`"
    )
    fusion: FusionField | None = Field(
        default=None,
        description="the fusion head: a name (`concat`) or a mapping of `name` and the fusion's "
        "own settings (`{name: cosine, scale: 15}`); unset, the method's own fusion",
    )
    mmtm: MMTMConfig | None = Field(
        default=None,
        description="mid-fusion: MMTM blocks between encoder stages (Greedy's model); "
        "resnet18, resnet or mlp encoders",
    )
    unet: Annotated[UNet3DConfig | None, ADDED_LATER] = Field(
        default=None,
        description="the 3-D U-Net of the segmentation task (one encoder per MRI sequence, "
        "fused skips, one decoder); unset, its defaults. encoder, encoders and fusion do not "
        "apply to it",
    )
    ave_att: Annotated[AVAttConfig | None, ADDED_LATER] = Field(
        default=None,
        description="Tian et al.'s supervised AVE localisation model (audio-guided visual "
        "attention, BiLSTMs, per-segment classifier; localisation task only); set (`{}` for "
        "the official sizes), it replaces the encoders and the fusion head: encoder, encoders, "
        "fusion and init do not apply to it",
    )
    mmbt: Annotated[MMBTConfig | None, ADDED_LATER] = Field(
        default=None,
        description="MMBT as QMF runs it (image embeddings of a ResNet entered into a local "
        "Hugging Face BERT as tokens, classifier on BERT's pooled output; image + text "
        "classification, method concat); set, it replaces the encoders and the fusion head: "
        "encoder, encoders, fusion and init do not apply to it",
    )
    init: Annotated[InitName, ADDED_LATER] = Field(
        default="default",
        description="parameter initialisation: `default` is PyTorch's (torchvision's for "
        "resnet18); `xavier` is the `weight_init` that the official OGM-GE, PMR, MLA and AGM "
        "codes apply to the whole model: every Linear (encoders, fusion head, MMTM blocks, "
        "plug-in necks) xavier-normal with zero bias, every Conv2d kaiming-normal (fan_out, "
        "relu); BatchNorm keeps 1 and 0 as there; encoders with `pretrained` weights are left "
        "as loaded",
    )
    # old flat `fusion_*` settings, not at their defaults, that the chosen fusion does not have
    _stray_flat: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _nest_flat_fields(cls, data: Any, handler: ModelWrapValidatorHandler[ModelConfig]) -> Any:
        """Recipes, checkpoints and summaries written before fusions had their own configs give
        `fusion: <name>` with flat `fusion_<x>` fields (all of them, in dumps): those of the
        chosen fusion move into it, the others are dropped at their defaults and otherwise kept
        aside for `flat_problems`."""
        owners = _flat_owners()
        known = owners.keys() | RETIRED_FLAT.keys()
        if not isinstance(data, dict) or not known & data.keys():
            return handler(data)
        flat = {key: value for key, value in data.items() if key in known}
        rest = {key: value for key, value in data.items() if key not in known}
        fusion = rest.get("fusion")
        name = fusion.get("name") if isinstance(fusion, dict) else fusion
        config = FUSIONS.get(name) if isinstance(name, str) else None
        own = {k: v for k, v in flat.items() if k in owners and owners[k][0] is config}
        if config is not None and own:
            checked = _flat_model(config).model_validate(own)  # errors name model.fusion_<x>
            nested = dict(fusion) if isinstance(fusion, dict) else {"name": name}
            for key in own:  # over a mapping's (the method's default settings, say)
                nested[config.flat_fields[key]] = getattr(checked, key)
            rest["fusion"] = nested
        model = handler(rest)
        model._stray_flat = {
            key: value
            for key, value in flat.items()
            if key not in own and value != _old_default(key, owners)
        }
        return model

    def whole_model(self) -> tuple[str, str] | None:
        """The model option that replaces the encoders and the fusion head, if one is set: its
        field, and why no method but plain training can read it (the 3-D U-Net is not one:
        segmentation methods read its per-sequence features)."""
        if self.ave_att is not None:
            return (
                "ave_att",
                "Tian et al.'s attention model mixes the streams before its classifier",
            )
        if self.mmbt is not None:
            return "mmbt", "MMBT mixes image and text inside BERT"
        return None

    def flat_problems(self) -> list[tuple[str, str]]:
        """Recipe problems: old flat fusion settings that the chosen fusion does not have."""
        found = []
        chosen = self.fusion.name if self.fusion is not None else "unset"
        for key in self._stray_flat:
            if key in RETIRED_FLAT:
                found.append(
                    (
                        f"model.{key}",
                        "a setting of the imml fusion, which is now the imml plug-in: "
                        "plugins: [{name: imml, "
                        f"{key.removeprefix('fusion_')}: ...}}]",
                    )
                )
                continue
            owner, field = _flat_owners()[key]
            found.append(
                (
                    f"model.{key}",
                    f"a setting of the {tag_of(owner)} fusion only, and model.fusion is "
                    f"{chosen}: leave it out, or set model.fusion: "
                    f"{{name: {tag_of(owner)}, {field}: ...}}",
                )
            )
        return found


# flat settings of fusions that are gone (the imml fusion became the imml plug-in), with the
# defaults every old dump carries; a dump at those values still loads
RETIRED_FLAT: dict[str, Any] = {"fusion_predominant": None, "fusion_bank_size": 4096}


def _flat_owners() -> dict[str, tuple[type[FusionConfig], str]]:
    """Old flat field -> (the fusion it belongs to, its field there), over the registry."""
    return {
        key: (config, field)
        for config in FUSIONS.values()
        for key, field in config.flat_fields.items()
    }


def _default(config: type[FusionConfig], field: str) -> Any:
    return config.model_fields[field].get_default(call_default_factory=True)


def _old_default(key: str, owners: dict[str, tuple[type[FusionConfig], str]]) -> Any:
    """The value every old dump holds for a flat field (a retired one's, or its fusion's)."""
    return RETIRED_FLAT[key] if key in RETIRED_FLAT else _default(*owners[key])


@cache
def _flat_model(config: type[FusionConfig]) -> type[BaseModel]:
    """A fusion's settings under their old flat names, to validate them where a recipe set them."""
    fields: Any = {
        key: (config.model_fields[field].annotation, config.model_fields[field])
        for key, field in config.flat_fields.items()
    }
    return create_model(f"Flat{config.__name__}", **fields)


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
