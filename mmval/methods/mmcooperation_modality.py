"""Modality-level re-sampling from the mean modality values of a random part of the train set.

Paper: Wei, Feng, Wang, Hu, "Enhancing Multimodal Cooperation via Sample-level Modality
Valuation", CVPR 2024 (modality-level strategy, supplement Eq. 8). Follows the official code
(GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation
@7ed12b07ee7d233aa835089185c909aaa3ff6b1e: `code/modality_level.py`
`execute_modulation`, `main`; `code/datasets/dataloader.py` `AV_KS_Dataset_modality_level`);
spec: docs/methods.md#mmcooperation_modality.

What it changes: the epoch's samples and the training forward. Epochs 0 .. warmup - 1 are plain
training. At the end of every epoch from warmup - 1 on:
1. Z = int(part_ratio N) positions are drawn uniformly *with replacement* (the code's
   `np.random.choice(N, Z)`), and only the distinct ones are valued (eval mode, no gradients,
   exact Shapley values with the other modalities' features zeroed, as in
   `mmcooperation_sample`); mean phi_m is taken over the Z draws, repeats counted.
2. gap_m = 1 - mean phi_m; the weakest modality i has the largest gap (lowest mean);
   d = (1 / (M - 1)) sum_{j != i} (mean phi_j - mean phi_i), Norm(d) = d / ((M + 1) / 2).
   At M = 2 this is the code's |gap_a - gap_v| * 2 / 3.
3. p = f_m(Norm(d)), with the code's placement of alpha: linear Norm * alpha (default),
   tanh tanh(Norm * alpha), power Norm^1.5 * alpha. The supplement (Eq. 8) writes
   f_m(Norm) * alpha for all three; the code multiplies inside the tanh, which only differs
   for alpha != 1.
4. The next epoch holds every sample once plus int(p N) copies of samples drawn uniformly with
   replacement, each keeping only modality i (the others' features zeroed before the fusion
   head; ordinary CE of the fused logits). Evaluation uses every modality.

Enhancement (`enhancement`): `resample` is the paper's; `drop` and `mask` (in place, the
supplement's Table 7) and `resample_mask` [ours] as in `mmcooperation_sample` (see `cooperation`).

M > 2 [ours]: the d and Norm above (one weakest modality; ties go to the first
in data order, which only matters for M > 2 since at M = 2 a tie gives d = 0 and no copies).

Deviations: the code values the whole train split and averages over the draw; here only the
drawn samples are valued, which gives the same mean and is where the cost of the strategy is
saved (the figure `valuation_seconds`, against `mmcooperation_sample`'s full pass). Valuation
reads the split without augmentation (index order), see `mmcooperation_sample`. Z is at least 1.
Draws come from the global torch generator, which the engine seeds and checkpoints. Figures per
epoch: `valuation_seconds`, `valued` (distinct samples valued), `phi_<m>` (mean over the draw),
`p`, `copies`, `entries` (size of the next epoch).

DDP: the draws come from the global generator, in lockstep on every rank, so every rank draws
the same samples; each values its share of the distinct ones and the values are gathered
(`cooperation.value_split`), so p, the weakest modality and the copies are the same on
every rank. The loss is a batch mean, so the averaged gradients are the global batch's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

import numpy as np
from pydantic import Field

from mmval.lazy import lazy_module
from mmval.methods.base import MethodConfig, TrainContext
from mmval.methods.cooperation import Cooperation, CooperationConfig, value_split

if TYPE_CHECKING:
    import torch

    from mmval.data.dataset import TaggedPositions
    from mmval.models import MultimodalModel
else:
    torch = lazy_module("torch")

Shape = Literal["linear", "tanh", "power"]


class MMCooperationModalityConfig(CooperationConfig):
    # localisation [ours], as mmcooperation_sample
    tasks: ClassVar[tuple[str, ...]] = ("classification", "localisation")
    name: Literal["mmcooperation_modality"] = "mmcooperation_modality"
    source: ClassVar[str] = (
        "GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation@"
        "7ed12b07ee7d233aa835089185c909aaa3ff6b1e"
    )
    part_ratio: float = Field(
        default=0.2, gt=0, le=1, description="Z / N, the share of train drawn (official 0.2)"
    )
    alpha: float = Field(default=1.0, gt=0, description="scale of p (official 1)")
    function: Shape = Field(
        default="linear", description="f_m: linear (official default), tanh or power (x^1.5)"
    )


def resample_probability(mean_phi: np.ndarray, function: Shape, alpha: float) -> tuple[float, int]:
    """(p, weakest modality) from the mean phi [M] of the drawn samples."""
    m = len(mean_phi)
    weakest = int(np.argmin(mean_phi))
    d = (mean_phi.sum() - m * mean_phi[weakest]) / (m - 1)
    norm = d / ((m + 1) / 2)
    if function == "linear":
        p = norm * alpha
    elif function == "tanh":
        p = np.tanh(norm * alpha)
    else:
        p = norm**1.5 * alpha
    return float(p), weakest


class MMCooperationModality(Cooperation):
    Config: ClassVar[type[MethodConfig]] = MMCooperationModalityConfig
    config: MMCooperationModalityConfig

    def plan(
        self, model: MultimodalModel, ctx: TrainContext
    ) -> tuple[TaggedPositions, dict[str, float]]:
        cfg, n = self.config, ctx.train_size
        draws = torch.randint(n, (max(1, int(n * cfg.part_ratio)),)).numpy()
        unique, counts = np.unique(draws, return_counts=True)
        phi = value_split(model, ctx, self.valuation, unique, self.task).contributions
        mean = (phi * counts[:, None]).sum(0) / len(draws)
        p, weakest = resample_probability(mean, cfg.function, cfg.alpha)
        extra = int(p * n)
        pos = torch.randint(n, (extra,)).numpy()
        entries = self.entries_from_copies(n, pos, np.full(extra, weakest, np.int64))
        figures = {
            "valued": float(len(unique)),
            "p": p,
            "copies": float(extra),
            "entries": float(len(entries.positions)),
        }
        figures.update({f"phi_{m}": float(mean[j]) for j, m in enumerate(model.modalities)})
        return entries, figures
