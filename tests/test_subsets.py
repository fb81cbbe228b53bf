"""`mmval value --method subsets`: every sample on every non-empty subset of modalities, checked
against masked forwards computed by hand, and its command-line surface."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from mmval.data.dataset import ParquetSamples
from mmval.valuation.run import load_with_data
from mmval.valuation.subsets import subset_accuracy, subsets_checkpoint
from tests.test_valuation_cli import invoke, synthetic, train


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("subsets")
    return train(synthetic(root, "abc", ["a", "b", "c"]), root / "runs", "abc")


def _by_hand(checkpoint: Path) -> pd.DataFrame:
    """Each subset's prediction with the other modalities' features zeroed before the fusion
    (`--mask feature`), one forward per subset."""
    loaded = load_with_data(checkpoint)
    model = loaded.model.eval()
    data = ParquetSamples(loaded.root, "test", loaded.modalities, manifest=loaded.manifest)
    batch = data.__getitems__(range(len(data)))
    rows = []
    with torch.no_grad():
        features = model.encode(batch.inputs)
        for code in range(1, 2 ** len(loaded.modalities)):
            kept = [m for j, m in enumerate(loaded.modalities) if code >> j & 1]
            masked = {m: f if m in kept else torch.zeros_like(f) for m, f in features.items()}
            prob = torch.softmax(model.fuse(masked).double(), -1)
            for i, sample in enumerate(data.sample_ids):
                label = int(batch.label[i])
                rows.append(
                    {
                        "sample_id": sample,
                        "subset": "+".join(kept),
                        "pred": int(prob[i].argmax()),
                        "p_true": float(prob[i, label]),
                    }
                )
    return pd.DataFrame(rows)


def test_every_subset_matches_a_masked_forward(checkpoint):
    table = subsets_checkpoint(checkpoint).table
    assert table["subset"].nunique() == 7 and len(table) == 7 * table["sample_id"].nunique()
    assert table["subset"].iloc[:7].tolist() == ["a", "b", "c", "a+b", "a+c", "b+c", "a+b+c"]
    merged = table.merge(_by_hand(checkpoint), on=["sample_id", "subset"], suffixes=("", "_hand"))
    assert len(merged) == len(table)
    assert (merged["pred"] == merged["pred_hand"]).all()
    assert merged["p_true"].to_numpy() == pytest.approx(merged["p_true_hand"].to_numpy())
    assert (merged["correct"] == (merged["pred"] == merged["label"])).all()
    assert (merged["size"] == merged["subset"].str.count(r"\+") + 1).all()


def test_accuracy_per_subset_and_their_mean(checkpoint):
    table = subsets_checkpoint(checkpoint).table
    summary = subset_accuracy(table).set_index("subset")["accuracy"]
    by_pandas = table.groupby("subset")["correct"].mean()
    assert summary.drop("mean over subsets").to_dict() == pytest.approx(by_pandas.to_dict())
    assert summary["mean over subsets"] == pytest.approx(by_pandas.mean())


def test_the_command_writes_the_table_with_how_it_was_made(checkpoint, tmp_path):
    out = tmp_path / "subsets.parquet"
    result = invoke(checkpoint, "--method", "subsets", "--mask", "input", "--out", out)
    assert result.exit_code == 0, result.output
    assert "mean over subsets" in result.output
    meta = {k.decode(): v.decode() for k, v in pq.read_schema(out).metadata.items()}
    assert meta["mmval.method"] == "subsets" and meta["mmval.mask"] == "input"
    assert json.loads(meta["mmval.modalities"]) == ["a", "b", "c"]
    table = pd.read_parquet(out)
    assert list(table.columns) == [
        "repeat", "sample_id", "label", "subset", "size", "pred", "correct", "p_true"
    ]  # fmt: skip
    for args in (["--wide"], ["--benefit", "prob"], ["--mask", "zero"]):
        refused = invoke(checkpoint, "--method", "subsets", "--out", out, *args)
        assert refused.exit_code == 2, refused.output
