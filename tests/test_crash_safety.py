"""Crash safety: `kill -9` of `mmval prep` and `mmval train` at a seeded random moment, then the
same command again, gives what an uninterrupted run gives; damaged checkpoints fall back."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from mmval.cli.main import app
from typer.testing import CliRunner

from mmval.artifacts.checkpoint import (
    CorruptCheckpoint,
    load_checkpoint,
    load_latest_payload,
    load_payload,
    save_payload,
)
from mmval.artifacts.layout import LAST, PREVIOUS
from mmval.data.pipeline import PrepCallbacks
from mmval.data.prep import prepare
from mmval.data.synthetic_av import SyntheticAVParams, write_synthetic_raw
from mmval.errors import UserError
from mmval.recipe import load_recipe
from mmval.runner import Trainer
from tests.conftest import Crash, crash_after

runner = CliRunner()
REPO = Path(__file__).parents[1]
PREP_SETS = ["modalities.0.size=[32,32]", "rows_per_shard=2"]


# One torch thread here and in the commands started: two cores shared with other processes make
# OpenMP's threads wait on each other (a tiny epoch took 6 s instead of 0.04 s), and the runs
# compared must use the same thread count.
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


def start_cli(args: list[str], cwd: Path) -> subprocess.Popen:
    """`python -m mmval ARGS` in its own process group (its workers die with the test)."""
    return subprocess.Popen(
        [sys.executable, "-m", "mmval", *args],
        cwd=cwd,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], delay: float) -> None:
    """SIGKILL `proc` (only it, as the OOM killer would) `delay` s after `ready()` holds."""
    deadline = time.monotonic() + 120
    while not ready():
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "the command never reached the kill point"
        time.sleep(0.005)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def reap_group(proc: subprocess.Popen, within: float = 20.0) -> bool:
    """Wait for what the killed command started (workers) to exit; True if they all did."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # our own group: never leave processes behind
    return False


def shard_rows(root: Path) -> list[dict]:
    """Every stored sample, all columns as Python values (media as bytes), by sample id."""
    rows = [r for p in sorted(root.glob("*/part-*.parquet")) for r in pq.read_table(p).to_pylist()]
    return sorted(rows, key=lambda r: r["sample_id"])


@pytest.mark.parametrize("seed", [0])
def test_prep_killed_at_a_random_moment_then_rerun_gives_the_same_shards(tmp_path, seed):
    rng = np.random.default_rng(seed)
    raw = tmp_path / "raw"
    params = SyntheticAVParams(
        layout="crema-d", classes=["NEU", "HAP", "SAD"], clips_per_class=3, seconds=1.0
    )
    write_synthetic_raw(raw, params)
    full = prepare("crema-d", tmp_path / "full", raw=raw, overrides=PREP_SETS, workers=1)
    shards = sum(len(s.shards) for s in full.manifest.splits.values())
    out = tmp_path / "out"
    args = ["prep", "crema-d", "--raw", str(raw), "--out", str(out), "--workers", "2"]
    args += [x for s in PREP_SETS for x in ("--set", s)]
    records = out / ".partial"
    after = int(rng.integers(1, shards - 2))  # finished shards before the kill point
    proc = start_cli(args, tmp_path)
    kill_when(
        proc,
        lambda: len(list(records.glob("*/*.json"))) >= after,
        float(rng.uniform(0, 0.05)),
    )
    assert reap_group(proc), "extraction workers outlived the killed prep"
    assert not (out / "manifest.json").exists()  # killed mid-run, not after it
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = (out / "manifest.json").read_text()
    assert manifest == (tmp_path / "full/manifest.json").read_text()  # same bytes per shard
    assert shard_rows(out) == shard_rows(tmp_path / "full")
    assert pq.read_table(out / "errors.parquet").equals(
        pq.read_table(tmp_path / "full/errors.parquet")
    )
    assert not list(out.rglob("*.tmp")) and not records.exists()


def test_an_exception_during_prep_leaves_no_worker_running(tmp_path):
    raw = tmp_path / "raw"
    params = SyntheticAVParams(layout="crema-d", classes=["NEU", "HAP"], clips_per_class=2)
    write_synthetic_raw(raw, params)
    seen = [0]

    def stop_after_three(ok: bool) -> None:
        seen[0] += 1
        if seen[0] == 3:
            raise Crash

    with pytest.raises(Crash) as caught:  # its traceback keeps prepare's frames alive
        prepare(
            "crema-d",
            tmp_path / "out",
            raw=raw,
            overrides=PREP_SETS,
            workers=2,
            callbacks=PrepCallbacks(on_clip=stop_after_three),
        )
    assert caught.traceback
    assert not [p for p in multiprocessing.active_children() if p.name == "mmval-prep"]


def test_prep_rerun_cleans_what_a_kill_after_the_manifest_left(tmp_path):
    """Killed between its manifest and its clean-up: the re-run verifies, keeps and tidies."""
    out = tmp_path / "syn"
    prepare("synthetic", out)
    (out / ".partial").mkdir()
    (out / ".partial/settings.json").write_text("{}")
    (out / "train/.part-00000.parquet.x1y2.tmp").write_bytes(b"half a shard")
    (out / ".index.parquet.abc.tmp").write_bytes(b"")
    assert not prepare("synthetic", out).wrote
    assert not list(out.rglob("*.tmp")) and not (out / ".partial").exists()


def _recipe(tmp_path: Path, synthetic_dir: Path, name: str, epochs: int) -> Path:
    raw = {
        "name": name,
        "seeds": [0],
        "data": {"path": str(synthetic_dir)},
        "model": {"encoder": {"hidden": [32], "out_dim": 16, "dropout": 0.1}},
        "method": {"name": "ogm_ge", "alpha": 0.5},
        "optim": {"name": "adam", "lr": 0.01, "scheduler": {"name": "step", "step_size": 3}},
        "train": {"epochs": epochs, "batch_size": 16, "device": "cpu"},
        "output": str(tmp_path / "runs"),
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _metrics(run: Path) -> pd.DataFrame:
    return pd.read_parquet(run / "metrics.parquet").drop(columns=["seconds", "data_seconds"])


def test_train_killed_mid_epoch_then_resumed_matches_an_uninterrupted_run(tmp_path, synthetic_dir):
    rng = np.random.default_rng(7)
    epochs = 40
    killed = _recipe(tmp_path, synthetic_dir, "killed", epochs)
    run = tmp_path / "runs/killed/seed0"
    proc = start_cli(["train", "--recipe", str(killed)], tmp_path)
    lines = int(rng.integers(1, epochs - 10))  # epochs logged before the kill point

    def logged() -> bool:
        log = run / "train.log"
        return log.is_file() and log.read_text().count("\n") >= lines

    kill_when(proc, logged, float(rng.uniform(0, 0.05)))
    assert not (run / "summary.json").exists()
    started = load_checkpoint(run / LAST).epoch
    assert 0 < started < epochs
    result = runner.invoke(app, ["train", "--recipe", str(killed)])
    assert result.exit_code == 2 and "--resume" in result.output
    result = runner.invoke(app, ["train", "--recipe", str(killed), "--resume"])
    assert result.exit_code == 0, result.output
    Trainer(load_recipe(_recipe(tmp_path, synthetic_dir, "straight", epochs)), 0).run()
    straight = tmp_path / "runs/straight/seed0"
    pd.testing.assert_frame_equal(_metrics(run), _metrics(straight))
    a, b = load_checkpoint(run / LAST).model, load_checkpoint(straight / LAST).model
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(run.glob(".*.tmp"))


def cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_truncated_last_checkpoint_resumes_from_the_previous_one(tmp_path, synthetic_dir, caplog):
    recipe = load_recipe(_recipe(tmp_path, synthetic_dir, "cut", 4))
    run = tmp_path / "runs/cut/seed0"
    with pytest.raises(Crash):
        Trainer(recipe, 0, callbacks=crash_after(3)).run()
    assert load_checkpoint(run / PREVIOUS).epoch == 2
    cut(run / LAST)
    (run / ".last.pt.k3j2.tmp").write_bytes(b"what a kill during a save leaves")
    with caplog.at_level(logging.WARNING, logger="mmval"):
        Trainer(recipe, 0, resume=True).run()
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "last.pt is truncated or damaged" in warning and "last.prev.pt" in warning
    assert (run / "last.pt.corrupt").is_file() and not list(run.glob(".*.tmp"))
    Trainer(load_recipe(_recipe(tmp_path, synthetic_dir, "whole", 4)), 0).run()
    pd.testing.assert_frame_equal(_metrics(run), _metrics(tmp_path / "runs/whole/seed0"))


def test_damaged_checkpoints_are_detected(tmp_path):
    good = tmp_path / "good.pt"
    save_payload(good, {"epoch": 1, "model": {"w": torch.arange(500.0)}})
    data = good.read_bytes()
    damaged = {
        "zero bytes": b"",
        "truncated": data[: len(data) // 2],
        "cut at the end": data[:-30],
        "flipped tensor byte": data.replace(
            torch.arange(500.0).numpy().tobytes()[400:408],
            bytes(b ^ 0xFF for b in torch.arange(500.0).numpy().tobytes()[400:408]),
        ),
    }
    for what, content in damaged.items():
        path = tmp_path / "last.pt"
        path.write_bytes(content)
        with pytest.raises(CorruptCheckpoint):
            load_payload(path)
        ckpt, used = load_latest_payload(path, good)
        assert used == good and ckpt["epoch"] == 1, what
    with pytest.raises(CorruptCheckpoint, match="no previous checkpoint"):
        load_latest_payload(tmp_path / "last.pt", tmp_path / "absent.pt")


def test_a_save_that_dies_midway_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    path, previous = tmp_path / "last.pt", tmp_path / "last.prev.pt"
    save_payload(path, {"epoch": 1}, previous=previous)
    save_payload(path, {"epoch": 2}, previous=previous)
    assert load_payload(previous)["epoch"] == 1

    def dies_midway(obj: object, f: Path) -> None:
        Path(f).write_bytes(b"PK\x03\x04 half")
        raise Crash

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(Crash):
        save_payload(path, {"epoch": 3}, previous=previous)
    assert load_payload(path)["epoch"] == 2 and load_payload(previous)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.prev.pt", "last.pt"]


def test_resume_without_a_good_checkpoint_exits_2(recipe_file, tmp_path):
    path = recipe_file(train__epochs=3)
    with pytest.raises(Crash):
        Trainer(load_recipe(path), 0, callbacks=crash_after(1)).run()
    run = tmp_path / "runs/tiny/seed0"
    assert not (run / PREVIOUS).exists()
    cut(run / LAST)
    result = runner.invoke(app, ["train", "--recipe", str(path), "--resume"])
    assert result.exit_code == 2
    assert "truncated or damaged" in result.output and "no previous checkpoint" in result.output


RAISING_STEP = """
import sys
import mmval.methods.base as base

def train_step(self, model, batch, ctx, tools):
    with tools.autocast():
        out = self.forward(model, batch, ctx)
        loss = self.loss(model, out, batch, ctx)
    if ctx.step == 2:
        next(iter(out.features.values())).mul_(2)  # autograd: modified by an inplace operation
    tools.zero_grad()
    loss.backward()
    tools.step()
    return base.StepResult(loss.detach(), out.logits.detach())

base.Method.train_step = train_step
from mmval.cli.main import app
app(sys.argv[1:], prog_name="mmval")
"""


@pytest.mark.parametrize("workers", [0, 2])
def test_an_exception_in_a_step_ends_the_process(recipe_file, tmp_path, workers):
    """Reported: a train_step error printed its traceback, then the process hung at exit."""
    script = tmp_path / "raising.py"
    script.write_text(RAISING_STEP)
    path = recipe_file(train__workers=workers, train__epochs=3)
    proc = subprocess.run(
        [sys.executable, str(script), "train", "--recipe", str(path)],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "modified by an inplace operation" in proc.stderr


def test_resume_refuses_a_changed_recipe(recipe_file):
    path = recipe_file(train__epochs=2)
    with pytest.raises(Crash):
        Trainer(load_recipe(path), 0, callbacks=crash_after(1)).run()
    changed = load_recipe(path, ["optim.lr=0.5"])
    with pytest.raises(UserError, match=r"differs in optim.lr \(was 0.01, now 0.5\)"):
        Trainer(changed, 0, resume=True).run()
    allowed = load_recipe(path, ["train.nonfinite=skip", "train.epochs=3"])
    assert Trainer(allowed, 0, resume=True).run().summary["epochs"] == 3
