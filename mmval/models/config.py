"""The recipe's `model:` section: `ModelConfig` and the configs of its parts (encoders, MMTM,
the 3-D U-Net, Tian et al.'s attention model, MMBT), apart from the modules they build, so that
reading and checking a recipe does not import torch. Each part's module (`mmval.models.encoders`,
`image_encoders`, `hf`, `mmtm`, `unet3d`, `ave_att`, `mmbt`) names the official code its
settings follow, and imports its config from here."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    Tag,
    create_model,
    model_validator,
)

from mmval.models.fusions import FUSIONS, FusionConfig, FusionField
from mmval.registry import tag_of
from mmval.settings import ADDED_LATER

Triple = tuple[float, float, float]


class ImageStats(BaseModel):
    """Per-channel RGB statistics that images (scaled to [0, 1]) are normalised with."""

    model_config = ConfigDict(extra="forbid")
    mean: Triple = Field(description="R, G, B means")
    std: tuple[
        Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]
    ] = Field(description="R, G, B standard deviations")


Normalize = Literal["imagenet", "mmbt"] | ImageStats


_NORMALIZE_DESCRIPTION = (
    "RGB normalisation: `imagenet` (the statistics torchvision's weights were trained with), "
    "`mmbt` (QMF's image-text transforms, MMBT's statistics) or `{mean: [...], std: [...]}`"
)


_PRETRAINED_DESCRIPTION = (
    "local torchvision state dict of the whole network (e.g. resnet152-394f9c45.pth from "
    "torchvision's model zoo, fetched by the user: never downloaded); conv1 is averaged over "
    "its input channels when the modality has other than 3"
)


class ResNetEncoderConfig(BaseModel):
    """torchvision ResNet trunk (conv1 to layer4) for frames [K, H, W, C] and spectrograms
    [T, F]: frames go through the 2D network one by one, their maps are pooled into `embeds`
    embeddings, flattened, and averaged over frames."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["resnet"] = "resnet"
    depth: Literal[18, 34, 50, 101, 152] = Field(
        description="torchvision resnet<depth>; features 512 (18, 34) or 2048 (50, 101, 152) "
        "per embedding"
    )
    pretrained: Path | None = Field(default=None, description=_PRETRAINED_DESCRIPTION)
    embeds: int = Field(
        default=1,
        ge=1,
        le=9,
        description="QMF's num_image_embeds: the map pooled to N regions (grid (N, 1) for 1, 2, "
        "3, 5, 7; (2, 2), (3, 2), (4, 2), (3, 3) for 4, 6, 8, 9), flattened to N * channels "
        "features; 1 is the global pool",
    )
    embed_pool: Literal["avg", "max"] = Field(
        default="avg", description="QMF's img_embed_pool_type: adaptive average or max pooling"
    )
    normalize: Normalize = Field(default="imagenet", description=_NORMALIZE_DESCRIPTION)


class ViTEncoderConfig(BaseModel):
    """torchvision ViT-B/16 on RGB frames [K, H, W, 3] (square, side a multiple of 16): the
    class token after the last LayerNorm (torchvision's `VisionTransformer.forward` before
    `heads`), averaged over frames."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["vit"] = "vit"
    arch: Literal["vit_b_16"] = Field(default="vit_b_16", description="torchvision builder")
    pretrained: Path | None = Field(
        default=None,
        description="local torchvision state dict (e.g. vit_b_16-c867db91.pth, made for 224 x "
        "224 images: its position embeddings fix the image size); never downloaded",
    )
    normalize: Normalize = Field(default="imagenet", description=_NORMALIZE_DESCRIPTION)


class HFEncoderConfig(BaseModel):
    """A pretrained Hugging Face text model read from a local folder."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["hf"] = "hf"
    path: Path = Field(
        description="local folder with config.json and model.safetensors (or "
        "pytorch_model.bin), e.g. a bert-base-uncased download; never downloaded. Prepare the "
        "text with the same folder's tokenizer (text.tokenizer: {kind: hf, path: ...})"
    )
    pooling: Literal["pooler", "cls", "mean"] = Field(
        default="pooler",
        description="pooler: BERT's tanh(dense(h_CLS)) (QMF's, MMBT's); cls: the raw last "
        "hidden state of [CLS]; mean: over the non-padding tokens",
    )

    @property
    def pretrained(self) -> Path:
        """The weights come from `path`: `model.init: xavier` leaves them as loaded."""
        return self.path


class MLPEncoderConfig(BaseModel):
    """An MLP for vector inputs (features, multi-view descriptors)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["mlp"] = "mlp"
    hidden: list[Annotated[int, Field(ge=1)]] = Field(
        default=[256], description="hidden layer sizes"
    )
    out_dim: int = Field(default=128, ge=1, description="size of the feature h_m")
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)


class ResNet18EncoderConfig(BaseModel):
    """torchvision ResNet-18 trunk: 1 input channel for spectrograms, 3 for RGB frames, 2 for
    optical flow; frames go through the 2D network one by one, then are pooled over time."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["resnet18"] = "resnet18"
    pretrained: Path | None = Field(
        default=None,
        description="local torchvision resnet18 state dict (never downloaded); conv1 is "
        "averaged over its input channels when the modality has other than 3",
    )


class EmbeddingBagEncoderConfig(BaseModel):
    """Mean of the word embeddings of a text (padding ignored): the bag-of-words baseline."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["embedding_bag"] = "embedding_bag"
    dim: int = Field(default=300, ge=1, description="embedding size (300 as GloVe)")
    out_dim: int = Field(default=128, ge=1)
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    pretrained: Path | None = Field(
        default=None, description="local state dict of this encoder (e.g. converted GloVe)"
    )


class TransformerEncoderConfig(BaseModel):
    """A small pre-norm Transformer over token ids or feature sequences, mean-pooled over the
    non-padding positions."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["transformer"] = "transformer"
    d_model: int = Field(default=128, ge=8)
    heads: int = Field(default=4, ge=1)
    layers: int = Field(default=2, ge=1)
    ff_mult: int = Field(default=4, ge=1, description="feed-forward width / d_model")
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    pretrained: Path | None = Field(default=None, description="local state dict of this encoder")


class SegmentLSTMEncoderConfig(BaseModel):
    """Per-segment features [T, ..., D] (AVE's [10, 128] VGGish audio, [10, 7, 7, 512] VGG-19
    maps) to per-segment features [T, 2 * hidden]: the grid of a map averaged [ours: Tian et
    al. attend over it guided by the audio], then a bidirectional LSTM over the segments with
    zero initial states, as Tian et al.'s baseline models each stream (YapengTian/AVE-ECCV18
    93f843fed72fb17394df76330df958b0c2dbde76, `models.py` 16-17, 62-71: hidden 128 per
    direction). The fusion head is then applied to every segment (localisation)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["segment_lstm"] = "segment_lstm"
    hidden: int = Field(default=128, ge=1, description="LSTM size per direction (official 128)")


class PythonEncoderConfig(BaseModel):
    """An encoder class of the user's own, imported by path when the model is built: training,
    evaluating or valuing such a model runs that code (a checkpoint of one is loaded by `mmval
    value` only with --trust-code)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["python"] = "python"
    target: str = Field(
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$",
        description="`package.module:Class`, importable (installed, or on PYTHONPATH); "
        "called as Class(spec, **kwargs) with the modality's ModalitySpec (name, shape, "
        "dtype, ...), it must be a torch Module with an int `out_dim` (the feature size)",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of the class"
    )


EncoderConfigType = (
    MLPEncoderConfig
    | ResNet18EncoderConfig
    | ResNetEncoderConfig
    | ViTEncoderConfig
    | EmbeddingBagEncoderConfig
    | TransformerEncoderConfig
    | SegmentLSTMEncoderConfig
    | PythonEncoderConfig
    | HFEncoderConfig
)


def _encoder_kind(value: Any) -> str:
    kind = value.get("kind", "mlp") if isinstance(value, dict) else getattr(value, "kind", "mlp")
    return str(kind)


EncoderConfig = Annotated[
    Annotated[MLPEncoderConfig, Tag("mlp")]
    | Annotated[ResNet18EncoderConfig, Tag("resnet18")]
    | Annotated[ResNetEncoderConfig, Tag("resnet")]
    | Annotated[ViTEncoderConfig, Tag("vit")]
    | Annotated[EmbeddingBagEncoderConfig, Tag("embedding_bag")]
    | Annotated[TransformerEncoderConfig, Tag("transformer")]
    | Annotated[SegmentLSTMEncoderConfig, Tag("segment_lstm")]
    | Annotated[PythonEncoderConfig, Tag("python")]
    | Annotated[HFEncoderConfig, Tag("hf")],
    Discriminator(_encoder_kind),
]


class MMTMConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stages: list[int] = Field(
        default=[2, 3, 4],
        min_length=1,
        description="1-based encoder stages followed by an MMTM block (Greedy official: 2, 3, 4 "
        "of ResNet-18; an mlp encoder has one stage per hidden layer plus its output layer)",
    )
    ratio: float = Field(
        default=4.0, gt=0, description="squeeze width = 2 * sum of channels / ratio"
    )


class UNet3DConfig(BaseModel):
    """Sizes and the missing-sequence handling of `UNet3D`."""

    model_config = ConfigDict(extra="forbid")
    base: int = Field(
        default=8,
        ge=1,
        description="channels of the first level, doubled at every level below "
        "(mmFormer `basic_dims` 8)",
    )
    levels: int = Field(
        default=4,
        ge=2,
        description="resolution levels, each below the first halving the size by a stride-2 "
        "conv (mmFormer has 5); D, H and W must be multiples of 2**(levels-1), the bottleneck at "
        "least 2 voxels a side",
    )
    fill: Literal["zero", "mean"] = Field(
        default="zero",
        description="what replaces an absent sequence's features, at every level: `zero` = "
        "mmFormer's MaskModal (zeros at every level); `mean` = the mean of the present "
        "sequences' features at that level (LCKD does this at the bottleneck only and keeps its "
        "skip features from the zeroed input; at the skip levels it is ours); with no sequence "
        "present both give zeros",
    )
    shared_encoder: bool = Field(
        default=False,
        description="one encoder run on every sequence as a 1-channel volume (LCKD) instead of "
        "one encoder per sequence (mmFormer)",
    )
    dropout: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="channel dropout (Dropout3d) on the fused bottleneck [ours: neither paper "
        "has one]",
    )


class AVAttConfig(BaseModel):
    """Sizes of Tian et al.'s `att_Net` (`supervised_main.py` line 59, `models.py` 13-27)."""

    model_config = ConfigDict(extra="forbid")
    hidden_dim: int = Field(
        default=128,
        ge=1,
        description="hidden units per direction of the audio and the visual BiLSTM "
        "(att_Net(..., hidden_dim=128, ...), models.py 16-17)",
    )
    hidden_size: int = Field(
        default=512,
        ge=1,
        description="width of the attention's audio and visual projections (affine_audio, "
        "affine_video; hidden_size=512, models.py 20-21)",
    )
    fusion_hidden: int = Field(
        default=64,
        ge=1,
        description="units of the first layer of the per-segment classifier (L1, models.py 26)",
    )


class MMBTConfig(BaseModel):
    """QMF's MMBT: its shell scripts' settings are the defaults (`--num_image_embeds 3`, the
    default `--img_embed_pool_type avg`, ResNet-152)."""

    model_config = ConfigDict(extra="forbid")
    bert: Path = Field(
        description="local Hugging Face BERT folder (config.json, model.safetensors or "
        "pytorch_model.bin, vocab.txt or tokenizer.json); the text must be prepared with its "
        "tokenizer, `sep: false`"
    )
    depth: Literal[18, 34, 50, 101, 152] = Field(
        default=152, description="ResNet depth of the image encoder (QMF: 152)"
    )
    pretrained: Path | None = Field(
        default=None,
        description="local torchvision state dict of that whole ResNet (QMF: ImageNet's "
        "resnet152); unset, random init. Never downloaded",
    )
    embeds: int = Field(
        default=3, ge=1, le=9, description="image embeddings N (QMF's num_image_embeds)"
    )
    pool: Literal["avg", "max"] = Field(
        default="avg", description="pooling to the N embeddings (QMF's img_embed_pool_type)"
    )
    normalize: Literal["qmf", "imagenet"] = Field(
        default="qmf",
        description="image statistics: QMF's (helpers.py 30-33) or ImageNet's",
    )


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
