"""Volumetric segmentation of brain tumours with missing MRI sequences: losses, BraTS Dice,
sliding-window inference and random missing-sequence draws, as the official codes run them.

Label map: 0 background, 1 necrotic/non-enhancing core, 2 edema, 3 enhancing tumour (BraTS's
label 4 stored as 3, as mmFormer's `preprocess.py` 78-81 does). Regions: WT = {1, 2, 3},
TC = {1, 3}, ET = {3}.

Official code read: mmFormer = YaoZhang93/mmFormer@b18663adbfd0323656083e0470420c8c715c1782
(files under `mmformer/`), LCKD = billhhh/LCKD@5ba51b5366a74d01906cc8389855bb8e3e1ae42a.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

from mmval.lazy import lazy_module

if TYPE_CHECKING:
    import torch
    from torch.nn import functional as F
else:
    torch = lazy_module("torch")
    F = lazy_module("torch.nn.functional")

MMFORMER_MODALITIES = ("flair", "t1ce", "t1", "t2")
"""The column order of mmFormer's masks (its stacking order, `preprocess.py` 72)."""

MMFORMER_MASKS = (
    (False, False, False, True),
    (False, True, False, False),
    (False, False, True, False),
    (True, False, False, False),
    (False, True, False, True),
    (False, True, True, False),
    (True, False, True, False),
    (False, False, True, True),
    (True, False, False, True),
    (True, True, False, False),
    (True, True, True, False),
    (True, False, True, True),
    (True, True, False, True),
    (False, True, True, True),
    (True, True, True, True),
)
"""The 15 evaluated subsets in mmFormer's table order (`train.py` 55-58), columns in
`MMFORMER_MODALITIES` order; their names there are `MMFORMER_MASK_NAMES` (60-63)."""

MMFORMER_MASK_NAMES = (
    "t2",
    "t1c",
    "t1",
    "flair",
    "t1cet2",
    "t1cet1",
    "flairt1",
    "t1t2",
    "flairt2",
    "flairt1ce",
    "flairt1cet1",
    "flairt1t2",
    "flairt1cet2",
    "t1cet1t2",
    "flairt1cet1t2",
)

PresenceScheme = Literal["mmformer", "lckd"]


def _one_hot(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[B, D, H, W] class map -> [B, C, D, H, W] float one-hot."""
    return F.one_hot(target.long(), num_classes).movedim(-1, 1).float()


def dice_wce_loss(logits: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """mmFormer's loss on one output: `softmax_weighted_loss + dice_loss` (`train.py` 167-169;
    `utils/criterions.py` 11-36), on softmax probabilities of `logits` [B, C, D, H, W] against the
    class map `target` [B, D, H, W].

    Dice: 1 - mean over all C classes, background included, of 2 sum(p t) / (sum p + sum t +
    1e-7), the sums running over the whole batch. Weighted cross-entropy: sum over classes of
    -w_c t_c log(clamp(p_c, 0.005, 1)) with w_c = 1 - (share of the sample's voxels in class c),
    averaged over samples and voxels.
    """
    if logits.shape[1] != num_classes:
        raise ValueError(f"logits have {logits.shape[1]} channels, num_classes is {num_classes}")
    prob = logits.float().softmax(dim=1)
    onehot = _one_hot(target, num_classes)
    dims = (0, 2, 3, 4)
    dice = 2.0 * (prob * onehot).sum(dims) / (prob.sum(dims) + onehot.sum(dims) + 1e-7)
    share = onehot.sum((2, 3, 4)) / onehot.sum((1, 2, 3, 4)).unsqueeze(1)  # [B, C]
    weight = (1.0 - share).view(*share.shape, 1, 1, 1)
    cross = -(weight * onehot * prob.clamp(0.005, 1.0).log()).sum(1).mean()
    return cross + 1.0 - dice.mean()


def brats_regions(target: torch.Tensor) -> torch.Tensor:
    """The class map [B, D, H, W] as LCKD's 3 binary region maps [B, 3, D, H, W] in its channel
    order [ET, WT, TC] (`BraTSDataSet.py` 59-71 `id2trainId`, with LCKD's label 4 = our 3)."""
    et = target == 3
    wt = target >= 1
    tc = (target == 1) | et
    return torch.stack((et, wt, tc), dim=1).float()


def region_dice_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """LCKD's segmentation loss `DiceLoss4BraTS + BCELoss4BraTS` (`train.py` 259-262,
    `loss_Dual.py` 11-82) on 3 sigmoid channels [ET, WT, TC] (`logits` [B, 3, D, H, W]; a model
    with 3 output channels) against the regions of the class map `target` [B, D, H, W].

    Dice: per channel and sample 2 sum(p t) / (sum p + sum t + 1), 1 - its mean over the batch,
    then the mean over the 3 channels. BCE: `BCEWithLogitsLoss` (mean over batch and voxels) per
    channel, summed over the channels.
    """
    if logits.shape[1] != 3:
        raise ValueError(f"region losses need 3 channels [ET, WT, TC], got {logits.shape[1]}")
    logits = logits.float()
    regions = brats_regions(target)
    prob = logits.sigmoid().flatten(2)
    truth = regions.flatten(2)
    dice = 2.0 * (prob * truth).sum(2) / (prob.sum(2) + truth.sum(2) + 1.0)  # [B, 3]
    dice_loss = (1.0 - dice.mean(0)).mean()
    bce = F.binary_cross_entropy_with_logits(logits, regions, reduction="none")
    return dice_loss + bce.mean((0, 2, 3, 4)).sum()


def region_labels(logits: torch.Tensor) -> torch.Tensor:
    """LCKD's class map from its 3 region outputs [B, 3, D, H, W] (`eval.py` 164-172): sigmoid
    rounded (`np.around`, so exactly 0.5 gives 0), then WT -> 2, TC over it -> 1, ET over both
    -> 3 (LCKD writes 4)."""
    on = logits.float().sigmoid() > 0.5
    labels = torch.zeros_like(on[:, 0], dtype=torch.long)
    labels[on[:, 1]] = 2
    labels[on[:, 2]] = 1
    labels[on[:, 0]] = 3
    return labels


def brats_dice(
    pred_labels: torch.Tensor | np.ndarray,
    target: torch.Tensor | np.ndarray,
    et_min_voxels: int = 500,
) -> dict[str, np.ndarray]:
    """Per-case Dice of class maps [B, D, H, W] as mmFormer's `softmax_output_dice_class4`
    (`predict.py` 18-64): `wt` {1, 2, 3}, `tc` {1, 3}, `et` {3} and `et_post`, the ET Dice after
    a predicted ET of fewer than `et_min_voxels` voxels is emptied (39-47; mmFormer tests one case
    per batch, `train.py` 112-114, so the count is per case here). Dice = (2 |o & t| + 1e-8) /
    (|o| + |t| + 1e-8): a case with both empty scores 1. Returns arrays [B] (float64).
    """
    pred = np.asarray(pred_labels.cpu() if isinstance(pred_labels, torch.Tensor) else pred_labels)
    truth = np.asarray(target.cpu() if isinstance(target, torch.Tensor) else target)
    if pred.shape != truth.shape or pred.ndim < 2:
        raise ValueError(f"prediction {pred.shape} and target {truth.shape} must be [B, ...] alike")
    axes = tuple(range(1, pred.ndim))

    def dice(o: np.ndarray, t: np.ndarray) -> np.ndarray:
        inter = (o & t).sum(axes, dtype=np.float64)
        return (2.0 * inter + 1e-8) / (o.sum(axes, dtype=np.float64) + t.sum(axes) + 1e-8)

    et_pred = pred == 3
    kept = et_pred.sum(axes) >= et_min_voxels
    et_post = et_pred & kept.reshape(-1, *(1,) * len(axes))
    return {
        "wt": dice(np.isin(pred, (1, 2, 3)), np.isin(truth, (1, 2, 3))),
        "tc": dice(np.isin(pred, (1, 3)), np.isin(truth, (1, 3))),
        "et": dice(et_pred, truth == 3),
        "et_post": dice(et_post, truth == 3),
    }


def _window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """mmFormer's window starts on one axis (`predict.py` 156-169): multiples of the stride
    int(patch * (1 - overlap)) below size - patch, then size - patch. The count of multiples
    comes from the integer stride (mmFormer divides by the unrounded one: the same whenever
    patch * (1 - overlap) is whole, and never leaving a voxel uncovered otherwise)."""
    stride = int(patch * (1 - overlap))
    if stride < 1:
        raise ValueError(f"overlap {overlap} leaves no stride for patch {patch}")
    count = math.ceil((size - patch) / stride)
    return [i * stride for i in range(count)] + [size - patch]


def sliding_window_logits(
    model_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    volume_inputs: dict[str, torch.Tensor],
    patch: int | Sequence[int],
    overlap: float,
) -> torch.Tensor:
    """mmFormer's sliding-window inference (`predict.py` 154-188; patch 128, overlap 0.5 there):
    `model_fn` maps a dict of crops [B, 1, p, p, p] to outputs [B, C, p, p, p]; each voxel gets
    the mean of the outputs of the windows covering it. mmFormer averages softmax probabilities
    and LCKD sigmoid ones (`eval.py` 89-98, overlap 1/3): `model_fn` returns what is averaged.

    A volume no larger than the patch is one forward of the whole volume; on an axis shorter
    than the patch the window spans the axis [ours: mmFormer pads volumes to the patch first].
    """
    ref = next(iter(volume_inputs.values()))
    sizes = tuple(ref.shape[2:])
    patches = (patch,) * len(sizes) if isinstance(patch, int) else tuple(patch)
    if len(patches) != len(sizes) or not 0.0 <= overlap < 1.0:
        raise ValueError(f"patch {patch} must have one size per axis {sizes}, overlap in [0, 1)")
    patches = tuple(min(p, s) for p, s in zip(patches, sizes, strict=True))
    if patches == sizes:
        return model_fn(volume_inputs)
    starts = [_window_starts(s, p, overlap) for s, p in zip(sizes, patches, strict=True)]
    total: torch.Tensor | None = None
    count = torch.zeros((1, 1, *sizes), device=ref.device)
    for d in starts[0]:
        for h in starts[1]:
            for w in starts[2]:
                window = (
                    slice(None),
                    slice(None),
                    slice(d, d + patches[0]),
                    slice(h, h + patches[1]),
                    slice(w, w + patches[2]),
                )
                out = model_fn({m: x[window] for m, x in volume_inputs.items()}).float()
                if total is None:
                    total = out.new_zeros((*out.shape[:2], *sizes))
                total[window] += out
                count[window] += 1.0
    assert total is not None  # at least one window per axis
    return total / count


def random_presence(
    batch_size: int,
    m: int,
    scheme: PresenceScheme,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Which of m sequences each training sample sees, [B, M] bool, as the official trainings
    draw it.

    `mmformer`: per sample, uniform over the 2^M - 1 non-empty subsets (`data/datasets_nii.py`
    98-99, `np.random.choice(15, 1)` over `mask_array` 26-28). `lckd`: once per batch, the
    number present uniform in {1, ..., M-1} (`random.randint(1, 3)` for its 4 sequences: 1, 2 or
    3, never all), then a uniform subset of that size (`DualNet.py` 335-342); needs M >= 2.
    """
    if m < 1 or batch_size < 1:
        raise ValueError(f"need batch_size >= 1 and m >= 1, got {batch_size} and {m}")
    if scheme == "mmformer":
        code = torch.randint(1, 2**m, (batch_size,), generator=generator)
        return ((code.unsqueeze(1) >> torch.arange(m)) & 1) == 1
    if m < 2:
        raise ValueError("the lckd scheme drops at least one sequence: it needs m >= 2")
    count = int(torch.randint(1, m, (1,), generator=generator))
    chosen = torch.randperm(m, generator=generator)[:count]
    row = torch.zeros(m, dtype=torch.bool)
    row[chosen] = True
    return row.expand(batch_size, m).clone()


def subset_name(present_row: torch.Tensor | Sequence[bool], modalities: Sequence[str]) -> str:
    """`flair+t1ce`: the present sequences in `modalities` order, joined by `+` as mmval's
    subset tables name them; `none` for the empty subset."""
    flags = [bool(v) for v in present_row]
    if len(flags) != len(modalities):
        raise ValueError(f"{len(flags)} flags for {len(modalities)} modalities")
    return "+".join(m for m, on in zip(modalities, flags, strict=True) if on) or "none"


def mmformer_masks(modalities: Sequence[str]) -> torch.Tensor:
    """mmFormer's 15 subsets in its table order as [15, M] bool with columns in `modalities`
    order (LCKD's order flair, t1, t1ce, t2 differs from mmFormer's); `modalities` must be the
    four BraTS sequence names."""
    if sorted(modalities) != sorted(MMFORMER_MODALITIES):
        raise ValueError(f"mmFormer's masks need the sequences {MMFORMER_MODALITIES}")
    columns = [MMFORMER_MODALITIES.index(m) for m in modalities]
    return torch.tensor(MMFORMER_MASKS)[:, columns]
