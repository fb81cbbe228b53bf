"""Re-sampling at a fixed rate: the baseline that Wei et al. compare their valuation-driven
re-sampling with, which re-samples without valuing anything.

Paper: Wei, Feng, Wang, Hu, "Enhancing Multimodal Cooperation via Sample-level Modality
Valuation", CVPR 2024, supplement Table 6 (re-sampling at a fixed rate against the sample-level
strategy on UCF-101; the supplement notes that the sample-level strategy re-samples about as
many samples as its low fixed rate, so the gain is not the number of extra samples). The official
code (GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation
@7ed12b07ee7d233aa835089185c909aaa3ff6b1e) has no such mode, and the
numeric rates of that table are not in the text we could read, so the default `rate` (0.1) is
[ours]; to match a sample-level run, set `rate` to its logged `copies` / train size.
spec: docs/methods.md#mmcooperation_fixed.

What it changes: the epoch's samples and the training forward, as `mmcooperation_sample`, with
the valuation left out. Epochs 0 .. warmup - 1 are plain training. At the end of every epoch
from warmup - 1 on, int(rate N) copies are planned for the next epoch, of samples drawn
uniformly with replacement (as the modality-level strategy draws its copies,
`modality_level.py`); each copy keeps one modality, the others' features zeroed before the fusion
head (`enhancement: resample`, see `cooperation`), ordinary CE of the fused logits. Evaluation
uses every modality.

Which modality a copy keeps (`modality`) [ours; the supplement does not say]: by default one
drawn uniformly for each copy (no valuation, so no modality is preferred); a modality name makes
every copy keep that one (a data set's known weak modality, e.g. flow on UCF-101).

Enhancement (`enhancement`): as in `cooperation`; with `drop` or `mask` the planned copies are
applied in place (no extra entries), which is a fixed-rate modality drop or data mask.

Figures per epoch: `copies` and `copies_<m>` (planned for the next epoch), `entries` (its size).
DDP: the draws come from the global generator, in lockstep on every rank, so every rank builds
the same entries, which the sampler splits over the ranks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
from pydantic import Field

from mmval.lazy import lazy_module
from mmval.methods.base import MethodConfig, TrainContext
from mmval.methods.cooperation import Cooperation, CooperationConfig
from mmval.models import ModelConfig

if TYPE_CHECKING:
    import torch

    from mmval.data.dataset import TaggedPositions
    from mmval.models import MultimodalModel
else:
    torch = lazy_module("torch")


class MMCooperationFixedConfig(CooperationConfig):
    name: Literal["mmcooperation_fixed"] = "mmcooperation_fixed"
    source: ClassVar[str] = (
        "GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation@"
        "7ed12b07ee7d233aa835089185c909aaa3ff6b1e "
        "(which has no such mode; the rate and the kept modality [ours])"
    )
    rate: float = Field(
        default=0.1,
        gt=0,
        le=10,
        description="copies planned per epoch, as a share of the train split [ours: the "
        "supplement's Table 6 rates are not known; its 'low' rate matched the sample-level "
        "strategy's count on UCF-101]",
    )
    modality: str | None = Field(
        default=None,
        description="the modality every copy keeps; none: one drawn uniformly per copy [ours]",
    )

    def problems(self, model: ModelConfig, modalities: list[str] | None) -> list[tuple[str, str]]:
        if modalities is None or self.modality is None or self.modality in modalities:
            return []
        return [("method.modality", f"{self.modality!r} is not one of data.modalities")]


class MMCooperationFixed(Cooperation):
    Config: ClassVar[type[MethodConfig]] = MMCooperationFixedConfig
    config: MMCooperationFixedConfig
    values: ClassVar[bool] = False

    def plan(
        self, model: MultimodalModel, ctx: TrainContext
    ) -> tuple[TaggedPositions, dict[str, float]]:
        cfg, n, m = self.config, ctx.train_size, self.num_modalities
        extra = int(cfg.rate * n)
        pos = torch.randint(n, (extra,)).numpy()
        if cfg.modality is None:
            mod = torch.randint(m, (extra,)).numpy()
        else:
            mod = np.full(extra, self.modalities.index(cfg.modality), np.int64)
        entries = self.entries_from_copies(n, pos, mod)
        figures = {"copies": float(extra), "entries": float(len(entries.positions))}
        for name, count in zip(self.modalities, np.bincount(mod, minlength=m), strict=True):
            figures[f"copies_{name}"] = float(count)
        return entries, figures
