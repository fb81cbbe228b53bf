"""Shared fixtures: small prepared data sets and a recipe factory for fast CPU training."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from mmval.data.prep import prepare
from mmval.engine.loop import Callback, Fit


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three modalities, 4 classes, 60/10/20 samples per class: trains in a second."""
    out = tmp_path_factory.mktemp("data") / "synthetic3"
    prepare(
        "synthetic",
        out,
        overrides=[
            "modalities=[a,b,c]",
            "dims=[8,8,8]",
            "signal=[1.0,0.5,0.2]",
            "per_class={train: 60, val: 10, test: 20}",
        ],
    )
    return out


@pytest.fixture(scope="session")
def synthetic_av_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Kinetics-Sounds layout, 3 classes x 6 clips of 2 s, prepped small: 2 frames of 32x32 and a
    64 x 32 fbank per clip. For method integration tests on audio-visual shards."""
    from mmval.data.synthetic_av import SyntheticAVParams, write_synthetic_raw

    root = tmp_path_factory.mktemp("synthetic-av")
    params = SyntheticAVParams(
        layout="kinetics-sounds", classes=["0", "1", "2"], clips_per_class=6, seconds=2.0
    )
    write_synthetic_raw(root / "raw", params)
    out = root / "ks"
    prepare(
        "kinetics-sounds",
        out,
        raw=root / "raw",
        workers=1,
        overrides=[
            "modalities.0.size=[32,32]",
            "modalities.0.pick=2",
            "modalities.1.target_frames=64",
            "modalities.1.num_mel_bins=32",
        ],
    )
    return out


@pytest.fixture(scope="session")
def uci_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "uci-mfeat"
    prepare("uci-mfeat", out)
    return out


@pytest.fixture
def recipe_file(tmp_path: Path, synthetic_dir: Path):
    """Write a small valid recipe (optionally changed) and return its path."""

    def make(**changes: object) -> Path:
        raw: dict = {
            "name": "tiny",
            "seeds": [0],
            "data": {"path": str(synthetic_dir)},
            "model": {"encoder": {"hidden": [16], "out_dim": 8, "dropout": 0.1}},
            "method": {"name": "concat"},
            "optim": {"name": "adam", "lr": 0.01},
            "train": {"epochs": 2, "batch_size": 32},
            "output": str(tmp_path / "runs"),
        }
        for dotted, value in changes.items():
            node = raw
            keys = dotted.split("__")
            for key in keys[:-1]:
                node = node.setdefault(key, {})
            if value is DELETE:
                node.pop(keys[-1], None)
            else:
                node[keys[-1]] = value
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    return make


DELETE = "__delete__"  # a value meaning: remove this key


class Crash(Exception):
    """Stands in for a kill between epochs (raised by `crash_after`)."""


class EpochHook(Callback):
    """Calls `hook(row)` after each epoch, once the run saved it: what a test watches or kills
    a run with."""

    def __init__(self, hook: Callable[[dict[str, float]], None]) -> None:
        self.hook = hook

    def on_epoch_end(self, fit: Fit, row: dict[str, float]) -> None:
        self.hook(row)


def crash_after(epoch: int) -> list[Callback]:
    """Callbacks that raise `Crash` once `epoch` (counted from 1) is done."""

    def crash(row: dict[str, float]) -> None:
        if row["epoch"] == epoch:
            raise Crash

    return [EpochHook(crash)]
