"""`mmval value --method feature-mask`: IMML's probe checked against masked forwards computed by
hand, the subsets table and the clean accuracy, and its command-line surface."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from mmval.data.dataset import ParquetSamples
from mmval.errors import UserError
from mmval.valuation.feature_mask import (
    feature_mask_accuracy,
    feature_mask_checkpoint,
    feature_mask_dataset,
    masked_dims,
    parse_ratios,
)
from mmval.valuation.run import load_with_data
from mmval.valuation.subsets import subsets_checkpoint
from tests.test_valuation_cli import invoke, synthetic, train

RATIOS = [0.0, 0.25, 0.5, 1.0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("feature-mask")
    return train(synthetic(root, "abc", ["a", "b", "c"]), root / "runs", "abc")


@pytest.fixture(scope="module")
def table(checkpoint) -> pd.DataFrame:
    return feature_mask_checkpoint(checkpoint, ratios=RATIOS, seed=3, repeats=2).table


def test_rows_per_repeat_modality_ratio_and_sample(table):
    n = table["sample_id"].nunique()
    assert len(table) == 2 * 3 * len(RATIOS) * n
    assert list(table.columns) == [
        "repeat", "modality", "ratio", "sample_id", "label", "pred", "correct", "p_true"
    ]  # fmt: skip
    assert (table.groupby(["repeat", "modality", "ratio"]).size() == n).all()
    assert (table["correct"] == (table["pred"] == table["label"])).all()


def test_ratio_zero_is_the_clean_accuracy_for_every_modality(checkpoint, table):
    loaded = load_with_data(checkpoint)
    data = ParquetSamples(loaded.root, "test", loaded.modalities, manifest=loaded.manifest)
    batch = data.__getitems__(range(len(data)))
    with torch.no_grad():
        clean = loaded.model.eval()(batch.inputs).logits.argmax(-1).numpy()
    zero = table[table["ratio"] == 0]
    for (_, _), rows in zero.groupby(["repeat", "modality"]):
        assert rows["pred"].tolist() == clean.tolist()


def test_predictions_equal_a_hand_written_masked_forward(checkpoint, table):
    """For each (repeat, modality, ratio): that modality's drawn dimensions zeroed in the
    features, the fusion head run by hand."""
    loaded = load_with_data(checkpoint)
    model = loaded.model.eval()
    data = ParquetSamples(loaded.root, "test", loaded.modalities, manifest=loaded.manifest)
    batch = data.__getitems__(range(len(data)))
    with torch.no_grad():
        features = model.encode(batch.inputs)
    for (repeat, modality, ratio), rows in table.groupby(["repeat", "modality", "ratio"]):
        j = loaded.modalities.index(modality)
        dims = masked_dims(model.feature_dims[modality], ratio, seed=3, repeat=repeat, modality=j)
        masked = {m: f.clone() for m, f in features.items()}
        masked[modality][:, dims] = 0
        with torch.no_grad():
            prob = torch.softmax(model.fuse(masked).double(), -1)
        by_id = rows.set_index("sample_id").loc[data.sample_ids]
        assert by_id["pred"].tolist() == prob.argmax(-1).tolist()
        p_true = prob.gather(1, batch.label[:, None])[:, 0].numpy()
        assert by_id["p_true"].to_numpy() == pytest.approx(p_true)


def test_draws_mask_round_r_d_dimensions_shared_per_seed():
    dims = masked_dims(10, 0.25, seed=0, repeat=0, modality=1)
    assert len(dims) == 3 and len(set(dims.tolist())) == 3 and int(dims.min()) >= 0
    assert int(dims.max()) < 10
    assert torch.equal(dims, masked_dims(10, 0.25, seed=0, repeat=0, modality=1))
    others = [
        masked_dims(10, 0.25, seed=1, repeat=0, modality=1),
        masked_dims(10, 0.25, seed=0, repeat=1, modality=1),
        masked_dims(10, 0.25, seed=0, repeat=0, modality=2),
    ]
    assert all(not torch.equal(dims, other) for other in others)
    assert len(masked_dims(10, 0.0, seed=0, repeat=0, modality=0)) == 0
    assert masked_dims(10, 1.0, seed=0, repeat=0, modality=0).tolist() == list(range(10))


def test_same_seed_same_table_other_seed_another(checkpoint, table):
    again = feature_mask_checkpoint(checkpoint, ratios=RATIOS, seed=3, repeats=2).table
    pd.testing.assert_frame_equal(table, again)
    other = feature_mask_checkpoint(checkpoint, ratios=RATIOS, seed=4, repeats=2).table
    partial = table["ratio"].isin([0.25, 0.5])
    assert not (table.loc[partial, "p_true"] == other.loc[partial, "p_true"]).all()
    assert (table.loc[~partial, "p_true"] == other.loc[~partial, "p_true"]).all()
    small = feature_mask_checkpoint(checkpoint, ratios=RATIOS, seed=3, repeats=2, batch_size=3)
    assert (small.table["pred"] == table["pred"]).all()
    assert small.table["p_true"].to_numpy() == pytest.approx(table["p_true"].to_numpy())


def test_ratio_one_is_the_subset_without_that_modality(checkpoint, table):
    subsets = subsets_checkpoint(checkpoint, mask="feature").table.set_index(
        ["subset", "sample_id"]
    )
    full = table[(table["ratio"] == 1.0) & (table["repeat"] == 0)]
    for modality, rows in full.groupby("modality"):
        rest = "+".join(m for m in ["a", "b", "c"] if m != modality)
        expected = subsets.loc[rest].loc[rows["sample_id"]]
        assert rows["pred"].tolist() == expected["pred"].tolist()
        assert rows["p_true"].to_numpy() == pytest.approx(expected["p_true"].to_numpy())


def test_accuracy_heatmap_is_the_mean_over_repeats(table):
    heatmap = feature_mask_accuracy(table).set_index("modality")
    assert list(heatmap.index) == ["a", "b", "c"]
    assert list(heatmap.columns) == ["0", "0.25", "0.5", "1"]
    per_repeat = table.groupby(["modality", "ratio", "repeat"])["correct"].mean()
    by_pandas = per_repeat.groupby(["modality", "ratio"]).mean()
    assert heatmap.loc["b", "0.5"] == pytest.approx(by_pandas[("b", 0.5)])
    assert heatmap.loc["c", "1"] == pytest.approx(by_pandas[("c", 1.0)])


def test_ratios_parse_and_refuse():
    assert parse_ratios("0,0.1,...,0.9") == pytest.approx([k / 10 for k in range(10)])
    assert parse_ratios(" 0.5, 1 ") == [0.5, 1.0]
    for bad in ("", "1.5", "-0.1", "x", "0,0.5,0.5", "0,0.3,...,1", "0,...,1", "nan"):
        with pytest.raises(UserError):
            parse_ratios(bad)


def test_a_model_without_per_modality_features_is_refused(checkpoint):
    class Joint(nn.Module):
        def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            return torch.cat(list(inputs.values()), 1)

    loaded = load_with_data(checkpoint)
    data = ParquetSamples(loaded.root, "test", loaded.modalities, manifest=loaded.manifest)
    with pytest.raises(UserError, match="one encoder per modality"):
        feature_mask_dataset(Joint(), data, [0.5], device=torch.device("cpu"))


def test_the_command_writes_the_table_with_how_it_was_made(checkpoint, tmp_path):
    out = tmp_path / "fm.parquet"
    result = invoke(
        checkpoint, "--method", "feature-mask", "--ratios", "0,0.5,...,1", "--repeats", "2",
        "--seed", "3", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "accuracy with a share" in result.output and "0.5" in result.output
    meta = {k.decode(): v.decode() for k, v in pq.read_schema(out).metadata.items()}
    assert meta["mmval.method"] == "feature-mask" and meta["mmval.mask"] == "feature"
    assert json.loads(meta["mmval.ratios"]) == [0.0, 0.5, 1.0]
    assert (meta["mmval.repeats"], meta["mmval.seed"]) == ("2", "3")
    assert json.loads(meta["mmval.modalities"]) == ["a", "b", "c"]
    written = pd.read_parquet(out)
    assert sorted(written["ratio"].unique()) == [0.0, 0.5, 1.0]
    assert written["repeat"].nunique() == 2


@pytest.mark.parametrize(
    "args",
    [
        ["--method", "feature-mask", "--ratios", "0,2"],
        ["--method", "feature-mask", "--ratios", ""],
        ["--method", "feature-mask", "--mask", "input"],
        ["--method", "feature-mask", "--wide"],
        ["--method", "feature-mask", "--corrupt", "a=gaussian:5"],
        ["--method", "shapley", "--ratios", "0,0.5"],
        ["--method", "subsets", "--ratios", "0,0.5"],
    ],
)
def test_user_mistakes_exit_2(checkpoint, tmp_path, args):
    result = invoke(checkpoint, *args, "--out", tmp_path / "x.parquet")
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "x.parquet").exists()


def test_help_marks_the_protocol_as_ours():
    result = invoke("--help")
    assert result.exit_code == 0
    assert "feature-mask" in result.output and "--ratios" in result.output
    assert result.output.count("[ours]") >= 2
