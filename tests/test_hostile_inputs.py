"""Hostile inputs: crafted checkpoints, broken media, damaged shards, bad recipes, NaN losses.
Each ends in a clear refusal (exit 2), an errors-table row, or the recipe's non-finite policy;
never in code running, a crash or a hang."""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import pickle
import shutil
import signal
import time
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from mmval.cli.main import app
from typer.testing import CliRunner

from mmval.artifacts.checkpoint import FORMAT, load_checkpoint
from mmval.artifacts.layout import LAST, PREVIOUS
from mmval.data import shards as shards_module
from mmval.data.extract.video import decode_jpeg
from mmval.data.pipeline import ClipTask, PrepPlan, run_plan
from mmval.data.prep import prepare
from mmval.data.shards import (
    DatasetHeader,
    ModalitySpec,
    SampleRecord,
    check_data_dir,
    sha256_file,
)
from mmval.data.sources import av_clips
from mmval.data.synthetic_av import SyntheticAVParams, write_synthetic_raw
from mmval.engine.loop import NonFiniteLoss
from mmval.errors import UserError
from mmval.methods.base import Method
from mmval.recipe import Recipe, load_recipe
from mmval.runner import Trainer
from mmval.settings import normalised
from tests.conftest import EpochHook

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ checkpoints that run code
class RunsCode:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def craft(path: Path, marker: Path, kind: str) -> None:
    if kind == "torch zip":
        torch.save({"format": FORMAT, "model": {}, "epoch": 1, "x": RunsCode(marker)}, path)
        torch.load(path, weights_only=False)  # the payload is live: plain unpickling runs it
    else:  # a bare pickle, which torch.load reads as its legacy format
        path.write_bytes(pickle.dumps(RunsCode(marker), protocol=2))
        pickle.loads(path.read_bytes())
    assert marker.exists()
    marker.unlink()


@pytest.mark.parametrize("kind", ["torch zip", "pickle"])
def test_a_checkpoint_that_runs_code_is_refused_by_value_and_resume(recipe_file, tmp_path, kind):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    craft(evil, marker, kind)
    result = runner.invoke(app, ["value", str(evil), "--out", str(tmp_path / "v.parquet")])
    assert result.exit_code == 2 and "refuses to unpickle" in result.output
    assert not marker.exists()

    path = recipe_file(train__epochs=3)

    def crash(row: dict[str, float]) -> None:
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(load_recipe(path), 0, callbacks=[EpochHook(crash)]).run()
    run = tmp_path / "runs/tiny/seed0"
    shutil.copyfile(run / LAST, run / PREVIOUS)  # a good fallback must not be used instead
    craft(run / LAST, marker, kind)
    result = runner.invoke(app, ["train", "--recipe", str(path), "--resume"])
    assert result.exit_code == 2, result.output
    assert "last.pt" in result.output and "refuses to unpickle" in result.output
    assert not marker.exists()


# ------------------------------------------------------------------------------ broken media
def write_clip(
    path: Path,
    *,
    frame_times: list[float] | None,
    audio_seconds: float | None,
    size: tuple[int, int] = (32, 32),
    pix_fmt: str = "yuv420p",
) -> None:
    """An mp4 with H.264 frames shown at `frame_times` (seconds; any spacing) and/or AAC audio."""
    rng = np.random.default_rng(len(path.name))
    with av.open(str(path), "w", format="mp4") as container:
        video = audio = None  # both streams exist before the first packet is written
        if frame_times is not None:
            video = container.add_stream("libx264", rate=1000, options={"threads": "1"})
            video.height, video.width = size
            video.pix_fmt = pix_fmt
        if audio_seconds is not None:
            audio = container.add_stream("aac", rate=16000)
            audio.layout = "mono"
        if video is not None:
            for t in frame_times or []:
                image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame.pts = round(t * 1000)  # the stream's rate 1000: pts in milliseconds
                container.mux(video.encode(frame))
            container.mux(video.encode())
        if audio is not None:
            wave = (0.1 * rng.standard_normal(round((audio_seconds or 0) * 16000))).astype(
                np.float32
            )
            for start in range(0, len(wave), 1024):
                chunk = wave[None, start : start + 1024]
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
                frame.sample_rate, frame.pts = 16000, start
                container.mux(audio.encode(frame))
            container.mux(audio.encode())


def every(seconds: float, fps: float) -> list[float]:
    return [i / fps for i in range(round(seconds * fps))]


VFR_TIMES = [0.0, 0.1, 0.2, 0.55, 0.9, 1.0, 1.1, 1.133, 1.9, 2.02, 2.6, 2.95, 3.0, 3.4]
HOSTILE = {  # what replaces a clip -> where it must end (None: either is fine)
    "zero-byte": "empty file",
    "truncated": "undecodable",
    "corrupt": None,
    "audio-only": "no video stream",
    "video-only": "no audio stream",
    "very short": "too short",
    "very long": "shards",
    "odd-sized": "shards",
    "variable frame rate": "shards",
}


def make_hostile(kind: str, path: Path) -> None:
    normal = path.read_bytes()
    if kind == "zero-byte":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(normal[: len(normal) * 3 // 5])
    elif kind == "corrupt":
        noise = np.random.default_rng(1).integers(0, 256, len(normal) // 3, dtype=np.uint8)
        path.write_bytes(normal[: len(normal) // 3] + noise.tobytes() + normal[-len(normal) // 3 :])
    elif kind == "audio-only":
        write_clip(path, frame_times=None, audio_seconds=2.0)
    elif kind == "video-only":
        write_clip(path, frame_times=every(2.0, 10), audio_seconds=None)
    elif kind == "very short":
        write_clip(path, frame_times=every(0.2, 10), audio_seconds=0.2)
    elif kind == "very long":  # 20 times the 10 s window (1 fps, 10 frames) the recipe reads
        write_clip(path, frame_times=every(200.0, 1), audio_seconds=200.0, size=(16, 16))
    elif kind == "odd-sized":
        write_clip(
            path, frame_times=every(2.0, 10), audio_seconds=2.0, size=(33, 47), pix_fmt="yuv444p"
        )
    else:
        write_clip(path, frame_times=VFR_TIMES, audio_seconds=3.5)


def source_frame_times(path: Path) -> list[float]:
    """Independent reference: the presentation time of every frame, from a full decode."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [float(f.pts * stream.time_base) for f in container.decode(stream)]


def test_every_broken_clip_ends_in_the_shards_or_the_errors_table(tmp_path):
    raw = tmp_path / "raw"
    params = SyntheticAVParams(
        layout="kinetics-sounds", classes=["0", "1", "2"], clips_per_class=2, seconds=2.0
    )
    clips = write_synthetic_raw(raw, params)
    hostile = dict(zip(HOSTILE, clips, strict=False))
    for kind, clip in hostile.items():
        make_hostile(kind, clip.video)
    started = time.monotonic()
    result = prepare(
        "kinetics-sounds",
        tmp_path / "out",
        raw=raw,
        workers=2,
        clip_timeout=60,
        overrides=["modalities.0.size=[32,32]", "modalities.1.target_frames=64"],
    )
    assert time.monotonic() - started < 60
    errors = pd.read_parquet(tmp_path / "out/errors.parquet")
    reasons = dict(zip(errors["source"], errors["reason"], strict=True))
    manifest = result.manifest
    stored = {}
    for split in manifest.splits.values():
        for shard in split.shards:
            for row in pq.read_table(tmp_path / "out" / shard.path).to_pylist():
                stored[row["sample_id"]] = row
    for clip in clips:
        source = str(clip.video.relative_to(raw))
        assert (clip.clip_id in stored) != (source in reasons), clip.clip_id  # exactly one
    assert all(reasons.values())
    for kind, where in HOSTILE.items():
        clip = hostile[kind]
        source = str(clip.video.relative_to(raw))
        if where == "shards":
            assert clip.clip_id in stored, (kind, reasons.get(source))
        elif where is not None:
            assert where in reasons[source], (kind, reasons.get(source))
    long = stored[hostile["very long"].clip_id]
    assert len(long["visual"]) == 10 and long["visual_t"][-1] == 9.0
    odd = decode_jpeg(stored[hostile["odd-sized"].clip_id]["visual"])
    assert odd.shape == (2, 32, 32, 3)
    vfr = stored[hostile["variable frame rate"].clip_id]
    source_times = source_frame_times(hostile["variable frame rate"].video)
    want = [min(t for t in source_times if t >= target - 1e-6) for target in range(4)]
    assert np.allclose(vfr["visual_t"], want, atol=1e-3)  # first frame at or after each second


def scripted_extract(task: ClipTask) -> SampleRecord:
    """A fake extractor whose clip says how to misbehave."""
    action = task.inline["do"]
    if action == "hang":
        time.sleep(600)
    elif action == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "raise":
        raise RuntimeError("decoder bug")
    value = np.full(2, task.label, np.float32)
    return SampleRecord(task.sample_id, task.label, task.source, {"x": value})


@pytest.mark.parametrize("workers", [1, 2])
def test_a_hung_or_crashed_extraction_becomes_an_error_not_a_hang(tmp_path, workers):
    actions = ["ok", "hang", "ok", "die", "raise", "ok", "ok"]
    tasks = [
        ClipTask(f"c{i}", i % 2, f"clips/{i}.mp4", {}, inline={"do": a})
        for i, a in enumerate(actions)
    ]
    spec = ModalitySpec(name="x", dtype="float32", shape=[2])
    plan = PrepPlan(["a", "b"], [spec], {}, {"train": tasks}, scripted_extract, rows_per_shard=3)
    header = DatasetHeader("fake", "1", "0" * 64, ["a", "b"], [spec], {})
    started = time.monotonic()
    manifest, summary = run_plan(plan, tmp_path, header, workers=workers, clip_timeout=1.0)
    assert time.monotonic() - started < 30
    errors = pd.read_parquet(tmp_path / "errors.parquet").set_index("source")["reason"]
    assert errors["clips/1.mp4"].startswith("timeout: no result after 1 s")
    assert errors["clips/3.mp4"] == f"worker process died (exit code {-signal.SIGKILL})"
    assert errors["clips/4.mp4"] == "RuntimeError: decoder bug"
    assert summary.splits["train"].written == 4 and manifest.splits["train"].samples == 4
    table = pd.concat(
        pq.read_table(tmp_path / s.path).to_pandas() for s in manifest.splits["train"].shards
    )
    assert sorted(table["sample_id"]) == ["c0", "c2", "c5", "c6"]


def frozen_objects(task: ClipTask) -> SampleRecord:
    """A fake extractor that reports how many inherited objects its worker's collector skips."""
    if task.inline["do"] == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    value = np.array([gc.get_freeze_count(), task.label], np.float32)
    return SampleRecord(task.sample_id, task.label, task.source, {"x": value})


def test_workers_leave_the_objects_they_inherit_alone(tmp_path):
    # frozen before each fork (a replacement worker's too), thawed in the parent right after:
    # a worker's garbage collector never copies the parent's pages by walking its objects
    tasks = [
        ClipTask(f"c{i}", i % 2, f"clips/{i}.mp4", {}, inline={"do": a})
        for i, a in enumerate(["ok", "die", "ok", "ok"])
    ]
    spec = ModalitySpec(name="x", dtype="float32", shape=[2])
    plan = PrepPlan(["a", "b"], [spec], {}, {"train": tasks}, frozen_objects, rows_per_shard=4)
    header = DatasetHeader("fake", "1", "0" * 64, ["a", "b"], [spec], {})
    assert gc.get_freeze_count() == 0
    manifest, _ = run_plan(plan, tmp_path, header, workers=1)
    assert gc.get_freeze_count() == 0
    table = pq.read_table(tmp_path / manifest.splits["train"].shards[0].path)
    frozen = [np.frombuffer(v, np.float32)[0] for v in table.column("x").to_pylist()]
    assert len(frozen) == 3 and min(frozen) > 1000


HANGS_ON = {"clip": ""}
_real_extract_clip = av_clips.extract_clip


def extract_or_hang(params: av_clips.AVParams, task: ClipTask) -> SampleRecord:
    if task.sample_id == HANGS_ON["clip"]:
        time.sleep(600)  # a decoder stuck in a broken file
    return _real_extract_clip(params, task)


def test_prep_cli_clip_timeout(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    params = SyntheticAVParams(
        layout="crema-d", classes=["NEU", "HAP", "SAD"], clips_per_class=3, seconds=1.0
    )
    clips = write_synthetic_raw(raw, params)
    monkeypatch.setattr(av_clips, "extract_clip", extract_or_hang)
    monkeypatch.setitem(HANGS_ON, "clip", clips[0].clip_id)
    out = tmp_path / "out"
    args = ["prep", "crema-d", "--raw", str(raw), "--out", str(out), "--workers", "2"]
    args += ["--set", "modalities.0.size=[32,32]", "--clip-timeout", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output  # 1 failure of 18 is under --max-failures
    errors = pd.read_parquet(out / "errors.parquet")
    assert errors["reason"].tolist() == ["timeout: no result after 1 s (worker killed)"]
    assert errors["source"][0].endswith(f"{clips[0].clip_id}.flv")
    result = runner.invoke(app, [*args[:-1], "0"])
    assert result.exit_code == 2 and "clip-timeout" in result.output


# ---------------------------------------------------------------------------- damaged shards
@pytest.fixture
def data_copy(tmp_path, synthetic_dir) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(synthetic_dir, copy)
    return copy


def first_shard(data: Path) -> Path:
    manifest = json.loads((data / "manifest.json").read_text())
    return data / manifest["splits"]["train"]["shards"][0]["path"]


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def rename_a_column(data: Path) -> None:
    """A shard rewritten with column b as b2; the manifest updated to its size and sha256."""
    path = first_shard(data)
    table = pq.read_table(path)
    renamed = table.rename_columns(["b2" if n == "b" else n for n in table.column_names])
    pq.write_table(renamed, path, row_group_size=64)
    manifest = json.loads((data / "manifest.json").read_text())
    for shard in manifest["splits"]["train"]["shards"]:
        if data / shard["path"] == path:
            shard.update(bytes=path.stat().st_size, sha256=sha256_file(path))
    (data / "manifest.json").write_text(json.dumps(manifest))


def reshape_in_manifest(data: Path) -> None:
    """The manifest says modality a is [2, 4]; the shards hold [8] (same bytes per sample)."""
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["modalities"][0]["shape"] = [2, 4]
    (data / "manifest.json").write_text(json.dumps(manifest))


def index_without_rows(data: Path) -> None:
    index = pq.read_table(data / "index.parquet")
    pq.write_table(index.drop(["row"]), data / "index.parquet")


DAMAGE = {
    "bad checksum": (lambda d: flip_a_byte(first_shard(d)), "does not match its sha256"),
    "missing shard": (lambda d: first_shard(d).unlink(), "is missing"),
    "missing errors table": (
        lambda d: (d / "errors.parquet").unlink(),
        "errors.parquet is missing",
    ),
    "shard schema": (rename_a_column, "no column 'b'"),
    "manifest shape": (reshape_in_manifest, "column 'a'"),
    "index schema": (index_without_rows, "index.parquet does not have the schema"),
    "manifest not json": (lambda d: (d / "manifest.json").write_text("{"), "manifest.json"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_shards_exit_2_naming_the_file(recipe_file, data_copy, damage):
    harm, message = DAMAGE[damage]
    path = recipe_file(data__path=str(data_copy), train__epochs=1)
    shard = first_shard(data_copy).relative_to(data_copy)
    harm(data_copy)
    result = runner.invoke(app, ["train", "--recipe", str(path)])
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())
    assert message in output
    if damage in ("bad checksum", "missing shard", "shard schema"):
        assert str(shard) in output


def test_value_checks_the_shards_and_verified_shards_are_not_hashed_again(
    recipe_file, data_copy, tmp_path, monkeypatch
):
    path = recipe_file(data__path=str(data_copy), train__epochs=1)
    assert runner.invoke(app, ["train", "--recipe", str(path)]).exit_code == 0
    assert (data_copy / ".verified.json").is_file()
    hashed: list[Path] = []

    def counting_sha256(p: Path) -> str:
        hashed.append(p)
        return sha256_file(p)

    monkeypatch.setattr(shards_module, "sha256_file", counting_sha256)
    check_data_dir(data_copy, verify_checksums=True, cached=True)
    assert hashed == []  # unchanged since the training run verified them
    shard = first_shard(data_copy)
    flip_a_byte(shard)
    ckpt = tmp_path / "runs/tiny/seed0/best.pt"
    result = runner.invoke(app, ["value", str(ckpt), "--out", str(tmp_path / "v.parquet")])
    assert result.exit_code == 2
    assert f"{shard.relative_to(data_copy)} does not match its sha256" in result.output
    assert hashed == [shard]


# ----------------------------------------------------------------------------------- recipes
BAD_FIELDS = [
    ({"train__learning_rate": 0.1}, "train.learning_rate"),  # unknown key
    ({"data__splits__holdout": "x"}, "data.splits.holdout"),
    ({"train__batch_size": "big"}, "train.batch_size"),  # wrong types
    ({"seeds": "0"}, "seeds"),
    ({"model__encoder__dropout": [0.1]}, "model.encoder.dropout"),
    ({"train__batch_size": -1}, "train.batch_size"),  # negative sizes
    ({"train__eval_batch_size": 0}, "train.eval_batch_size"),
    ({"train__workers": -2}, "train.workers"),
    ({"model__encoder__hidden": [16, -16]}, "model.encoder.hidden[1]"),
    ({"model__encoder__out_dim": -8}, "model.encoder.out_dim"),
    ({"train__nonfinite": "ignore"}, "train.nonfinite"),
]


@pytest.mark.parametrize(("changes", "field"), BAD_FIELDS)
def test_bad_recipe_fields_exit_2_before_training(recipe_file, tmp_path, changes, field):
    result = runner.invoke(app, ["train", "--recipe", str(recipe_file(**changes))])
    assert result.exit_code == 2, result.output
    assert f"- {field}:" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_paths_that_do_not_exist_exit_2(recipe_file, tmp_path):
    result = runner.invoke(app, ["train", "--recipe", str(tmp_path / "absent.yaml")])
    assert result.exit_code == 2 and "absent.yaml does not exist" in result.output
    result = runner.invoke(app, ["train", "--recipe", str(recipe_file(data__path="/no/such"))])
    assert result.exit_code == 2 and "data.path /no/such does not exist" in result.output
    result = runner.invoke(app, ["value", str(tmp_path / "absent.pt"), "--summary"])
    assert result.exit_code == 2 and "absent.pt does not exist" in result.output


@pytest.mark.parametrize(
    "text", ["- name: a\n- seeds: [0]\n", "just a string\n", "", "42\n", "null\n"]
)
def test_yaml_that_is_not_a_mapping_exits_2(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    for command in (["recipe", "validate", str(path)], ["train", "--recipe", str(path)]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, result.output
        assert "must be a YAML mapping" in result.output


def test_yaml_custom_tags_construct_nothing(recipe_file, tmp_path):
    marker = tmp_path / "pwned"
    payload = f"!!python/object/apply:os.system ['touch {marker}']"
    yaml.unsafe_load(payload)  # the payload is live: an unsafe loader runs it
    assert marker.exists()
    marker.unlink()
    good = yaml.safe_load(recipe_file().read_text())
    documents = {
        "python tag": f"name: {payload}\n",
        "python tag in a section": yaml.safe_dump(good) + f"extra: {payload}\n",
        "local tag": "name: !custom tiny\nseeds: [0]\n",
        "whole document": f"{payload}\n",
    }
    for what, text in documents.items():
        path = tmp_path / "tagged.yaml"
        path.write_text(text)
        for command in (["recipe", "validate", str(path)], ["train", "--recipe", str(path)]):
            result = runner.invoke(app, command)
            assert result.exit_code == 2, (what, result.output)
            assert "is not valid YAML" in result.output and "Traceback" not in result.output
        assert not marker.exists(), what


# ------------------------------------------------------------------------- NaN and inf losses
POISONS = {
    "nan loss": lambda loss: loss * math.nan,  # NaN gradients too: stopped before the step
    "inf loss": lambda loss: loss * math.inf,
    "nan added": lambda loss: loss + math.nan,  # finite gradients, NaN loss
}


def poison_epoch(monkeypatch, poison: str, epoch: int) -> None:
    """Every loss of 0-based `epoch` is poisoned."""
    clean = Method.loss

    def loss(self, model, out, batch, ctx):
        value = clean(self, model, out, batch, ctx)
        return POISONS[poison](value) if ctx.epoch == epoch else value

    monkeypatch.setattr(Method, "loss", loss)


@pytest.mark.parametrize("poison", sorted(POISONS))
def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    recipe_file, tmp_path, monkeypatch, poison
):
    path = recipe_file(train__epochs=3)
    run = tmp_path / "runs/tiny/seed0"
    saved: dict[str, bytes] = {}

    def keep_bytes(row: dict[str, float]) -> None:
        saved[LAST] = (run / LAST).read_bytes()

    poison_epoch(monkeypatch, poison, epoch=1)
    with pytest.raises(NonFiniteLoss) as caught:
        Trainer(load_recipe(path), 0, callbacks=[EpochHook(keep_bytes)]).run()
    message = " ".join(str(caught.value).split())
    assert "NaN or infinite at epoch 2, step 9 (batch 1 of 8)" in message
    assert "keeps the last good state (epoch 1)" in message and "nonfinite: skip" in message
    assert (run / LAST).read_bytes() == saved[LAST] and not (run / "summary.json").exists()
    ckpt = load_checkpoint(run / LAST)
    assert ckpt.epoch == 1
    assert all(torch.isfinite(w).all() for w in ckpt.model.values())
    result = runner.invoke(app, ["train", "--recipe", str(path), "--overwrite"])
    assert result.exit_code == 2 and "NaN or infinite at epoch 2" in result.output


@pytest.mark.parametrize("poison", ["nan loss", "inf loss"])
def test_non_finite_steps_are_skipped_when_the_recipe_says_so(
    recipe_file, tmp_path, monkeypatch, caplog, poison
):
    recipe = load_recipe(recipe_file(train__epochs=3, train__nonfinite="skip"))
    poison_epoch(monkeypatch, poison, epoch=1)
    with caplog.at_level(logging.WARNING, logger="mmval"):
        Trainer(recipe, 0).run()
    assert "epoch 2: 8 step(s) with a NaN or infinite loss" in caplog.text
    metrics = pd.read_parquet(tmp_path / "runs/tiny/seed0/metrics.parquet")
    assert metrics["skipped_steps"].tolist() == [0, 8, 0]
    assert math.isnan(metrics["train_loss"][1]) and np.isfinite(metrics["train_loss"][2])
    # every update of epoch 2 was dropped: the model it evaluates is epoch 1's
    assert (
        metrics.loc[1, ["val_acc", "test_acc"]].tolist()
        == metrics.loc[0, ["val_acc", "test_acc"]].tolist()
    )
    final = load_checkpoint(tmp_path / "runs/tiny/seed0/last.pt").model
    assert all(torch.isfinite(w).all() for w in final.values())


def test_nonfinite_setting_keeps_old_recipes_and_runs_unchanged(recipe_file):
    recipe = load_recipe(recipe_file())
    old = recipe.model_dump(mode="json")
    del old["train"]["nonfinite"]  # as runs from before the setting stored their recipe
    assert normalised(Recipe, old) == recipe
    skip = load_recipe(recipe_file(train__nonfinite="skip"))
    assert skip.model_dump(mode="json")["train"]["nonfinite"] == "skip"
    assert skip.settings_hash() != recipe.settings_hash()
    with pytest.raises(UserError, match=r"train\.nonfinite"):
        load_recipe(recipe_file(train__nonfinite="maybe"))
