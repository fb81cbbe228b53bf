"""The 3D U-Net with missing sequences and the segmentation blocks of mmval.tasks.volumes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mmval.models.unet3d import UNet3D, UNet3DConfig
from mmval.tasks.volumes import (
    MMFORMER_MASK_NAMES,
    MMFORMER_MASKS,
    _window_starts,
    brats_dice,
    brats_regions,
    dice_wce_loss,
    mmformer_masks,
    random_presence,
    region_dice_bce_loss,
    region_labels,
    sliding_window_logits,
    subset_name,
)

SEQS = ["flair", "t1ce", "t1", "t2"]


def _inputs(batch: int, size: tuple[int, int, int] = (16, 16, 16), seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(batch, 1, *size, generator=g).half() for m in SEQS}


def _model(**kw: object) -> UNet3D:
    torch.manual_seed(0)
    return UNet3D(UNet3DConfig(base=4, levels=3, **kw), SEQS, num_classes=4).eval()


@pytest.mark.parametrize("shared", [False, True])
def test_shapes_and_features(shared: bool) -> None:
    model = UNet3D(UNet3DConfig(base=4, levels=4, shared_encoder=shared), SEQS, 4)
    present = torch.tensor([[True, False, True, False], [False, False, False, True]])
    out = model(_inputs(2), present)
    assert out.logits.shape == (2, 4, 16, 16, 16)
    assert out.logits.dtype == torch.float32
    assert out.unimodal_logits is None
    assert list(out.features) == SEQS
    for i, m in enumerate(SEQS):
        feats = out.features[m]
        assert feats.shape == (2, 32, 2, 2, 2)
        for b in range(2):
            assert bool(feats[b].abs().sum() > 0) == bool(present[b, i])
    assert len(model.encoders) == (1 if shared else 4)


@pytest.mark.parametrize(
    ("fill", "shared"), list(itertools.product(["zero", "mean"], [False, True]))
)
def test_absent_input_is_never_read(fill: str, shared: bool) -> None:
    model = _model(fill=fill, shared_encoder=shared)
    present = torch.tensor([[True, False, True, False], [False, True, True, True]])
    inputs = _inputs(2)
    with torch.no_grad():
        base = model(inputs, present).logits
        changed = dict(inputs)
        changed["t1ce"] = inputs["t1ce"].clone()
        changed["t1ce"][0] = 100.0  # absent in sample 0
        changed["t2"] = torch.full_like(inputs["t2"], float("nan"))
        changed["t2"][1] = inputs["t2"][1]  # t2 absent in sample 0 only
        assert torch.equal(model(changed, present).logits, base)
        moved = dict(inputs)
        moved["t1"] = inputs["t1"] + 1.0  # present in both samples
        assert not torch.allclose(model(moved, present).logits, base)


def test_fully_absent_sequence_may_be_left_out_and_empty_subset_runs() -> None:
    model = _model(fill="mean")
    inputs = _inputs(2)
    present = torch.tensor([[True, True, False, False]] * 2)
    with torch.no_grad():
        full = model(inputs, present).logits
        fewer = model({m: inputs[m] for m in ("flair", "t1ce")}, present).logits
        assert torch.equal(full, fewer)
        nothing = model(inputs, torch.zeros(2, 4, dtype=torch.bool)).logits
    assert torch.isfinite(nothing).all()
    with pytest.raises(ValueError, match="no input"):
        model({"flair": inputs["flair"]}, torch.tensor([[True, True, False, False]] * 2))


def test_mean_fill_differs_from_zero_fill() -> None:
    zero, mean = _model(fill="zero"), _model(fill="mean")
    mean.load_state_dict(zero.state_dict())
    inputs = _inputs(1)
    with torch.no_grad():
        every = torch.ones(1, 4, dtype=torch.bool)
        assert torch.equal(zero(inputs, every).logits, mean(inputs, every).logits)
        some = torch.tensor([[True, False, True, False]])
        assert not torch.allclose(zero(inputs, some).logits, mean(inputs, some).logits)


@pytest.mark.parametrize("shared", [False, True])
def test_all_present_equals_none(shared: bool) -> None:
    model = _model(shared_encoder=shared)
    inputs = _inputs(2)
    with torch.no_grad():
        a = model(inputs).logits
        b = model(inputs, torch.ones(2, 4, dtype=torch.bool)).logits
    assert torch.equal(a, b)


def test_bad_shapes_raise() -> None:
    model = UNet3D(UNet3DConfig(base=4, levels=4), SEQS, 4)
    with pytest.raises(ValueError, match="multiples of 8"):
        model(_inputs(1, (12, 16, 16)))
    with pytest.raises(ValueError, match="at least 16"):
        model(_inputs(1, (8, 16, 16)))
    with pytest.raises(ValueError, match="present must be"):
        model(_inputs(2), torch.ones(2, 3, dtype=torch.bool))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_dice_wce_loss_brute_force() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, 3, 3, 2)) * 3
    target = rng.integers(0, 4, size=(2, 3, 3, 2))
    p = _softmax(logits)
    dice = 0.0
    for c in range(4):
        t = target == c
        dice += 2 * (p[:, c] * t).sum() / (p[:, c].sum() + t.sum() + 1e-7)
    cross = np.zeros(target.shape)
    for b, c in itertools.product(range(2), range(4)):
        t = target[b] == c
        w = 1 - t.sum() / t.size
        cross[b] += -w * t * np.log(np.clip(p[b, c], 0.005, 1))
    expected = cross.mean() + 1 - dice / 4
    got = dice_wce_loss(torch.tensor(logits), torch.tensor(target), 4)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_region_dice_bce_loss_brute_force() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 3, 3, 2, 2)) * 2
    target = rng.integers(0, 4, size=(2, 3, 2, 2))
    p = 1 / (1 + np.exp(-logits))
    regions = [target == 3, target >= 1, (target == 1) | (target == 3)]  # ET, WT, TC
    dice_loss, bce = 0.0, 0.0
    for i, r in enumerate(regions):
        per_case = [2 * (p[b, i] * r[b]).sum() / (p[b, i].sum() + r[b].sum() + 1) for b in range(2)]
        dice_loss += 1 - np.mean(per_case)
        bce += -(r * np.log(p[:, i]) + (1 - r) * np.log(1 - p[:, i])).mean()
    got = region_dice_bce_loss(torch.tensor(logits), torch.tensor(target))
    assert got.item() == pytest.approx(dice_loss / 3 + bce, rel=1e-5)
    assert brats_regions(torch.tensor(target)).shape == (2, 3, 3, 2, 2)


def test_region_labels_order() -> None:
    big = 10.0
    logits = torch.full((1, 3, 1, 1, 4), -big)
    logits[0, 1, 0, 0, 1:] = big  # WT
    logits[0, 2, 0, 0, 2:] = big  # TC
    logits[0, 0, 0, 0, 3] = big  # ET
    assert region_labels(logits)[0, 0, 0].tolist() == [0, 2, 1, 3]


def test_brats_dice_hand_cases() -> None:
    target = np.zeros((4, 4, 4, 4), dtype=np.int64)
    pred = np.zeros_like(target)
    # case 0: both empty -> every Dice 1 through the eps
    # case 1: target WT 4 voxels (2 edema, 2 ET), prediction 2 edema voxels on them
    target[1, 0, 0, :2] = 2
    target[1, 0, 0, 2:] = 3
    pred[1, 0, 0, :2] = 2
    # case 2: 3 predicted ET voxels, no ET in the target
    pred[2, 1, 1, :3] = 3
    # case 3: ET predicted exactly, 4 voxels (< et_min_voxels)
    target[3, 2, 2, :] = 3
    pred[3, 2, 2, :] = 3
    got = brats_dice(torch.tensor(pred), torch.tensor(target), et_min_voxels=500)
    assert got["wt"] == pytest.approx([1.0, 4 / 6, 0.0, 1.0], abs=1e-6)
    assert got["tc"] == pytest.approx([1.0, 0.0, 0.0, 1.0], abs=1e-6)
    assert got["et"] == pytest.approx([1.0, 0.0, 0.0, 1.0], abs=1e-6)
    assert got["et_post"] == pytest.approx([1.0, 0.0, 1.0, 0.0], abs=1e-6)
    kept = brats_dice(pred, target, et_min_voxels=4)
    assert kept["et_post"] == pytest.approx([1.0, 0.0, 1.0, 1.0], abs=1e-6)  # 3 < 4 <= 4


def test_window_starts_as_mmformer() -> None:
    assert _window_starts(240, 128, 0.5) == [0, 64, 112]
    assert _window_starts(155, 128, 0.5) == [0, 27]
    assert _window_starts(128, 128, 0.5) == [0]


def test_sliding_window_one_patch_is_whole_forward() -> None:
    model = _model()
    inputs = _inputs(1)
    present = torch.tensor([[True, False, True, True]])
    with torch.no_grad():
        whole = model(inputs, present).logits
        slid = sliding_window_logits(lambda x: model(x, present).logits, inputs, 16, 0.5)
    assert torch.equal(whole, slid)


def test_sliding_window_covers_every_voxel() -> None:
    volume = {"flair": torch.randn(2, 1, 16, 40, 24)}
    calls = []

    def crop_back(x: dict[str, torch.Tensor]) -> torch.Tensor:
        calls.append(tuple(x["flair"].shape[2:]))
        return torch.cat((x["flair"], torch.ones_like(x["flair"])), dim=1)

    out = sliding_window_logits(crop_back, volume, (16, 16, 16), 0.5)
    assert set(calls) == {(16, 16, 16)}
    assert len(calls) == 1 * 4 * 2  # starts [0], [0, 8, 16, 24], [0, 8]
    torch.testing.assert_close(out[:, :1], volume["flair"])
    assert torch.equal(out[:, 1:], torch.ones_like(out[:, 1:]))


def test_random_presence_mmformer() -> None:
    g = torch.Generator().manual_seed(0)
    draws = random_presence(6000, 4, "mmformer", g)
    assert draws.shape == (6000, 4) and draws.dtype == torch.bool
    assert draws.any(1).all()
    counts = torch.unique(draws, dim=0, return_counts=True)[1]
    assert len(counts) == 15
    assert counts.min() > 330 and counts.max() < 470  # 400 expected each
    again = random_presence(6000, 4, "mmformer", torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


def test_random_presence_lckd() -> None:
    g = torch.Generator().manual_seed(0)
    batches = [random_presence(3, 4, "lckd", g) for _ in range(1400)]
    sizes = []
    seen = set()
    for batch in batches:
        assert (batch == batch[0]).all()  # one draw per batch
        sizes.append(int(batch[0].sum()))
        seen.add(tuple(batch[0].tolist()))
    assert set(sizes) == {1, 2, 3}  # never empty, never all 4
    for k in (1, 2, 3):
        assert 400 < sizes.count(k) < 540  # 1/3 each
    assert len(seen) == 14
    g2 = torch.Generator().manual_seed(0)
    assert torch.equal(random_presence(3, 4, "lckd", g2), batches[0])
    with pytest.raises(ValueError):
        random_presence(3, 1, "lckd", g)


def test_subset_names_and_mmformer_order() -> None:
    assert subset_name(torch.tensor([True, False, True, False]), SEQS) == "flair+t1"
    assert subset_name([False] * 4, SEQS) == "none"
    assert len(MMFORMER_MASKS) == len(set(MMFORMER_MASKS)) == len(MMFORMER_MASK_NAMES) == 15
    lckd_order = ["flair", "t1", "t1ce", "t2"]
    masks = mmformer_masks(lckd_order)
    names = [subset_name(row, lckd_order) for row in masks]
    assert names[:5] == ["t2", "t1ce", "t1", "flair", "t1ce+t2"]
    assert names[-1] == "flair+t1+t1ce+t2"


def _spheres(n: int, g: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """16^3 volumes with one sphere of edema: bright in flair, invisible in the others."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(16.0)] * 3, indexing="ij"))
    centres = 5 + torch.rand(n, 3, generator=g) * 6
    radii = 2.5 + torch.rand(n, generator=g) * 2
    dist = (grid.unsqueeze(0) - centres.view(n, 3, 1, 1, 1)).norm(dim=1)
    target = (dist <= radii.view(n, 1, 1, 1)).long() * 2
    inputs = {m: torch.randn(n, 1, 16, 16, 16, generator=g) * 0.3 for m in SEQS}
    inputs["flair"] = inputs["flair"] + (target > 0).float().unsqueeze(1)
    return inputs, target


def test_tiny_model_learns_the_whole_tumour() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = UNet3D(UNet3DConfig(base=4, levels=3), SEQS, num_classes=4)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        inputs, target = _spheres(4, g)
        loss = dice_wce_loss(model(inputs).logits, target, 4)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    inputs, target = _spheres(8, g)
    with torch.no_grad():
        pred = model(inputs).logits.argmax(1)
    wt = brats_dice(pred, target)["wt"]
    empty = brats_dice(torch.zeros_like(target), target)["wt"]
    assert empty.max() < 1e-6
    assert wt.mean() > 0.6, wt
