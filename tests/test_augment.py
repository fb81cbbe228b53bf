"""Training-time frame augmentation: RandomResizedCrop + flip per frame, training only."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mmval.data.dataset import FrameAugment, ParquetSamples, random_resized_crop


def _gradient(h: int = 24, w: int = 32) -> np.ndarray:
    x = np.broadcast_to(np.linspace(0, 255, w)[None, :, None], (h, w, 3))
    return np.ascontiguousarray(x.round().astype(np.uint8))


def test_whole_frame_crop_is_identity_or_mirror() -> None:
    frame = _gradient()
    keep = FrameAugment(crop_scale=(1.0, 1.0), crop_ratio=(32 / 24, 32 / 24), hflip=0.0)
    assert np.array_equal(random_resized_crop(frame, keep, np.random.default_rng(0)), frame)
    mirror = FrameAugment(crop_scale=(1.0, 1.0), crop_ratio=(32 / 24, 32 / 24), hflip=1.0)
    assert np.array_equal(
        random_resized_crop(frame, mirror, np.random.default_rng(0)), frame[:, ::-1]
    )


def test_crop_zooms_into_part_of_the_frame() -> None:
    frame = _gradient()
    small = FrameAugment(crop_scale=(0.1, 0.1), hflip=0.0)
    out = random_resized_crop(frame, small, np.random.default_rng(3))
    assert out.shape == frame.shape and out.dtype == np.uint8
    # a tenth of the area, resized back: the horizontal ramp is steeper and spans less range
    assert np.ptp(out[..., 0]) < 0.6 * np.ptp(frame[..., 0])
    assert np.all(np.diff(out[0, :, 0].astype(int)) >= 0)  # still a left-to-right ramp


def test_crop_bytes_match_the_plain_formulation() -> None:
    """The single-copy output path gives the bytes of the plain one: resize the crop as float,
    round, clamp, cast to uint8, go back to HWC, mirror the view."""
    augment = FrameAugment()
    for seed in range(40):
        rng = np.random.default_rng(seed)
        frame = rng.integers(0, 256, (int(rng.integers(20, 60)), int(rng.integers(20, 60)), 3))
        frame = frame.astype(np.uint8)
        out = random_resized_crop(frame, augment, np.random.default_rng([seed, 1]))
        # the same draws again, then the plain formulation on the crop they pick
        draws = np.random.default_rng([seed, 1])
        box = None
        for _ in range(10):
            target = frame.size // 3 * draws.uniform(*augment.crop_scale)
            ratio = float(np.exp(draws.uniform(*np.log(augment.crop_ratio))))
            w, h = round(np.sqrt(target * ratio)), round(np.sqrt(target / ratio))
            if 0 < w <= frame.shape[1] and 0 < h <= frame.shape[0]:
                top = int(draws.integers(0, frame.shape[0] - h + 1))
                box = (top, int(draws.integers(0, frame.shape[1] - w + 1)), h, w)
                break
        if box is None:  # the fallback crop: covered by the whole-frame test above
            continue
        top, left, h, w = box
        patch = torch.from_numpy(np.ascontiguousarray(frame[top : top + h, left : left + w]))
        resized = F.interpolate(
            patch.permute(2, 0, 1)[None].float(),
            size=frame.shape[:2],
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )[0]
        plain = resized.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        plain = plain[:, ::-1] if draws.random() < augment.hflip else plain
        assert out.flags.c_contiguous and np.array_equal(out, plain), seed


def test_loader_augments_train_only_and_repeatably(synthetic_av_dir) -> None:
    augment = FrameAugment()
    train = ParquetSamples(synthetic_av_dir, "train", ["visual"], train=True, augment=augment)
    plain = ParquetSamples(synthetic_av_dir, "train", ["visual"], train=True)
    evaluation = ParquetSamples(synthetic_av_dir, "test", ["visual"], augment=augment)
    assert evaluation.augment is None
    first = train[0].inputs["visual"]
    assert torch.equal(first, train[0].inputs["visual"])  # same (seed, epoch, sample)
    assert not torch.equal(first, plain[0].inputs["visual"])
    train.set_epoch(1)
    assert not torch.equal(first, train[0].inputs["visual"])
