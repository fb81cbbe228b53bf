"""Test-time corruptions (`mmval value --method subsets --corrupt MODALITY=KIND:LEVEL`): QMF's
definitions re-implemented independently on fixed tensors, level 0 as the identity, and the
same draws for the same (seed, repeat, sample)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from mmval.data.shards import ModalitySpec
from mmval.errors import UserError
from mmval.valuation.corrupt import Corruption, _stream, corrupt_inputs
from mmval.valuation.subsets import subsets_checkpoint
from tests.test_subsets import checkpoint  # noqa: F401 (the fixture)
from tests.test_valuation_cli import invoke

FRAMES = ModalitySpec(name="image", dtype="uint8", shape=[1, 32, 32, 3], encoding="jpeg")
VECTOR = ModalitySpec(name="vec", dtype="float32", shape=[64])
SPECS = {"image": FRAMES, "vec": VECTOR}


def _batch(n: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "image": torch.randint(0, 256, (n, 1, 32, 32, 3), generator=g, dtype=torch.uint8),
        "vec": torch.randn(n, 64, generator=g),
    }


def _apply(text: str, inputs: dict[str, torch.Tensor], seed: int = 0, repeat: int = 0):
    positions = torch.arange(len(inputs["vec"]))
    return corrupt_inputs(
        inputs, positions, [Corruption.parse(text)], SPECS, seed=seed, repeat=repeat
    )


@pytest.mark.parametrize("kind", ["gaussian", "salt-pepper", "mask"])
def test_level_zero_changes_nothing(kind):
    inputs = _batch()
    for modality in ("image", "vec"):
        out = _apply(f"{modality}={kind}:0", inputs)
        assert all(torch.equal(out[m], inputs[m]) for m in inputs)


def test_the_same_seed_gives_the_same_input_whatever_the_batch():
    inputs = _batch()
    whole = _apply("image=gaussian:10", inputs)["image"]
    assert torch.equal(whole, _apply("image=gaussian:10", inputs)["image"])
    half = corrupt_inputs(
        {m: x[32:] for m, x in inputs.items()},
        torch.arange(32, 64),
        [Corruption.parse("image=gaussian:10")],
        SPECS,
        seed=0,
        repeat=0,
    )["image"]
    assert torch.equal(half, whole[32:])
    assert not torch.equal(whole, _apply("image=gaussian:10", inputs, repeat=1)["image"])
    assert not torch.equal(whole, _apply("image=gaussian:10", inputs, seed=1)["image"])


def test_gaussian_is_qmfs_on_pixels():
    """QMF `AddGaussianNoise(variance=10 L)` under `RandomApply(p=0.5)`: N(0, 10 L) noise, one
    map [H, W, 1] for every channel, clipped and truncated to uint8 (both ends clipped here)."""
    level, inputs = 5.0, _batch()
    out = _apply(f"image=gaussian:{level:g}", inputs)["image"].numpy()
    for i, image in enumerate(inputs["image"].numpy()):
        g = torch.Generator().manual_seed(_stream(0, 0, i, 0))
        if float(torch.rand((), generator=g)) >= 0.5:
            assert np.array_equal(out[i], image)
            continue
        noise = torch.randn((1, 32, 32, 1), generator=g, dtype=torch.float64).numpy()
        expected = np.clip(image.astype(np.float64) + 10 * level * noise, 0, 255).astype(np.uint8)
        assert np.array_equal(out[i], expected)
    changed = (out != inputs["image"].numpy()).any(axis=(1, 2, 3, 4))
    assert 0.3 < changed.mean() < 0.7  # p = 0.5 per sample


def test_salt_pepper_is_qmfs_on_pixels():
    """`RandomApply(p=0.5)` of `AddSaltPepperNoise(density=0.1, p=L/100)`: 5 % pepper and 5 %
    salt at the same positions in every channel."""
    inputs = {m: x.repeat(8, *[1] * (x.dim() - 1)) for m, x in _batch().items()}
    out = _apply("image=salt-pepper:100", inputs)["image"]
    changed = (out != inputs["image"]).flatten(1).any(1)
    assert 0.35 < changed.float().mean() < 0.65  # 0.5 x 100/100
    hit = out[changed]
    salt = (hit == 255).all(-1).float().mean()
    pepper = (hit == 0).all(-1).float().mean()
    assert 0.04 < float(salt) < 0.07 and 0.04 < float(pepper) < 0.07
    rare = _apply("image=salt-pepper:10", inputs)["image"]
    assert (rare != inputs["image"]).flatten(1).any(1).float().mean() < 0.15  # 0.5 x 10/100


def test_mask_covers_the_level_share_of_the_area_or_time():
    inputs = _batch()
    out = _apply("image=mask:25", inputs)["image"]
    zeroed = (out == 0).all(-1) & (inputs["image"] != 0).any(-1)
    assert ((out != inputs["image"]).any(-1) <= (out == 0).all(-1)).all()
    assert int(zeroed[0].sum()) <= 16 * 16 and int((out[0] == 0).all(-1).sum()) >= 16 * 16
    vec = _apply("vec=mask:50", inputs)["vec"]
    assert ((vec == 0).sum(1) >= 32).all()


def test_corruption_specs_and_refusals():
    assert str(Corruption.parse("image=gaussian:5")) == "image=gaussian:5"
    for bad in ("image", "image=blur:5", "image=mask:150"):
        with pytest.raises(UserError):
            Corruption.parse(bad)
    tokens = ModalitySpec(name="text", dtype="int32", shape=[8], encoding="tokens")
    with pytest.raises(UserError, match="text"):
        corrupt_inputs(
            {"text": torch.zeros(2, 8, dtype=torch.int32)},
            torch.arange(2),
            [Corruption.parse("text=gaussian:5")],
            {"text": tokens},
            seed=0,
            repeat=0,
        )


def test_the_subsets_table_under_corruption(checkpoint):  # noqa: F811
    clean = subsets_checkpoint(checkpoint).table
    level0 = subsets_checkpoint(checkpoint, corruptions=[Corruption.parse("a=gaussian:0")])
    pd.testing.assert_frame_equal(clean, level0.table)
    noisy = subsets_checkpoint(
        checkpoint, corruptions=[Corruption.parse("a=gaussian:10")], repeats=3, seed=4
    )
    assert sorted(noisy.table["repeat"].unique()) == [0, 1, 2]
    assert noisy.metadata["mmval.corruptions"] == '["a=gaussian:10"]'
    assert noisy.metadata["mmval.repeats"] == "3" and noisy.metadata["mmval.seed"] == "4"
    untouched = noisy.table[noisy.table["subset"] == "b+c"]
    for _, part in untouched.groupby("repeat"):  # a is not in the subset: nothing changes
        assert part["pred"].tolist() == clean[clean["subset"] == "b+c"]["pred"].tolist()
    refused = invoke(checkpoint, "--corrupt", "a=gaussian:5")
    assert refused.exit_code == 2 and "--method subsets" in refused.output
    unknown = invoke(checkpoint, "--method", "subsets", "--corrupt", "z=gaussian:5")
    assert unknown.exit_code == 2
