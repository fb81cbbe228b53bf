"""Logits of a batch under many modality subsets: masking, and the three ways to evaluate them.

A subset is a boolean row over the M modalities; `keep` holds K of them per sample, [K, B, M]
(or [K, M] shared by the batch). A removed modality is replaced by what `--mask` says:
- `feature`: its encoder output is zeroed before the fusion head (the official valuation code);
- `input`: its raw input is zeroed (token ids become padding: an empty text);
- `mean`: its raw input is the training-split mean.

Paths (all give the same logits up to float rounding):
- `late` (MultimodalModel, whose encoders each see one modality; with MMTM mid-fusion, only for
  feature masking): every encoder runs once per batch; the replacement's encoding is computed
  once per pass, since in eval mode the encoding of a fixed input is the same for every
  sample; then all subsets go through the fusion head in one batched call, or, for additive
  heads, are sums of per-modality logits. The cost is about
  one forward pass plus K cheap head evaluations.
- `joint` (any other model taking a dict of inputs): the K masked copies of the batch go
  through the model in one forward of K x B samples.
- `naive`: one full forward per subset; the reference in tests and the benchmark.
Calls are cut into chunks of subsets so that one call holds at most MAX_ELEMENTS values.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Literal

from mmval.data.shards import ModalitySpec
from mmval.errors import UserError
from mmval.lazy import lazy_module, no_grad
from mmval.models import ModelOutput
from mmval.valuation.config import MaskName

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mmval.data.dataset import ParquetSamples
    from mmval.models import MultimodalModel
    from mmval.models.unet3d import UNet3D
else:
    torch = lazy_module("torch")

EvalPath = Literal["auto", "late", "joint", "naive"]
MAX_ELEMENTS = 2**24  # values per batched call (64 MiB of float32)


def subset_masks(m: int) -> torch.Tensor:
    """[2^M, M] booleans; row s has bit j of s set where modality j is in the subset."""
    codes = torch.arange(2**m)
    return (codes[:, None] >> torch.arange(m)[None, :]) & 1 == 1


@no_grad
def training_mean(dataset: ParquetSamples, batch_size: int = 512) -> dict[str, torch.Tensor]:
    """Per-modality mean input over a split (float64 sums, float32 result). Read without a
    DataLoader, which would draw from the global RNG and so change a training run."""
    sums = {s.name: torch.zeros(s.shape, dtype=torch.float64) for s in dataset.specs}
    for start in range(0, len(dataset), batch_size):
        batch = dataset.__getitems__(range(start, min(start + batch_size, len(dataset))))
        for name, x in batch.inputs.items():
            sums[name] += x.to(torch.float64).sum(0)
    return {name: (total / max(len(dataset), 1)).float() for name, total in sums.items()}


def mask_fills(
    mask: MaskName, specs: list[ModalitySpec], train: ParquetSamples | None = None
) -> dict[str, torch.Tensor] | None:
    """The input that stands in for a removed modality (None for feature masking); `mean`
    reads the training split once."""
    if mask == "feature":
        return None
    if mask == "input":
        return {
            s.name: torch.full(
                s.shape, s.pad_id if s.encoding == "tokens" else 0, dtype=getattr(torch, s.dtype)
            )
            for s in specs
        }
    tokens = [s.name for s in specs if s.encoding == "tokens"]
    if tokens:
        raise UserError(
            f"--mask mean averages inputs, which means nothing for token ids (modalities "
            f"{', '.join(tokens)}); use --mask input (an empty text) or --mask feature."
        )
    if train is None or len(train) == 0:
        raise UserError("--mask mean needs the training split, which is missing or empty.")
    return training_mean(train)


def _logits(out: ModelOutput | torch.Tensor) -> torch.Tensor:
    return out.logits if isinstance(out, ModelOutput) else out


def _where(keep: torch.Tensor, present: torch.Tensor, absent: torch.Tensor) -> torch.Tensor:
    """`present` [B, *shape] where keep [K, B] is set, else `absent` [*shape] or [1, *shape]."""
    extra = [1] * (present.dim() - 1)
    return torch.where(keep.reshape(*keep.shape, *extra), present[None], absent)


class SubsetEvaluator(ABC):
    """Evaluates one batch under chunks of subsets; `prepare` does the per-batch work once."""

    modalities: list[str]

    def prepare(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return inputs

    def chunk_size(self, prepared: dict[str, torch.Tensor]) -> int:
        """Subsets per call: one subset costs one copy of the prepared batch."""
        per_subset = sum(x.numel() for x in prepared.values())
        return max(1, MAX_ELEMENTS // max(per_subset, 1))

    @abstractmethod
    def logits(self, prepared: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
        """Logits [K, B, C] for keep [K, B, M]."""


class LateFusionEvaluator(SubsetEvaluator):
    """Encoders once per batch. An additive head (concat, sum, weighted, cosine: the fused
    logits are the sum of each modality's share) needs no head call at all: a subset's logits
    are the removed modalities' replacement shares plus, for each present one, its gain over
    its replacement, one batched matrix product of the 0/1 subset rows with the gains. Other
    heads (film, gated, late) get all subsets in one batched call."""

    def __init__(
        self,
        model: MultimodalModel,
        modalities: list[str],
        fills: dict[str, torch.Tensor] | None,
        device: torch.device,
    ) -> None:
        self.model, self.modalities = model, modalities
        self.additive = model.additive
        if fills is None:
            absent = {m: torch.zeros(1, model.feature_dims[m], device=device) for m in modalities}
        else:  # encoded once: in eval mode the same for every sample
            absent = {m: model.encoders[m](fills[m][None].to(device)) for m in modalities}
        self.absent = model.unimodal_logits(absent) if self.additive else absent

    def prepare(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        features = self.model.encode(inputs)
        if not self.additive:
            return features
        shares = self.model.unimodal_logits(features)  # [B, *shape] each ([B, C], [B, T, C])
        shape = shares[self.modalities[0]].shape[1:]
        absent = torch.stack(
            [torch.broadcast_to(self.absent[m], (1, *shape))[0] for m in self.modalities]
        )  # [M, *shape]
        present = torch.stack([shares[m] for m in self.modalities], 1)  # [B, M, *shape]
        return {"gains": present - absent, "all_absent": absent.sum(0)}

    def logits(self, prepared: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
        k, b = keep.shape[:2]
        if self.additive:
            # every modality removed, plus each kept one's gain over its removal: one batched
            # matrix product. A modality the model ignores has a gain of exactly 0, so adding
            # it changes no logit by a single bit (its Shapley value is exactly 0).
            baseline = prepared["all_absent"]
            weights = keep.to(baseline.dtype).transpose(0, 1)  # [B, K, M]
            flat = prepared["gains"].flatten(2)  # [B, M, prod(shape)]
            logits = torch.baddbmm(baseline.flatten(), weights, flat)  # [B, K, prod(shape)]
            return logits.transpose(0, 1).unflatten(2, baseline.shape)
        parts = {
            m: _where(keep[..., j], prepared[m], self.absent[m])
            for j, m in enumerate(self.modalities)
        }
        fused = self.model.fuse({m: x.flatten(0, 1) for m, x in parts.items()})
        return fused.unflatten(0, (k, b))


class JointEvaluator(SubsetEvaluator):
    def __init__(
        self,
        model: nn.Module,
        modalities: list[str],
        fills: dict[str, torch.Tensor],
        device: torch.device,
    ) -> None:
        self.model, self.modalities = model, modalities
        self.fills = {m: fills[m].to(device) for m in modalities}

    def masked_inputs(
        self, inputs: dict[str, torch.Tensor], keep: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Inputs [K * B, ...] with removed modalities replaced by their fill."""
        return {
            m: _where(keep[..., j], inputs[m], self.fills[m]).flatten(0, 1)
            for j, m in enumerate(self.modalities)
        }

    def logits(self, prepared: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
        k, b = keep.shape[:2]
        return _logits(self.model(self.masked_inputs(prepared, keep))).unflatten(0, (k, b))


class PresenceEvaluator(SubsetEvaluator):
    """Feature masking for a model told which inputs are present (the 3-D U-Net: an absent
    MRI sequence's features are zeroed or filled at every level, as in training with missing
    sequences): the K copies of the batch go through the model in one forward with their
    presence masks."""

    def __init__(self, model: UNet3D, modalities: list[str]) -> None:
        self.model, self.modalities = model, modalities

    def logits(self, prepared: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
        k, b = keep.shape[:2]
        inputs = {m: x[None].expand(k, *x.shape).flatten(0, 1) for m, x in prepared.items()}
        out = self.model(inputs, present=keep.flatten(0, 1))
        return out.logits.unflatten(0, (k, b))


class SegmentUnits(SubsetEvaluator):
    """The segments of a batch of clips as the players' units (per-segment valuation of
    localisation models): a clip's T segments are always evaluated on the same subsets, so K
    subsets of the B * T segments are K subsets of the B clips, and the clips' logits
    [K, B, T, C] are the segments' [K, B * T, C]. Valuation methods that draw subsets per
    sample (shapley-mc) would give a clip's segments different ones: refused."""

    def __init__(self, clips: SubsetEvaluator, segments: int) -> None:
        self.clips, self.segments = clips, segments
        self.modalities = clips.modalities

    def prepare(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.clips.prepare(inputs)

    def chunk_size(self, prepared: dict[str, torch.Tensor]) -> int:
        return self.clips.chunk_size(prepared)

    def logits(self, prepared: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
        per_clip = keep.unflatten(1, (-1, self.segments))
        if not bool((per_clip == per_clip[:, :, :1]).all()):
            raise UserError(
                "per-segment values need every segment of a clip on the same subsets: use "
                "--method shapley (exact) or cmob."
            )
        return self.clips.logits(prepared, per_clip[:, :, 0]).flatten(1, 2)


class NaiveEvaluator(SubsetEvaluator):
    """One full forward per subset (encoders included), for reference and benchmarks."""

    def __init__(
        self,
        model: nn.Module,
        modalities: list[str],
        fills: dict[str, torch.Tensor] | None,
        device: torch.device,
    ) -> None:
        self.model, self.modalities = model, modalities
        self.fills = None if fills is None else {m: fills[m].to(device) for m in modalities}

    def chunk_size(self, prepared: dict[str, torch.Tensor]) -> int:
        return 1

    def logits(self, prepared: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
        from mmval.models import MultimodalModel

        out = []
        for row in keep:  # [B, M]
            if self.fills is None:
                assert isinstance(self.model, MultimodalModel)
                feats = self.model.encode(prepared)
                masked = {
                    m: torch.where(row[:, j, None], feats[m], 0.0)
                    for j, m in enumerate(self.modalities)
                }
                out.append(self.model.fuse(masked))
            else:
                inputs = {
                    m: _where(row[None, :, j], prepared[m], self.fills[m])[0]
                    for j, m in enumerate(self.modalities)
                }
                out.append(_logits(self.model(inputs)))
        return torch.stack(out)


@no_grad
def build_evaluator(
    model: nn.Module,
    modalities: list[str],
    mask: MaskName,
    fills: dict[str, torch.Tensor] | None,
    *,
    device: torch.device,
    path: EvalPath = "auto",
) -> SubsetEvaluator:
    """Pick the evaluation path; call with the model in eval mode (replacements are encoded
    here, once)."""
    from mmval.models import MultimodalModel
    from mmval.models.unet3d import UNet3D

    if isinstance(model, UNet3D):
        if mask == "feature":
            return PresenceEvaluator(model, modalities)
        if fills is None:
            raise UserError("input masking needs the fills of the removed sequences.")
        return JointEvaluator(model, modalities, fills, device)
    late = isinstance(model, MultimodalModel)
    if mask == "feature" and not late:
        raise UserError(
            "--mask feature zeroes encoder outputs, which needs a model with one encoder per "
            f"modality (MultimodalModel); {type(model).__name__} has none (in model.ave_att the "
            "visual stream is attended by the audio, so features cannot be removed one "
            "modality at a time). Use --mask input or --mask mean for this model."
        )
    # with mid-fusion (MMTM) encoders see each other: a replaced input must go through all of them
    mixed = late and fills is not None and model.mid_fusion is not None
    if path == "auto":
        path = "late" if late and not mixed else "joint"
    if path == "naive":
        return NaiveEvaluator(model, modalities, fills, device)
    if path == "late":
        if not late or mixed:
            raise UserError(
                "the late-fusion path needs a MultimodalModel whose encoders are independent "
                "(no model.mmtm) unless --mask feature; use path joint."
            )
        return LateFusionEvaluator(model, modalities, fills, device)
    if fills is None:
        raise UserError("the joint path masks inputs; use --mask input or --mask mean.")
    return JointEvaluator(model, modalities, fills, device)
