"""Training-time frame augmentation: RandomResizedCrop + flip per frame, training only."""

from __future__ import annotations

import numpy as np
import torch

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
