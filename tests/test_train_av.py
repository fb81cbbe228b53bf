"""A tiny ResNet-18 audio-visual concat model trains on prepped synthetic shards and learns."""

from __future__ import annotations

from mmval.data.prep import prepare
from mmval.data.synthetic_av import SyntheticAVParams, write_synthetic_raw
from mmval.recipe import parse_recipe
from mmval.runner import Trainer


def test_resnet18_concat_learns_on_synthetic_av(tmp_path):
    classes = ["0", "1", "2"]
    write_synthetic_raw(
        tmp_path / "raw",
        SyntheticAVParams(
            layout="kinetics-sounds",
            classes=classes,
            clips_per_class=20,  # fewer made the result depend on the draw (0.33-0.96)
            seconds=2.0,
            visual_signal=1.0,
            audio_signal=0.8,
        ),
    )
    data = tmp_path / "ks"
    prepare(
        "kinetics-sounds",
        data,
        raw=tmp_path / "raw",
        workers=1,
        overrides=[
            "modalities.0.size=[32,32]",
            "modalities.0.pick=2",
            "modalities.1.target_frames=64",
            "modalities.1.num_mel_bins=32",
        ],
    )
    recipe = parse_recipe(
        {
            "name": "av",
            "seeds": [0],
            "data": {"path": str(data)},
            "model": {"encoder": {"kind": "resnet18"}, "fusion": "concat"},
            "method": {"name": "concat"},
            "optim": {"name": "adam", "lr": 0.001},
            "train": {"epochs": 10, "batch_size": 8},
            "output": str(tmp_path / "runs"),
        },
        "test",
    )
    summary = Trainer(recipe, 0).run().summary
    assert summary["final_test_acc"] > 0.6  # chance is 1/3
