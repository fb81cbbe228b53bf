"""The weakest-modality chart of a run folder holding two value tables (`mmval value
--benefit correct` and `--benefit prob --wide`): one group of bars per table, labelled with its
benefit and mask, each equal to a pandas recomputation from that table's file alone."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest
from mmval.cli.main import app
from typer.testing import CliRunner

from mmval.recipe import load_recipe
from mmval.report import find_runs
from mmval.report.figures import find_value_tables, make_figures, weakest_shares
from mmval.report.tables import compare
from mmval.runner import Trainer

runner = CliRunner()


def recomputed(path) -> pd.Series:
    """% of samples whose modality alone has the lowest contribution, by modality."""
    meta = pq.read_schema(path).metadata
    frame = pd.read_parquet(path)
    if "modality" not in frame.columns:  # --wide: one column per modality
        modalities = json.loads(meta[b"mmval.modalities"])
        frame = frame.melt("sample_id", modalities, "modality", "contribution")
    wide = frame.pivot(index="sample_id", columns="modality", values="contribution")
    lowest = wide.eq(wide.min(axis=1), axis=0)
    alone = lowest[lowest.sum(axis=1) == 1]
    return 100 * alone.sum() / len(wide)


def test_two_tables_in_one_run_folder_are_two_labelled_series(recipe_file, tmp_path):
    recipe = load_recipe(recipe_file(train__epochs=2))
    run = Trainer(recipe, 0).run().run_dir
    tables = {"correct": run / "v-correct.parquet", "prob": run / "v-prob.parquet"}
    for args in (
        ["--benefit", "correct", "--out", str(tables["correct"])],
        ["--benefit", "prob", "--wide", "--mask", "input", "--out", str(tables["prob"])],
    ):
        result = runner.invoke(app, ["value", str(run / "best.pt"), *args])
        assert result.exit_code == 0, result.output
    tree = find_runs(tmp_path / "runs")
    shares = weakest_shares(find_value_tables(tree))
    labels = sorted(set(shares["label"]))
    assert labels == [
        "concat seed0 (shapley, correct, mask feature, test)",
        "concat seed0 (shapley, prob, mask input, test)",
    ]
    for benefit, path in tables.items():
        plotted = shares[shares["label"].str.contains(f", {benefit},")].set_index("modality")
        expected = recomputed(path)
        assert sorted(plotted.index) == sorted(expected.index)
        for modality, percent in expected.items():
            assert plotted.loc[modality, "weakest_percent"] == pytest.approx(percent)
    # the two settings give different shares: pooled, the chart showed neither
    by_table = shares.pivot(index="modality", columns="label", values="weakest_percent")
    assert not by_table.iloc[:, 0].equals(by_table.iloc[:, 1])
    figures = {f.name: f for f in make_figures(compare(tree, ["acc"]))}
    assert "one group of bars per value table" in figures["weakest-synthetic"].caption
