"""Sample-level modality valuation and re-sampling of each sample's low-contributing modalities.

Paper: Wei, Feng, Wang, Hu, "Enhancing Multimodal Cooperation via Sample-level Modality
Valuation", CVPR 2024 (sample-level strategy, supplement Eq. 7). Follows the official code
(GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation
@7ed12b07ee7d233aa835089185c909aaa3ff6b1e: `code/sample_level.py`
`execute_modulation`, `train_epoch`, `main`; `code/datasets/dataloader.py`
`AV_KS_Dataset_sample_level`; `code/models/models.py` `AVClassifier.forward`, `exec_drop`);
spec: docs/methods.md#mmcooperation_sample.

What it changes: the epoch's samples and the training forward. Epochs 0 .. warmup - 1 are plain
training. At the end of every epoch from warmup - 1 on, every training sample is valued (eval
mode, no gradients, `cooperation.value_split`): phi_m is the exact Shapley value of
modality m (`mmval.valuation.shapley.ExactShapley`) for v(S) = |S| if the prediction from the
modalities in S alone is right, the others' encoder features zeroed. The next epoch holds every
sample once plus s copies of sample i for each modality m with phi_m < 1, s = f_s(1 - phi_m); a
copy keeps only m: the other modalities' features are zeroed before the fusion head, and its
loss is the ordinary CE of the fused logits (the code's `drop` flag). Evaluation uses every
modality. The entries are rebuilt every epoch.

f_s (`frequency`):
- `step` (default, the code's): copies = min(max_copies, ceil(2 (1 - phi))); at M = 2, where
  phi is one of -0.5, 0, 0.5, 1, 1.5, this is the code's thresholds (0.4 < phi < 1: 1 copy,
  -0.1 < phi < 0.4: 2, phi < -0.1: 3) on every value phi can take.
- `linear`, `tanh`, `power` [ours, all of it: supplement Eq. 7 only asks f_s to be increasing
  and the official code has the step alone]: the expected number of copies is
  max_copies * g(u), u = (1 - phi) / ((M + 1) / 2) in (0, 1] (the gap over its largest value),
  g(u) = u, tanh(u) or u^1.5 (borrowed from the modality-level strategy's f_m, supplement
  Eq. 8), rounded stochastically (floor, plus one with the fractional part's probability). At
  M = 2 `linear` gives the same counts as `step`.

Enhancement (`enhancement`, see `cooperation`): `resample` is the paper's; `drop` and `mask`
are the supplement's Table 7 alternatives "instead of re-sampling" (modality drop, data mask):
no extra entries, each sample trains as one of its 1 + c entries, drawn uniformly, with the
other modalities' features zeroed (`drop`) or inputs blanked (`mask`) [ours: that share];
`resample_mask` [ours] adds the copies of `resample` with the inputs blanked instead.

M > 2 [ours]: copies = min(3, ceil(2 (1 - phi))) per modality with phi < 1,
each keeping only that modality; exact Shapley values over all 2^M subsets (M <= 10).

Deviations: the valuation reads the train split through `TrainContext.batches` (index order,
no augmentation); the official code values through a train-split loader whose random crops and
frame picks are on. Copies of the same sample draw their own random frames and crops (the entry
seeds them, see `cooperation`). Figures per epoch: `valuation_seconds`, `copies` and
`copies_<m>` (copies planned for the next epoch), `entries` (its size), `phi_<m>` (mean value).

DDP: each rank values its share of the split and the phi table is gathered
(`cooperation.value_split`), so every rank holds all of it; the rounding draws come from
the global generator, in lockstep on every rank, so every rank builds the same entries (which
the sampler splits over the ranks) and logs the same figures. The loss is a batch mean, so the
averaged gradients are the global batch's.
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

Frequency = Literal["step", "linear", "tanh", "power"]
SHAPES = {"linear": lambda u: u, "tanh": np.tanh, "power": lambda u: u**1.5}
EPS = 1e-9  # Shapley values are sums of float64 weights: 0.5 may come out as 0.4999999999


class MMCooperationSampleConfig(CooperationConfig):
    # localisation [ours]: the clip's phi values the mean over its segments of the segment
    # benefit (Wei et al.'s Table 3 code is not public)
    tasks: ClassVar[tuple[str, ...]] = ("classification", "localisation")
    name: Literal["mmcooperation_sample"] = "mmcooperation_sample"
    source: ClassVar[str] = (
        "GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation@"
        "7ed12b07ee7d233aa835089185c909aaa3ff6b1e"
    )
    frequency: Frequency = Field(
        default="step",
        description="f_s: step (official thresholds), or [ours] linear / tanh / power: expected "
        "counts max_copies * g(gap / ((M + 1) / 2)), rounded at random",
    )
    max_copies: int = Field(default=3, ge=1, description="copies for the lowest phi (official 3)")


def copy_counts(
    phi: np.ndarray, frequency: Frequency, max_copies: int, uniform: np.ndarray | None = None
) -> np.ndarray:
    """Copies [N, M] of each sample keeping each modality, from phi [N, M]; `uniform` [N, M] in
    [0, 1) rounds the expected counts of the non-step functions."""
    gap = 1.0 - phi
    if frequency == "step":
        counts = np.ceil(2 * gap - EPS)
    else:
        assert uniform is not None
        u = np.clip(gap / ((phi.shape[1] + 1) / 2), 0.0, 1.0)
        expected = max_copies * SHAPES[frequency](u)
        counts = np.floor(expected) + (uniform < expected - np.floor(expected))
    counts = np.where(gap > EPS, np.clip(counts, 0, max_copies), 0)
    return counts.astype(np.int64)


class MMCooperationSample(Cooperation):
    Config: ClassVar[type[MethodConfig]] = MMCooperationSampleConfig
    config: MMCooperationSampleConfig

    def plan(
        self, model: MultimodalModel, ctx: TrainContext
    ) -> tuple[TaggedPositions, dict[str, float]]:
        cfg, m = self.config, self.num_modalities
        valued = value_split(model, ctx, self.valuation, task=self.task)
        positions, phi = valued.positions, valued.contributions
        uniform = None
        if cfg.frequency != "step":
            uniform = torch.rand(phi.shape, dtype=torch.float64).numpy()
        copies = copy_counts(phi, cfg.frequency, cfg.max_copies, uniform)
        flat = copies.ravel()
        pos = np.repeat(np.repeat(positions, m), flat)
        mod = np.repeat(np.tile(np.arange(m), len(positions)), flat)
        entries = self.entries_from_copies(len(positions), pos, mod)
        figures = {"copies": float(flat.sum()), "entries": float(len(entries.positions))}
        for j, name in enumerate(model.modalities):
            figures[f"copies_{name}"] = float(copies[:, j].sum())
            figures[f"phi_{name}"] = float(phi[:, j].mean())
        return entries, figures
