"""Per-modality encoders: each maps one modality's input to a feature vector h_m.

`mlp` for vectors (features, multi-view descriptors); `resnet18` (torchvision, random init or a
local weights file) for spectrograms [T, F], frame stacks [K, H, W, 3] and optical flow
[K, H, W, 2], pooled over time and space as the OGM-GE code does; `embedding_bag` and
`transformer` for token ids [L] (text), the transformer also for feature sequences [T, D]
(CMU-MOSEI); `hf` a pretrained Hugging Face text model from a local folder (mmval.models.hf).
Encoders get the modality's spec: text encoders size their embedding from it.
`python` imports an encoder class of the user's own (`package.module:Class`): the recipe then
runs the user's code, and a checkpoint of such a model loads for valuation only when trusted.
"""

from __future__ import annotations

import importlib
import itertools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, ClassVar

import torch
import torchvision
from torch import nn

from mmval.artifacts.checkpoint import read_torch_file
from mmval.data.shards import ModalitySpec
from mmval.errors import UserError
from mmval.models.config import (
    EmbeddingBagEncoderConfig,
    EncoderConfigType,
    MLPEncoderConfig,
    PythonEncoderConfig,
    ResNet18EncoderConfig,
    SegmentLSTMEncoderConfig,
    TransformerEncoderConfig,
)
from mmval.models.hf import HFEncoderConfig, HFTextEncoder
from mmval.models.image_encoders import (
    ResNetEncoder,
    ResNetEncoderConfig,
    ViTEncoder,
    ViTEncoderConfig,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SegmentLSTMEncoder(nn.Module):
    def __init__(self, in_shape: list[int], config: SegmentLSTMEncoderConfig) -> None:
        super().__init__()
        if len(in_shape) < 2:
            raise UserError(
                f"the segment_lstm encoder reads per-segment features [T, ..., D]; this "
                f"modality's items are {in_shape}."
            )
        self.lstm = nn.LSTM(in_shape[-1], config.hidden, batch_first=True, bidirectional=True)
        self.out_dim = 2 * config.hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.dim() > 3:  # [B, T, *grid, D]: the mean over the grid
            x = x.flatten(2, -2).mean(2)
        out, _ = self.lstm(x)  # zero initial states
        return out


class MLPEncoder(nn.Module):
    def __init__(self, in_shape: list[int], config: MLPEncoderConfig) -> None:
        super().__init__()
        sizes = [math.prod(in_shape), *config.hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for size_in, size_out in itertools.pairwise(sizes):
            layers += [nn.Linear(size_in, size_out), nn.ReLU(), nn.Dropout(config.dropout)]
        layers += [nn.Linear(sizes[-1], config.out_dim), nn.ReLU()]
        self.net = nn.Sequential(*layers)
        self.out_dim = config.out_dim
        # stages for mid-fusion: each hidden block (Linear, ReLU, Dropout), then the output block
        bounds = [1 + 3 * j for j in range(len(config.hidden) + 1)] + [len(layers)]
        self.stage_slices = list(itertools.pairwise(bounds))
        self.stage_channels = [*config.hidden, config.out_dim]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float())

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().flatten(1)

    def run_stage(self, i: int, t: torch.Tensor) -> torch.Tensor:
        start, stop = self.stage_slices[i]
        return self.net[start:stop](t)

    def squeeze(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        return t

    def excite(self, t: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return t * gate

    def pool(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        return t


class ResNet18Encoder(nn.Module):
    def __init__(self, in_shape: list[int], config: ResNet18EncoderConfig) -> None:
        super().__init__()
        if len(in_shape) == 4:  # frames [K, H, W, C], uint8
            self.frames, channels = True, in_shape[-1]
        elif len(in_shape) == 2:  # spectrogram [T, F]
            self.frames, channels = False, 1
        else:
            raise UserError(
                f"resnet18 takes frames [K, H, W, C] or spectrograms [T, F], not shape {in_shape}."
            )
        net = torchvision.models.resnet18(weights=None)
        if config.pretrained is not None:
            load_state(
                net,
                _load_weights(config.pretrained),
                f"pretrained weights file {config.pretrained}",
                lambda key: key.endswith(".num_batches_tracked"),  # absent from older files
            )
        if channels != 3:
            conv = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            with torch.no_grad():
                conv.weight.copy_(net.conv1.weight.mean(1, keepdim=True).expand_as(conv.weight))
            net.conv1 = conv
        self.trunk = nn.Sequential(*list(net.children())[:-2])  # up to layer4
        self.rgb = channels == 3 and self.frames
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.out_dim = 512

    # Mid-fusion (MMTM) runs the trunk stage by stage: the stem (conv1 to maxpool), then the
    # four residual stages. Maps are [B, C, h, w] for spectrograms and [B*K, C, h, w] for frames.
    stage_channels: ClassVar[list[int]] = [64, 128, 256, 512]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.trunk(self._images(x)), x.shape[0])

    def _images(self, x: torch.Tensor) -> torch.Tensor:
        if not self.frames:
            return x.float().unsqueeze(1)
        images = x.flatten(0, 1).permute(0, 3, 1, 2).float().div(255.0)
        return (images - self.mean) / self.std if self.rgb else images

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk[:4](self._images(x))

    def run_stage(self, i: int, t: torch.Tensor) -> torch.Tensor:
        return self.trunk[4 + i](t)

    def _per_sample(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        """[B, K, C, h, w] view of the maps (K = 1 for spectrograms)."""
        return t.view(batch, -1, *t.shape[1:])

    def squeeze(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        return self._per_sample(t, batch).mean(dim=(1, 3, 4))

    def excite(self, t: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return (self._per_sample(t, gate.shape[0]) * gate[:, None, :, None, None]).view_as(t)

    def pool(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        """Average over frames, height and width, as the OGM-GE code's adaptive_avg_pool3d."""
        return self._per_sample(t, batch).mean(dim=(1, 3, 4))


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A local state dict (or a file whose `state_dict` entry is one), read as checkpoints are:
    its declared size checked before anything is inflated, tensors and plain values only."""
    if not path.is_file():
        raise UserError(f"pretrained weights {path} do not exist (mmval never downloads weights).")
    state = read_torch_file(path, "pretrained weights file")
    if isinstance(state, dict):
        state = state.get("state_dict", state)
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise UserError(
            f"pretrained weights {path} are not a state dict (parameter names to tensors, as "
            f"torch.save(module.state_dict()) writes); it holds a {type(state).__name__}."
        )
    return state


def load_state(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    what: str,
    optional: Callable[[str], bool] | None = None,
) -> None:
    """`module.load_state_dict(state)`, or a UserError naming the missing and unexpected keys
    and the tensors of another shape (torch's own error is a traceback that lists them).
    Keys of the module for which `optional` holds may be absent from `state` (they keep their
    values: a fresh BatchNorm's step counter is 0, as torch fills it for old files)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state and not (optional and optional(k))]
    unexpected = [k for k in state if k not in own]
    reshaped = [
        f"{k} {list(v.shape)} (the encoder's: {list(own[k].shape)})"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    problems = [
        f"{label}: {', '.join(keys[:8])}{f' and {len(keys) - 8} more' if len(keys) > 8 else ''}"
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("of another shape", reshaped),
        )
        if keys
    ]
    if problems:
        raise UserError(
            f"{what} does not fit the {type(module).__name__} this recipe builds "
            f"({'; '.join(problems)}): use the encoder settings the weights were trained with."
        )
    module.load_state_dict(state, strict=optional is None)


def _token_spec(spec: ModalitySpec, kind: str) -> int:
    if spec.encoding != "tokens" or spec.vocab_size is None:
        raise UserError(
            f"the {kind} encoder reads token ids; modality {spec.name!r} holds "
            f"{spec.encoding} data of shape {spec.shape}."
        )
    return spec.vocab_size


class EmbeddingBagEncoder(nn.Module):
    def __init__(self, spec: ModalitySpec, config: EmbeddingBagEncoderConfig) -> None:
        super().__init__()
        vocab = _token_spec(spec, "embedding_bag")
        self.bag = nn.EmbeddingBag(vocab, config.dim, mode="sum", padding_idx=spec.pad_id)
        self.head = nn.Sequential(
            nn.Dropout(config.dropout), nn.Linear(config.dim, config.out_dim), nn.ReLU()
        )
        self.pad_id, self.out_dim = spec.pad_id, config.out_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.long()
        count = (ids != self.pad_id).sum(1, keepdim=True).clamp(min=1)
        return self.head(self.bag(ids) / count)


class TransformerEncoder(nn.Module):
    def __init__(self, spec: ModalitySpec, config: TransformerEncoderConfig) -> None:
        super().__init__()
        if spec.encoding == "tokens":
            vocab = _token_spec(spec, "transformer")
            self.embed: nn.Module = nn.Embedding(vocab, config.d_model, padding_idx=spec.pad_id)
            self.tokens = True
        elif len(spec.shape) == 2:  # feature sequence [T, D]
            self.embed = nn.Linear(spec.shape[1], config.d_model)
            self.tokens = False
        else:
            raise UserError(
                f"the transformer encoder reads token ids or sequences [T, D]; modality "
                f"{spec.name!r} has shape {spec.shape}."
            )
        self.position = nn.Parameter(torch.zeros(1, spec.shape[0], config.d_model))
        nn.init.normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(
            config.d_model,
            config.heads,
            config.ff_mult * config.d_model,
            config.dropout,
            batch_first=True,
            norm_first=True,
        )
        self.layers = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.d_model)
        self.pad_id, self.out_dim = spec.pad_id, config.d_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tokens:
            x = x.long()
            keep = x != self.pad_id
            keep[:, 0] |= ~keep.any(1)  # an empty text still attends to one position
            h = self.embed(x)
        else:
            h = self.embed(x.float())
            keep = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        h = self.layers(h + self.position, src_key_padding_mask=~keep)
        weights = keep.unsqueeze(-1).to(h.dtype)
        return self.norm((h * weights).sum(1) / weights.sum(1))


# whether checkpoints loaded now may import the python encoders their recipes name
_TRUSTED_CODE: ContextVar[bool] = ContextVar("mmval_trusted_code", default=False)


@contextmanager
def trusting_code(trusted: bool = True) -> Iterator[None]:
    """Inside, `refuse_untrusted_code` lets checkpoints with python encoders load (`mmval value
    --trust-code`); a context, so that the trust ends with the command that was given it."""
    token = _TRUSTED_CODE.set(trusted)
    try:
        yield
    finally:
        _TRUSTED_CODE.reset(token)


def python_targets(model: Any) -> list[str]:
    """The import paths of the python encoders in a recipe's `model:` section (a plain dict,
    as a checkpoint stores it: read without validating or importing anything)."""
    if not isinstance(model, dict):
        return []
    encoders = [model.get("encoder"), *(model.get("encoders") or {}).values()]
    return sorted(
        {
            str(e.get("target"))
            for e in encoders
            if isinstance(e, dict) and e.get("kind") == "python"
        }
    )


def refuse_untrusted_code(model: Any, checkpoint: Path) -> None:
    """Loading a checkpoint whose model has python encoders imports and runs their code: refused
    unless the user trusts it (`trusting_code`)."""
    targets = python_targets(model)
    if targets and not _TRUSTED_CODE.get():
        raise UserError(
            f"{checkpoint} was trained with a python encoder ({', '.join(targets)}): loading it "
            "imports and runs that code. Pass --trust-code if you trust it."
        )


def _python_encoder(spec: ModalitySpec, config: PythonEncoderConfig) -> nn.Module:
    """`Class(spec, **kwargs)` of `config.target`, checked to be a Module with an `out_dim`."""
    where = f"model.encoder {config.target!r}"
    module_name, _, attr = config.target.partition(":")
    try:
        found: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(
            f"{where}: cannot import {module_name} ({exc}); install it or put its folder on "
            "PYTHONPATH."
        ) from None
    for part in attr.split("."):
        found = getattr(found, part, None)
        if found is None:
            raise UserError(f"{where}: {module_name} has no {attr}.")
    try:
        encoder = found(spec, **config.kwargs)
    except TypeError as exc:
        raise UserError(
            f"{where}: calling it with the modality spec and kwargs {config.kwargs} failed: {exc}"
        ) from None
    out_dim = getattr(encoder, "out_dim", None)
    if not isinstance(encoder, nn.Module) or not isinstance(out_dim, int) or out_dim < 1:
        raise UserError(
            f"{where}: built a {type(encoder).__name__}; an encoder must be a torch.nn.Module "
            f"with an int out_dim >= 1 (the size of its feature), not {out_dim!r}."
        )
    return encoder


def build_encoder(spec: ModalitySpec, config: EncoderConfigType) -> nn.Module:
    if isinstance(config, PythonEncoderConfig):
        return _python_encoder(spec, config)
    if isinstance(config, ResNet18EncoderConfig):
        return ResNet18Encoder(spec.shape, config)
    if isinstance(config, ResNetEncoderConfig):
        return ResNetEncoder(spec.shape, config)
    if isinstance(config, ViTEncoderConfig):
        return ViTEncoder(spec.shape, config)
    if isinstance(config, MLPEncoderConfig):
        return MLPEncoder(spec.shape, config)
    if isinstance(config, SegmentLSTMEncoderConfig):
        return SegmentLSTMEncoder(spec.shape, config)
    if isinstance(config, HFEncoderConfig):
        return HFTextEncoder(spec, config)
    encoder: nn.Module
    if isinstance(config, EmbeddingBagEncoderConfig):
        encoder = EmbeddingBagEncoder(spec, config)
    else:
        encoder = TransformerEncoder(spec, config)
    if config.pretrained is not None:
        load_state(
            encoder,
            _load_weights(config.pretrained),
            f"pretrained weights file {config.pretrained}",
        )
    return encoder
