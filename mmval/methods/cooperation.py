"""What the methods that value modalities per sample during training share: the valuation pass
over the train split, tagged re-sampled copies that keep one modality, and input fills.

Used by `mmcooperation_sample`, `mmcooperation_modality` and `mmcooperation_fixed` (Wei et
al., CVPR 2024), whose common base `Cooperation` lives here, and by `cmob` (the valuation pass
and the input fill).

Enhancement (`enhancement`): what a planned copy (sample i, kept modality j) becomes.
- `resample` (the paper's; the official `drop` flag of `AV_KS_Dataset_sample_level`): an extra
  entry of i in which the other modalities' encoder features are zeroed before the fusion head.
- `drop` and `mask`: the supplement's comparison of enhancement strategies (its Table 7,
  "modality drop" and "data mask" used instead of re-sampling): no extra entries; the epoch
  holds every sample once, and a sample with c planned copies trains as one of its 1 + c
  entries, drawn uniformly (`drop_entries`), so with probability c / (1 + c) with only a copy's
  modality. `drop` zeroes the other modalities' features (as a copy of `resample`), `mask`
  blanks their inputs (zeros, mid-grey frames, padding ids: `fill_value`). [ours] the draw of
  which samples are enhanced and how often (the supplement names the strategies, not their
  schedule), and what "mask" blanks (whole inputs of the other modalities).
- `resample_mask` [ours]: the copies of `resample`, with the other modalities' inputs blanked as
  in `mask` instead of their features zeroed (the supplement's wording for the valuation, "input
  of modalities not in C are zeroed out", applied to the copies). Older recipes called this
  `mask`; they still load, and `mask` now means Table 7's in-place data mask.

Tags (`TaggedPositions`, `Batch.tag`): 0 is a plain sample; a copy that keeps only modality j
(0-based, of M) carries 1 + j + M k, where k counts the earlier copies of the same sample keeping
the same modality. The tag decodes to j alone; k only makes the entries differ, so that the
dataset's random frame picks (seeded by the entry) differ between copies, as the official loader
draws them afresh for each copy.

DDP: `value_split` values each rank's share of the samples and gathers the shares in rank
order (the split's order), so every rank holds the whole table; the random draws that turn it
into entries then come from the global generator, in lockstep on every rank, so every rank
builds the same entries, which the sampler splits over the ranks like any epoch.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from mmval.distributed import gather_rows
from mmval.lazy import lazy_module, no_grad
from mmval.methods.base import Method, MethodConfig, TrainContext, never_acts
from mmval.models import ModelOutput
from mmval.tasks import CLASSIFICATION, Task
from mmval.valuation.base import Game, ValuationMethod
from mmval.valuation.config import ValuationConfig
from mmval.valuation.engine import build_evaluator
from mmval.valuation.registry import build_method

if TYPE_CHECKING:
    import torch

    from mmval.data.dataset import Batch, TaggedPositions
    from mmval.models import MultimodalModel
else:
    torch = lazy_module("torch")

Enhancement = Literal["resample", "resample_mask", "drop", "mask"]
IN_PLACE: tuple[Enhancement, ...] = ("drop", "mask")  # no extra entries (supplement Table 7)
BLANK_INPUTS: tuple[Enhancement, ...] = ("mask", "resample_mask")  # inputs, not features
UINT8_FILL = 128  # mid-grey (about the ImageNet mean); zero motion for flow stored as 0..255


@dataclass
class SplitValues:
    """Contributions of a split's samples, in the split's order under DDP too."""

    positions: np.ndarray  # [N] positions in the split
    contributions: np.ndarray  # [N, M] float64
    # [N] bool: the prediction from every modality is right (classification; None otherwise)
    correct: np.ndarray | None


@no_grad
def value_split(
    model: MultimodalModel,
    ctx: TrainContext,
    valuation: ValuationMethod,
    positions: np.ndarray | None = None,
    task: Task = CLASSIFICATION,
) -> SplitValues:
    """The train split (or `positions` of it) valued in eval mode, removing modalities by
    zeroing their features (the official code's `exec_drop`); the benefit is the paper's, |S|
    if the prediction from S is right. The model's mode is kept. Under DDP each rank values its
    share and every rank gets the whole table."""
    training = model.training
    model.eval()
    device = next(model.parameters()).device
    evaluator = build_evaluator(model, model.modalities, "feature", None, device=device)
    index = [torch.zeros(0, dtype=torch.int64)]
    values = [torch.zeros(0, len(model.modalities), dtype=torch.float64)]
    correct = [torch.zeros(0, dtype=torch.uint8)]  # uint8: every backend gathers it
    classes = task.kind == "classification"
    for batch in ctx.rank_batches("train", positions):
        valued = valuation.value(Game(evaluator, batch, "correct", task))
        values.append(valued.contribution.cpu())
        if classes:
            right = valued.pred == batch.label.to(valued.pred.device)
            correct.append(right.to(torch.uint8).cpu())
        index.append(batch.index.cpu())
    model.train(training)
    return SplitValues(
        gather_rows(torch.cat(index)).numpy(),
        gather_rows(torch.cat(values)).numpy(),
        gather_rows(torch.cat(correct)).numpy().astype(bool) if classes else None,
    )


def kept_modalities(tag: torch.Tensor, m: int) -> torch.Tensor:
    """[B, M] booleans: every modality for tag 0, only modality (tag - 1) % M otherwise."""
    alone = torch.nn.functional.one_hot((tag - 1).remainder(m), m).bool()
    return torch.where((tag == 0)[:, None], torch.ones_like(alone), alone)


def fill_value(x: torch.Tensor, encoder: torch.nn.Module) -> int:
    """What stands in for a removed input value: the padding id for token ids (the encoder's),
    mid-grey for uint8 frames and flow, 0 for float features and spectrograms."""
    pad = getattr(encoder, "pad_id", None)
    if pad is not None and not x.is_floating_point():
        return int(pad)
    return UINT8_FILL if x.dtype == torch.uint8 else 0


def copy_entries(n: int, pos: np.ndarray, mod: np.ndarray, m: int) -> TaggedPositions:
    """Every sample once, plus one entry per copy (sample pos[c] keeping only modality mod[c])."""
    from mmval.data.dataset import TaggedPositions

    key = pos.astype(np.int64) * m + mod
    order = np.argsort(key, kind="stable")
    first = np.searchsorted(key[order], key[order], side="left")
    repeat = np.empty(len(key), np.int64)
    repeat[order] = np.arange(len(key)) - first
    tags = 1 + mod.astype(np.int64) + m * repeat
    return TaggedPositions(
        np.concatenate([np.arange(n), pos]).astype(np.int64),
        np.concatenate([np.zeros(n, np.int64), tags]),
    )


def drop_entries(n: int, pos: np.ndarray, mod: np.ndarray, uniform: np.ndarray) -> TaggedPositions:
    """Every sample once, as one of its 1 + c entries under `copy_entries` (the plain sample or
    one of its c copies), picked by uniform [n] in [0, 1): the epoch keeps its size and a sample
    trains its copies' modalities alone as often, relatively, as re-sampling would."""
    from mmval.data.dataset import TaggedPositions

    counts = np.bincount(pos, minlength=n)
    order = np.argsort(pos, kind="stable")
    first = np.cumsum(counts) - counts
    pick = np.floor(uniform * (1 + counts)).astype(np.int64)  # 0: the plain sample
    tags = np.zeros(n, np.int64)
    chosen = pick > 0
    tags[chosen] = 1 + mod[order[first[chosen] + pick[chosen] - 1]]
    return TaggedPositions(np.arange(n, dtype=np.int64), tags)


class CooperationConfig(MethodConfig):
    """What both strategies of Wei et al. share."""

    quick: ClassVar[dict[str, Any]] = {"method": {"warmup": 1}}
    min_modalities: ClassVar[int] = 2
    warmup: int = Field(
        default=5,
        ge=1,
        description="epochs of plain training; valuation from the end of epoch warmup - 1 "
        "(official 5)",
    )

    def inactive_reason(self, epochs: int) -> tuple[str, str] | None:
        """The first re-sampled epoch is `warmup` (planned at the end of epoch warmup - 1)."""
        return never_acts("warmup", self.warmup, epochs, f"{self.name}'s enhancement")

    enhancement: Enhancement = Field(
        default="resample",
        description="resample: extra copies keeping one modality, the others' features zeroed "
        "(official); drop / mask: the supplement's Table 7 strategies, no extra entries, a "
        "sample trains as one of its planned copies with the copies' share, the others' "
        "features zeroed (drop) or inputs blanked (mask) [ours: the share]; resample_mask "
        "[ours]: the copies of resample with the others' inputs blanked",
    )


class Cooperation(Method, ABC):
    """Planning at the end of each epoch from `warmup - 1` on (valuation first, unless `values`
    is False), tagged entries for the next epoch (kept in the state, so a resumed run trains on
    the same ones), and the training forward that keeps only the tagged modality of a copy."""

    Config: ClassVar[type[MethodConfig]] = CooperationConfig
    config: CooperationConfig
    values: ClassVar[bool] = True  # plans from Shapley values (logs `valuation_seconds`)
    modalities: list[str]  # the model's, set by `build_modules`

    def __init__(self, config: MethodConfig, num_classes: int) -> None:
        super().__init__(config, num_classes)
        self.entries: TaggedPositions | None = None

    def build_modules(self, model: MultimodalModel) -> torch.nn.ModuleDict:
        self.modalities = list(model.modalities)
        if self.values:  # built here so that a model the valuation cannot handle fails early
            self.valuation = build_method(ValuationConfig(method="shapley"), model.modalities)
        return torch.nn.ModuleDict()

    def train_positions(self, ctx: TrainContext) -> TaggedPositions | None:
        return self.entries

    def forward(self, model: MultimodalModel, batch: Batch, ctx: TrainContext) -> ModelOutput:
        assert batch.tag is not None
        keep = kept_modalities(batch.tag, len(model.modalities))
        if bool(keep.all()):
            return model(batch.inputs)
        if self.config.enhancement in BLANK_INPUTS:
            inputs = {}
            for j, m in enumerate(model.modalities):
                x = batch.inputs[m]
                blank = torch.full_like(x, fill_value(x, model.encoders[m]))
                inputs[m] = torch.where(keep[:, j].view(-1, *[1] * (x.dim() - 1)), x, blank)
            return model(inputs)
        features = model.encode(batch.inputs)
        kept = {
            # [B, D], or per segment [B, T, D]
            m: features[m]
            * keep[:, j].view(-1, *[1] * (features[m].dim() - 1)).to(features[m].dtype)
            for j, m in enumerate(model.modalities)
        }
        return ModelOutput(model.fuse(kept), kept, None)

    def on_epoch_end(self, model: MultimodalModel, ctx: TrainContext) -> dict[str, float]:
        if ctx.epoch < self.config.warmup - 1:
            return {}
        started = time.perf_counter()
        self.entries, figures = self.plan(model, ctx)
        if self.values:
            figures["valuation_seconds"] = time.perf_counter() - started
        return figures

    @abstractmethod
    def plan(
        self, model: MultimodalModel, ctx: TrainContext
    ) -> tuple[TaggedPositions, dict[str, float]]:
        """The next epoch's entries (from the values, if the method values) and the figures to
        log."""

    def entries_from_copies(self, n: int, pos: np.ndarray, mod: np.ndarray) -> TaggedPositions:
        """The next epoch's entries from the copies (pos[c], mod[c]) under `enhancement`."""
        if self.config.enhancement in IN_PLACE:
            return drop_entries(n, pos, mod, torch.rand(n, dtype=torch.float64).numpy())
        return copy_entries(n, pos, mod, self.num_modalities)

    @property
    def num_modalities(self) -> int:
        return len(self.modalities)

    def state_dict(self) -> dict[str, Any]:
        if self.entries is None:
            return {}
        return {
            "positions": torch.from_numpy(self.entries.positions),
            "tags": torch.from_numpy(self.entries.tags),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from mmval.data.dataset import TaggedPositions

        if "positions" in state:
            self.entries = TaggedPositions(state["positions"].numpy(), state["tags"].numpy())
