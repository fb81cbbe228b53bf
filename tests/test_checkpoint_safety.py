"""Checkpoint safety: a file's declared size is checked before anything is inflated (a deflated
"bomb" is refused at once), the loaded payload is checked against the checkpoint's structure, and
`pretrained:` weights that do not fit the encoder name the keys that differ. Each refusal is a
UserError (exit 2), never a traceback."""

from __future__ import annotations

import struct
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from mmval.cli.main import app
from typer.testing import CliRunner

from mmval.artifacts.checkpoint import (
    FORMAT,
    load_checkpoint,
    load_latest_checkpoint,
    save_payload,
)
from mmval.data.shards import ModalitySpec
from mmval.errors import UserError
from mmval.methods.linear_probe import load_encoder
from mmval.models import ModelConfig, build_model
from mmval.models.encoders import (
    EmbeddingBagEncoder,
    EmbeddingBagEncoderConfig,
    MLPEncoder,
    MLPEncoderConfig,
)

runner = CliRunner()
MiB = 1 << 20
DROP = "drop"  # a value of `payload(...)` that removes the key


def payload(**changes: Any) -> dict[str, Any]:
    """A small best.pt payload (a 1024-float model), with `changes` (DROP removes a key)."""
    out: dict[str, Any] = {
        "recipe": {"name": "tiny", "seeds": [0]},
        "data": {
            "path": "data/x",
            "dataset": "x",
            "fingerprint": "0" * 64,
            "classes": ["a", "b"],
            "modalities": ["a"],
        },
        "model": {"encoders.a.net.1.weight": torch.zeros(256, 4)},
        "epoch": 1,
        "metrics": {"epoch": 1, "val_acc": 0.5},
    }
    for key, value in changes.items():
        if value == DROP:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def training_keys() -> dict[str, Any]:
    """What last.pt holds beside best.pt's keys."""
    return {
        "optimizer": {"state": {}, "param_groups": []},
        "scheduler": None,
        "sampler": {"seed": 0, "epoch": 1, "consumed": 10},
        "method": {},
        "rng": {"torch": torch.get_rng_state()},
        "run_state": {"epoch": 1, "rows": []},
    }


# ---------------------------------------------------------------------------------- the bomb
def _zip(path: Path, records: list[tuple[str, int, int, list[bytes], int]]) -> None:
    """Write a zip archive of (name, method, crc, compressed parts, uncompressed size)."""
    with open(path, "wb") as fh:
        central = b""
        for name, method, crc, parts, size in records:
            offset, packed, raw = fh.tell(), sum(map(len, parts)), name.encode()
            head = (20, 0, method, 0, 0x21, crc, packed, size, len(raw))
            fh.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, *head, 0) + raw)
            for part in parts:
                fh.write(part)
            central += struct.pack(
                "<IHHHHHHIIIHHHHHII", 0x02014B50, 20, *head, 0, 0, 0, 0, 0, offset
            )
            central += raw
        start = fh.tell()
        fh.write(central)
        fh.write(
            struct.pack(
                "<IHHHHIIH", 0x06054B50, 0, 0, len(records), len(records), len(central), start, 0
            )
        )


def deflate_bomb(genuine: Path, bomb: Path, inflated: int) -> None:
    """`bomb`: the records of the torch archive `genuine`, deflated, with the model's storage
    replaced by `inflated` zero bytes (a multiple of 1 MiB). Every MiB of zeros deflates to the
    same few hundred bytes after a full flush, so the file is about inflated / 1000 bytes and is
    written without compressing (or holding) the inflated bytes."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = packer.compress(bytes(MiB)) + packer.flush(zlib.Z_FULL_FLUSH)
    assert packer.compress(bytes(MiB)) + packer.flush(zlib.Z_FULL_FLUSH) == block
    count, crc = inflated // MiB, 0
    zeros = bytes(MiB)
    for _ in range(count):
        crc = zlib.crc32(zeros, crc)
    with zipfile.ZipFile(genuine) as archive:
        names = archive.namelist()
        contents = {name: archive.read(name) for name in names}
    storage = max(names, key=lambda n: len(contents[n]))
    records = []
    for name in names:
        if name == storage:
            records.append((name, 8, crc, [block] * count + [packer.flush()], inflated))
        else:
            data = contents[name]
            squeezed = zlib.compressobj(6, zlib.DEFLATED, -15)
            packed = squeezed.compress(data) + squeezed.flush()
            records.append((name, 8, zlib.crc32(data), [packed], len(data)))
    _zip(bomb, records)


@pytest.fixture
def nothing_inflated(monkeypatch):
    """Fail the test if anything reads a checkpoint's records (CRC pass or torch.load)."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a record was inflated before the size check")

    monkeypatch.setattr(zipfile.ZipFile, "testzip", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)


def test_a_deflated_checkpoint_bomb_is_refused_before_inflating(tmp_path, nothing_inflated):
    genuine, bomb = tmp_path / "genuine.pt", tmp_path / "bomb.pt"
    save_payload(genuine, payload())
    deflate_bomb(genuine, bomb, 1536 * MiB)
    assert bomb.stat().st_size < 4 * MiB
    started = time.perf_counter()
    result = runner.invoke(app, ["value", str(bomb), "--out", str(tmp_path / "v.parquet")])
    assert time.perf_counter() - started < 5
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "bomb.pt" in text and "1.5 GiB" in text and "Traceback" not in text
    assert not (tmp_path / "v.parquet").exists()
    # a resumed run refuses it too, and does not fall back on the previous checkpoint
    previous = tmp_path / "last.prev.pt"
    save_payload(previous, payload(**training_keys()))
    with pytest.raises(UserError, match=r"1\.5 GiB"):
        load_latest_checkpoint(bomb, previous)


def test_the_bomb_would_inflate_to_what_it_declares(tmp_path):
    """The crafted archive is a valid zip whose storage record really inflates that far."""
    genuine, bomb = tmp_path / "genuine.pt", tmp_path / "bomb.pt"
    save_payload(genuine, payload())
    deflate_bomb(genuine, bomb, 8 * MiB)
    with zipfile.ZipFile(bomb) as archive:
        assert archive.testzip() is None
        assert sum(i.file_size for i in archive.infolist()) > 8 * MiB


def test_a_checkpoint_above_the_size_limit_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "best.pt"
    save_payload(path, payload())  # 4 KiB of weights, stored as torch.save stores them
    assert load_checkpoint(path).epoch == 1
    monkeypatch.setenv("MMVAL_MAX_CHECKPOINT_SIZE", "2K")
    with pytest.raises(UserError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert str(path) in message and "2.0 KiB" in message and "MMVAL_MAX_CHECKPOINT_SIZE" in message
    monkeypatch.setenv("MMVAL_MAX_CHECKPOINT_SIZE", "a lot")
    with pytest.raises(UserError, match="MMVAL_MAX_CHECKPOINT_SIZE"):
        load_checkpoint(path)


# ------------------------------------------------------------------ keys and types of a payload
BROKEN = {
    "data without fingerprint": (
        {"data": {"path": "p", "dataset": "x", "classes": ["a"], "modalities": ["a"]}},
        "data.fingerprint",
    ),
    "data with a foreign key": (
        {"data": {**payload()["data"], "split": "test"}},
        "data.split",
    ),
    "model not a state dict": ({"model": [1, 2, 3]}, "model"),
    "model with a non-tensor": ({"model": {"w": "weights"}}, "model.w"),
    "epoch as text": ({"epoch": "3"}, "epoch"),
    "epoch as a boolean": ({"epoch": True}, "epoch"),
    "recipe missing": ({"recipe": DROP}, "recipe"),
    "metrics not a mapping": ({"metrics": ["val_acc"]}, "metrics"),
    "classes not strings": (
        {"data": {**payload()["data"], "classes": [0, 1]}},
        "data.classes[0]",
    ),
    "last.pt without rng": ({**training_keys(), "rng": DROP}, "rng"),
    "last.pt with a bad sampler": ({**training_keys(), "sampler": [0]}, "sampler"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_payload_with_missing_or_wrong_keys_is_refused_naming_them(tmp_path, case):
    changes, key = BROKEN[case]
    path = tmp_path / "best.pt"
    save_payload(path, payload(**changes))
    with pytest.raises(UserError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert str(path) in message and f"- {key}:" in message, message


def test_a_broken_payload_exits_2_from_the_cli(tmp_path):
    path = tmp_path / "best.pt"
    save_payload(path, payload(**BROKEN["data without fingerprint"][0]))
    result = runner.invoke(app, ["value", str(path), "--out", str(tmp_path / "v.parquet")])
    assert result.exit_code == 2, result.output
    assert "data.fingerprint" in result.output and "Traceback" not in result.output


def test_a_well_formed_last_checkpoint_loads(tmp_path):
    path = tmp_path / "last.pt"
    save_payload(path, payload(metrics=DROP, **training_keys()))
    ckpt = load_checkpoint(path)
    assert ckpt.training is not None and ckpt.training.method_modules is None


# ------------------------------------------------------------------------ pretrained weights
TOKENS = ModalitySpec(name="t", dtype="int32", shape=[6], encoding="tokens", vocab_size=20)
OTHER = ModalitySpec(name="x", dtype="float32", shape=[3])


def _model_with(weights: Path) -> None:
    encoder = {"kind": "embedding_bag", "dim": 8, "out_dim": 4, "pretrained": weights}
    config = ModelConfig(
        encoders={"t": encoder, "x": {"hidden": [5], "out_dim": 4}}, fusion="concat"
    )
    build_model(config, [TOKENS, OTHER], 2)


def test_unreadable_pretrained_weights_exit_2(tmp_path):
    weights = tmp_path / "bag.pt"
    weights.write_bytes(b"not a torch file at all")
    with pytest.raises(UserError, match=r"bag\.pt"):
        _model_with(weights)
    torch.save(torch.zeros(3), weights)  # a tensor, not a state dict
    with pytest.raises(UserError, match=r"bag\.pt"):
        _model_with(weights)


def test_pretrained_weights_with_other_keys_name_the_missing_and_unexpected(tmp_path):
    state = EmbeddingBagEncoder(TOKENS, EmbeddingBagEncoderConfig(dim=8, out_dim=4)).state_dict()
    state["extra.weight"] = state.pop("bag.weight")
    state["head.1.bias"] = torch.zeros(7)
    weights = tmp_path / "bag.pt"
    torch.save(state, weights)
    with pytest.raises(UserError) as caught:
        _model_with(weights)
    message = str(caught.value)
    assert "bag.pt" in message
    assert "missing: bag.weight" in message and "unexpected: extra.weight" in message
    assert "head.1.bias" in message and "[7]" in message and "[4]" in message


def test_a_pretrained_checkpoint_of_another_encoder_names_the_keys(tmp_path):
    """reconboost's `method.pretrained` (and linear_probe's checkpoint) read encoders from
    mmval checkpoints: one of another encoder names the keys that differ."""
    other = MLPEncoder([3], MLPEncoderConfig(hidden=[5, 5], out_dim=4)).state_dict()
    path = tmp_path / "best.pt"
    save_payload(path, payload(model={f"encoders.x.{k}": v for k, v in other.items()}))
    encoder = MLPEncoder([3], MLPEncoderConfig(hidden=[5], out_dim=4))
    with pytest.raises(UserError) as caught:
        load_encoder(path, "x", encoder, "method.pretrained.x")
    message = str(caught.value)
    assert "method.pretrained.x" in message and "unexpected: net.7.weight, net.7.bias" in message
    assert "net.4.weight [5, 5]" in message


def test_a_format_tag_alone_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "best.pt"
    torch.save({"format": FORMAT}, path)
    with pytest.raises(UserError, match="- recipe:"):
        load_checkpoint(path)
