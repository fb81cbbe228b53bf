"""`data.corrupt`: the test-time corruptions as training-time augmentation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmval.data.corrupt import Corruption, training_corruptor
from mmval.data.dataset import ParquetSamples
from mmval.errors import UserError
from mmval.recipe import parse_recipe
from mmval.runner import Trainer


def _raw(data: Path, output: Path, **data_fields: object) -> dict:
    return {
        "name": "noisy",
        "seeds": [0],
        "data": {"path": str(data), **data_fields},
        "model": {"encoder": {"hidden": [16], "out_dim": 8}},
        "optim": {"name": "adam", "lr": 0.01},
        "train": {"epochs": 2, "batch_size": 64},
        "output": str(output),
    }


def test_training_batches_are_corrupted_anew_each_epoch(synthetic_dir):
    corrupt = training_corruptor([Corruption.parse("a=gaussian:10")], seed=3)
    noisy = ParquetSamples(synthetic_dir, "train", ["a", "b"], train=True, corrupt=corrupt)
    clean = ParquetSamples(synthetic_dir, "train", ["a", "b"], train=True)
    evaluation = ParquetSamples(synthetic_dir, "test", ["a", "b"], corrupt=corrupt)
    rows = list(range(40))
    first = noisy.__getitems__(rows).inputs
    again = noisy.__getitems__(rows[::-1]).inputs  # another batch order, the same draws
    assert torch.equal(first["a"], again["a"].flip(0))
    assert torch.equal(first["b"], clean.__getitems__(rows).inputs["b"])
    changed = (first["a"] != clean.__getitems__(rows).inputs["a"]).any(dim=1)
    assert 0 < int(changed.sum()) < len(rows)  # QMF: half the samples are noised
    noisy.set_epoch(1)
    assert not torch.equal(noisy.__getitems__(rows).inputs["a"], first["a"])
    test_rows = list(range(len(evaluation)))
    reference = ParquetSamples(synthetic_dir, "test", ["a", "b"]).__getitems__(test_rows)
    assert torch.equal(evaluation.__getitems__(test_rows).inputs["a"], reference.inputs["a"])


def test_recipe_field_trains_and_keeps_old_hashes(synthetic_dir, tmp_path):
    plain = parse_recipe(_raw(synthetic_dir, tmp_path / "runs"), "plain")
    assert "corrupt" not in plain.model_dump(mode="json", exclude_defaults=True)["data"]
    noisy = parse_recipe(_raw(synthetic_dir, tmp_path / "runs", corrupt=["a=gaussian:5"]), "n")
    assert noisy.settings_hash() != plain.settings_hash()
    result = Trainer(noisy, 0).run()
    assert result.summary["finished"]
    with pytest.raises(UserError, match=r"data\.corrupt"):
        parse_recipe(_raw(synthetic_dir, tmp_path, corrupt=["a=fog:5"]), "bad")
    unknown = parse_recipe(_raw(synthetic_dir, tmp_path / "u", corrupt=["z=gaussian:5"]), "u")
    with pytest.raises(UserError, match=r"data\.corrupt names z"):
        Trainer(unknown, 0).run()
