"""Shared fixtures: small prepared data sets and a recipe factory for fast CPU training."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml

from mmval.data.prep import prepare
from mmval.data.shards import check_data_dir
from mmval.engine.loop import Callback, Fit
from mmval.methods import MethodConfig
from mmval.recipe import Recipe, parse_recipe
from mmval.runner import RunResult, Trainer


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


TINY_MLP = {"kind": "mlp", "hidden": [32], "out_dim": 16, "dropout": 0.1}


def merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` with `changes` merged in, nested dicts key by key."""
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def filled(value: Any, prepared: dict[str, Any]) -> Any:
    """`value` with every string naming a key of `prepared` (a placeholder of
    `MethodConfig.quick`) replaced by what it stands for."""
    if isinstance(value, dict):
        return {k: filled(v, prepared) for k, v in value.items()}
    if isinstance(value, str) and value in prepared:
        return prepared[value]
    return value


def quick_modalities(config: type[MethodConfig], data: Path) -> list[str]:
    """The first views of `data` that the method takes: two, or what it needs."""
    names = [spec.name for spec in check_data_dir(data).modalities]
    count = max(config.min_modalities, 2)
    if config.max_modalities is not None:
        count = min(count, config.max_modalities)
    return names[:count]


def quick_recipe(
    name: str,
    data: Path,
    output: Path,
    *,
    run: str | None = None,
    prepared: dict[str, Any] | None = None,
    encoder: dict[str, Any] | None = None,
    epochs: int = 3,
    batch_size: int = 128,
    lr: float = 3e-3,
    changes: dict[str, Any] | None = None,
) -> Recipe:
    """A short run of the registered method `name` with its declared quick settings, on the
    modalities it takes, with its own fusion unless `changes` name one."""
    from mmval.methods import METHODS

    config = METHODS[name].Config
    raw: dict[str, Any] = {
        "name": run or name,
        "seeds": [0],
        "data": {"path": str(data), "modalities": quick_modalities(config, data)},
        "model": {"encoder": encoder or TINY_MLP},
        "method": {"name": name},
        "optim": {"name": "adam", "lr": lr},
        "train": {"epochs": epochs, "batch_size": batch_size},
        "output": str(output),
    }
    raw = merged(merged(raw, filled(config.quick, prepared or {})), changes or {})
    return parse_recipe(raw, "test")


def trained(recipe: Recipe) -> tuple[RunResult, pd.DataFrame]:
    """Train `recipe` (seed 0); its result and metrics table."""
    result = Trainer(recipe, 0).run()
    return result, pd.read_parquet(result.run_dir / "metrics.parquet")


def assert_trained(summary: dict[str, Any], metrics: pd.DataFrame, epochs: int) -> None:
    """The run finished all its epochs and its train loss fell."""
    assert summary["finished"] and len(metrics) == epochs
    assert metrics["train_loss"].iloc[-1] < metrics["train_loss"].iloc[0]


def timeless_metrics(run_dir: Path) -> pd.DataFrame:
    """A run's metrics table without its timings (`seconds`, `data_seconds`, a method's own
    `..._seconds`): what a resumed run must reproduce."""
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    return metrics.drop(columns=[c for c in metrics.columns if c.endswith("seconds")])


def assert_resume_matches(straight: Recipe, stop: int = 2) -> pd.DataFrame:
    """Run `straight`, and a copy killed after `stop` epochs then resumed: the same metrics
    (returned, without timings). Killed, not trained with fewer epochs, since some methods
    schedule by `train.epochs` (CMoB's phases, ...)."""
    broken = straight.model_copy(update={"name": f"{straight.name}-resumed"})
    a = Trainer(straight, 0).run().run_dir
    with pytest.raises(Crash):
        Trainer(broken, 0, callbacks=crash_after(stop)).run()
    b = Trainer(broken, 0, resume=True).run().run_dir
    metrics = timeless_metrics(a)
    pd.testing.assert_frame_equal(metrics, timeless_metrics(b))
    return metrics


@pytest.fixture
def one_thread():
    """Two cores shared with other processes: one torch thread avoids OpenMP's waits (modules
    that start many small runs use it through `pytestmark`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ave_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fake AVE release (tests/ave_raw.py, 160 rows, no defects) prepared as
    `ave-localisation`: the localisation tests' data, prepared once."""
    from tests.ave_raw import write_ave

    root = tmp_path_factory.mktemp("ave")
    write_ave(root / "raw", rows=160, defects=False)
    prepare("ave-localisation", root / "data", raw=root / "raw", workers=1)
    return root / "data"


@pytest.fixture(scope="session")
def brats_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 fake BraTS 2018 cases of 16^3 voxels (tests/brats_raw.py) prepared as `brats2018`,
    a quarter of the training folds as validation: the segmentation tests' data."""
    from tests.brats_raw import write_brats

    root = tmp_path_factory.mktemp("brats")
    write_brats(root / "raw", hgg=16, lgg=8, corrupt=False)
    prepare(
        "brats2018",
        root / "data",
        raw=root / "raw",
        overrides=["shape=[16,16,16]", "val_fraction=0.25"],
        workers=1,
    )
    return root / "data"
