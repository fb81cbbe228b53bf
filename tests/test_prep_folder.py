"""`mmval prep folder`: the user's own files listed in a labels file give what the built-in
data sets give on the same files."""

from __future__ import annotations

import csv
import json
import wave
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from mmval.cli.main import app
from typer.testing import CliRunner

import tests.image_text_raw as fake_image_text
from mmval.data.manifest import load_dataset_manifest
from mmval.data.pipeline import PartSpec, PrepCallbacks
from mmval.data.prep import merge_parts, prepare
from mmval.data.shards import load_manifest, sha256_file
from mmval.data.synthetic_av import SyntheticAVParams, write_synthetic_raw
from mmval.errors import UserError

runner = CliRunner()
KS_SETS = ["modalities.0.size=[32,32]", "modalities.1.target_frames=64"]
KS_SETS += ["modalities.1.num_mel_bins=32"]
FOLDER_AV = ["frames.size=[32,32]", "fbank.target_frames=64", "fbank.num_mel_bins=32"]
IMAGE_SETS = ["image.size=[32,32]", "image.short_side=40"]


def _rows(out: Path) -> dict[str, dict]:
    """Every stored sample of a data folder, by id, with all its columns."""
    manifest = load_manifest(out)
    rows = {}
    for info in manifest.splits.values():
        for shard in info.shards:
            for row in pq.read_table(out / shard.path).to_pylist():
                rows[row["sample_id"]] = row
    return rows


def _write_labels(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return path
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _prep(raw: Path, labels: Path, out: Path, *sets: str, workers: int = 1) -> None:
    args = ["prep", "folder", "--raw", str(raw), "--labels", str(labels), "--out", str(out)]
    args += ["--workers", str(workers)]
    for item in sets:
        args += ["--set", item]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output


def test_defaults_are_the_built_in_extraction() -> None:
    folder = load_dataset_manifest("folder")[0].params
    ks = load_dataset_manifest("kinetics-sounds")[0].params["modalities"]
    ucf = load_dataset_manifest("ucf101")[0].params["modalities"]
    qmf = load_dataset_manifest("food101-qmf")[0].params
    assert (folder["frames"], folder["fbank"]) == (ks[0], ks[1])
    assert folder["flow_params"] == ucf[1] and folder["flow"] is False
    assert (folder["image"], folder["text"]) == (qmf["image"], qmf["text"])


def test_clips_with_sound_match_kinetics_sounds_and_train(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    clips = write_synthetic_raw(
        raw,
        SyntheticAVParams(
            layout="kinetics-sounds", classes=["0", "1", "2"], clips_per_class=2, seconds=2.0
        ),
    )
    ks = tmp_path / "ks"
    prepare("kinetics-sounds", ks, raw=raw, overrides=KS_SETS, workers=1)
    index = pd.read_parquet(ks / "index.parquet")
    by_id = {c.clip_id: c for c in clips}
    listed = [
        {
            "path": str(by_id[i].video.relative_to(raw)),
            "label": str(label),
            "split": split,
            "id": i,
        }
        for i, label, split in zip(index["sample_id"], index["label"], index["split"], strict=True)
    ]
    labels = _write_labels(raw / "labels.csv", listed)
    out = tmp_path / "my-clips"
    _prep(raw, labels, out, *FOLDER_AV, workers=2)

    manifest = load_manifest(out)
    assert manifest.dataset == "my-clips" and manifest.classes == ["0", "1", "2"]
    assert [m.name for m in manifest.modalities] == ["visual", "audio"]
    assert manifest.modalities == load_manifest(ks).modalities
    assert manifest.extraction["media"] == "video+audio"
    inputs = manifest.extraction["settings"]["inputs"]["labels"]
    assert inputs == {"path": str(labels), "sha256": sha256_file(labels)}
    ours, theirs = _rows(out), _rows(ks)
    assert len(ours) == len(clips) and ours.keys() == theirs.keys()
    for sample_id, row in theirs.items():
        assert ours[sample_id] == row, sample_id  # frames, times, fbank, label, split, source

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        json.dumps(
            {
                "name": "folder",
                "seeds": [0],
                "data": {"path": str(out)},
                "model": {"encoder": {"kind": "resnet18"}, "fusion": "concat"},
                "method": {"name": "concat"},
                "optim": {"name": "adam", "lr": 0.001},
                "train": {"epochs": 1, "batch_size": 4},
                "output": str(tmp_path / "runs"),
            }
        )
    )
    result = runner.invoke(app, ["train", "--recipe", str(recipe)])
    assert result.exit_code == 0, result.output
    assert list((tmp_path / "runs").rglob("*.pt"))


def test_image_text_jsonl_matches_food101_qmf(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    classes = load_dataset_manifest("food101-qmf")[0].classes[:3]
    fake = fake_image_text.jsonl_layout(raw, classes, {"train": 6, "val": 2, "test": 2}, "images")
    qmf = tmp_path / "qmf"
    prepare("food101-qmf", qmf, raw=raw, overrides=IMAGE_SETS, workers=1)
    posts = []
    for split, file in (("train", "train.jsonl"), ("val", "dev.jsonl"), ("test", "test.jsonl")):
        for line in (raw / file).read_text().splitlines():
            row = json.loads(line)
            posts.append(
                {"id": row["id"], "image": row["img"], "text": row["text"], "label": row["label"]}
                | {"split": split}
            )
    labels = _write_labels(tmp_path / "posts.jsonl", posts)
    out = tmp_path / "posts"
    _prep(raw, labels, out, *IMAGE_SETS)

    manifest = load_manifest(out)
    assert manifest.classes == classes and manifest.extraction["media"] == "image+text"
    assert manifest.modalities == load_manifest(qmf).modalities
    ours, theirs = _rows(out), _rows(qmf)
    assert ours.keys() == theirs.keys() and len(ours) == sum(fake.counts.values())
    for sample_id, row in theirs.items():
        assert ours[sample_id] == row, sample_id  # image, token ids, cleaned text, label
    vocab = manifest.modalities[1].vocab_file
    assert (out / vocab).read_bytes() == (qmf / vocab).read_bytes()
    errors = pd.read_parquet(out / "errors.parquet")
    assert errors.to_dict("records") == pd.read_parquet(qmf / "errors.parquet").to_dict("records")


def _write_wav(path: Path, hz: float, seconds: float = 1.0, rate: int = 16000) -> None:
    t = np.arange(int(seconds * rate)) / rate
    samples = (0.3 * np.sin(2 * np.pi * hz * t) * 32767).astype("<i2")
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(samples.tobytes())


def test_sound_files_stratified_split_and_a_file_that_differs(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    rows = []
    for label, hz in (("low", 200.0), ("high", 2000.0)):
        for i in range(10):
            _write_wav(raw / label / f"{i}.wav", hz)
            rows.append({"path": f"{label}/{i}.wav", "label": label})
    fake_image_text.write_image(raw / "odd.jpg", 0, np.random.default_rng(0))
    rows.append({"path": "odd.jpg", "label": "low"})
    rows.append({"path": "gone.wav", "label": "high"})
    labels = _write_labels(raw / "labels.csv", rows)
    out = tmp_path / "sounds"
    _prep(raw, labels, out, "fbank.target_frames=64", "fbank.num_mel_bins=32")

    manifest = load_manifest(out)
    assert manifest.classes == ["high", "low"] and manifest.extraction["media"] == "audio"
    assert [(m.name, m.shape) for m in manifest.modalities] == [("audio", [64, 32])]
    counts = {s: info.samples for s, info in manifest.splits.items()}
    assert set(counts) == {"train", "val", "test"} and sum(counts.values()) == 20
    errors = dict(pd.read_parquet(out / "errors.parquet")[["source", "reason"]].values)
    assert "an image, in a data set of sound files" in errors["odd.jpg"]
    assert errors["gone.wav"] == "file not found"
    stored = _rows(out)
    for sample_id, row in stored.items():
        fbank = np.frombuffer(row["audio"], np.float16).reshape(64, 32).astype(float)
        low = fbank.mean(axis=0).argmax() < 8  # 200 Hz peaks in a low mel bin, 2 kHz above
        assert low == (manifest.classes[row["label"]] == "low"), sample_id


class Interrupt(Exception):
    pass


def test_images_resume_after_an_interruption(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    rng = np.random.default_rng(0)
    rows = []
    for label in range(3):
        for i in range(4):
            fake_image_text.write_image(raw / f"c{label}" / f"{i}.png", label, rng, png=True)
            split = "train" if i < 2 else ("val" if i == 2 else "test")
            rows.append({"path": f"c{label}/{i}.png", "label": f"c{label}", "split": split})
    (raw / "c0" / "0.png").write_bytes(b"not an image")
    labels = _write_labels(raw / "labels.csv", rows)
    sets = [*IMAGE_SETS, "rows_per_shard=2"]
    inputs = {"labels": str(labels)}
    full = prepare("folder", tmp_path / "full", raw=raw, overrides=sets, inputs=inputs, workers=1)
    manifest = full.manifest
    assert [(m.name, m.shape) for m in manifest.modalities] == [("visual", [1, 32, 32, 3])]
    assert {s: i.samples for s, i in manifest.splits.items()} == {"train": 5, "val": 3, "test": 3}
    assert "undecodable" in pd.read_parquet(tmp_path / "full/errors.parquet")["reason"][0]

    seen = [0]

    def stop_after_five(ok: bool) -> None:
        seen[0] += 1
        if seen[0] == 5:
            raise Interrupt

    resumed = tmp_path / "resumed"
    with pytest.raises(Interrupt):
        prepare(
            "folder",
            resumed,
            raw=raw,
            overrides=sets,
            inputs=inputs,
            workers=1,
            callbacks=PrepCallbacks(on_clip=stop_after_five),
        )
    assert not (resumed / "manifest.json").exists()
    result = prepare("folder", resumed, raw=raw, overrides=sets, inputs=inputs, workers=1)
    assert sum(c.reused_shards for c in result.summary.splits.values()) == 2
    assert result.manifest.splits == manifest.splits
    again = prepare("folder", resumed, raw=raw, overrides=sets, inputs=inputs, workers=1)
    assert not again.wrote  # complete: verified and kept
    labels.write_text(labels.read_text().replace("c2/3.png,c2,test", "c2/3.png,c2,val"))
    with pytest.raises(UserError, match="other settings"):
        prepare("folder", resumed, raw=raw, overrides=sets, inputs=inputs, workers=1)


def test_silent_clips_with_flow_match_ucf101(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    clips = write_synthetic_raw(
        raw,
        SyntheticAVParams(
            layout="ucf101", classes=["Archery", "Bowling"], clips_per_class=2, seconds=2.0
        ),
    )
    flow = ["pairs=3", "size=[32,32]"]
    ucf = tmp_path / "ucf"
    sets = [f"modalities.1.{s}" for s in flow]
    frames = "modalities.0={kind: frames, count: 6, position: center, max_frames: 6, size: [32,32]}"
    prepare("ucf101", ucf, raw=raw, overrides=[frames, *sets], workers=1)
    index = pd.read_parquet(ucf / "index.parquet")
    by_id = {c.clip_id: c for c in clips}
    listed = [
        {"id": i, "path": str(by_id[i].video.relative_to(raw)), "label": str(c), "split": s}
        for i, c, s in zip(index["sample_id"], index["label"], index["split"], strict=True)
    ]
    labels = _write_labels(tmp_path / "labels.csv", listed)
    out = tmp_path / "silent"
    frames_sets = ["frames={kind: frames, count: 6, position: center, max_frames: 6}"]
    frames_sets.append("frames.size=[32,32]")
    _prep(raw, labels, out, "flow=true", *frames_sets, *[f"flow_params.{s}" for s in flow])
    manifest = load_manifest(out)
    assert manifest.extraction["media"] == "video"
    assert manifest.modalities == load_manifest(ucf).modalities  # visual, flow (jpeg-uv)
    ours, theirs = _rows(out), _rows(ucf)
    assert ours.keys() == theirs.keys()
    for sample_id, row in theirs.items():
        row = row | {"label": ours[sample_id]["label"]}  # classes "0", "1" vs the class names
        assert ours[sample_id] == row, sample_id


def _bad(tmp_path: Path, name: str, text: str) -> tuple[int, str, Path]:
    raw = tmp_path / "raw"
    if not raw.is_dir():
        for i in range(2):
            _write_wav(raw / f"{i}.wav", 300.0)
    labels = tmp_path / name
    labels.write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    args = ["prep", "folder", "--raw", str(raw), "--labels", str(labels), "--out", str(out)]
    result = runner.invoke(app, args)
    return result.exit_code, " ".join(result.output.split()), out


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("l.csv", "file,label\n0.wav,a\n", "no column path"),
        ("l.csv", "path,label,split\n0.wav,a,train\n1.wav,b,dev\n", "line 3: split 'dev'"),
        ("l.csv", "path,label\n0.wav,a\n../x.wav,b\n", "line 3: '../x.wav' is not a path inside"),
        ("l.csv", "path,label\n/etc/passwd,a\n", "line 2: '/etc/passwd' is not a path inside"),
        ("l.csv", "id,path,label\nx,0.wav,a\nx,1.wav,b\n", "line 3: id 'x' is already on line 2"),
        ("l.csv", "path,label\n0.wav,a\n0.wav,b\n", "add an id column"),
        ("l.csv", "path,label\n0.wav,\n", "line 2 has no label"),
        ("l.csv", "path,label\n", "lists no rows"),
        ("l.csv", "", "lists no rows"),
        ("l.jsonl", '{"path": "0.wav", "label": "a"}\n[1]\n', "line 2 is not a JSON object"),
        ("l.txt", "0.wav a\n", "write it as .csv, .tsv or .jsonl"),
        ("l.jsonl", '{"image": "0.wav", "label": "a"}\n', "no column path"),
    ],
)
def test_bad_labels_files_exit_2_and_write_nothing(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    code, output, out = _bad(tmp_path, name, text)
    assert code == 2 and message in output and name in output, output
    assert not out.exists()


def test_first_files_that_disagree_exit_2(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    _write_wav(raw / "a.wav", 300.0)
    fake_image_text.write_image(raw / "b.jpg", 0, np.random.default_rng(0))
    code, output, out = _bad(tmp_path, "l.csv", "path,label\na.wav,x\nb.jpg,y\n")
    assert code == 2 and "line 2 a.wav (a sound file), line 3 b.jpg (an image)" in output
    assert not out.exists()
    code, output, _ = _bad(tmp_path, "l.csv", "path,label\nnone.wav,x\n")
    assert code == 2 and "none of the files listed in" in output
    args = ["prep", "folder", "--raw", str(raw), "--labels", str(tmp_path / "gone.csv")]
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 2 and "no labels file" in result.output and not out.exists()


def test_parts_merge_into_the_one_piece_prep(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    rng = np.random.default_rng(0)
    rows = []
    for label in range(2):
        for i in range(6):
            fake_image_text.write_image(raw / f"c{label}/{i}.jpg", label, rng)
            rows.append({"path": f"c{label}/{i}.jpg", "label": f"c{label}"})
    inputs = {"labels": str(_write_labels(raw / "labels.csv", rows))}
    sets = ["image.size=[16,16]", "rows_per_shard=2"]
    full = prepare("folder", tmp_path / "full", raw=raw, overrides=sets, inputs=inputs, workers=1)
    for i in range(2):
        part = PartSpec(i, 2)
        prepare("folder", tmp_path / "mine", raw=raw, overrides=sets, inputs=inputs, part=part)
    merged = merge_parts("folder", tmp_path / "mine", raw=raw).manifest
    assert (merged.dataset, full.manifest.dataset) == ("mine", "full")
    assert {s: i.samples for s, i in merged.splits.items()} == {"train": 8, "val": 2, "test": 2}
    assert _rows(tmp_path / "mine").keys() == _rows(tmp_path / "full").keys()
