"""Reports over many experiments: a grid sweep's rows named by the fields that differ and a
baseline per grid point, several folders, --methods/--exclude/--where, reference rows, figures
as PNG/PDF/SVG with their numbers as CSV, and `mmval value --lowest` with source paths."""

from __future__ import annotations

import math
import re
from io import StringIO
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from mmval.cli.main import app
from typer.testing import CliRunner

from mmval.data.shards import load_manifest
from mmval.errors import UserError
from mmval.recipe import parse_recipe
from mmval.report import Narrowing, compare, find_runs
from mmval.report.references import parse_reference
from mmval.report.tables import legend as comparison_legend
from mmval.runner import Trainer
from mmval.sweep import load_plan, run_plan
from mmval.valuation.run import value_checkpoint

runner = CliRunner()
POINTS = {"[a, b]": ["a", "b"], "[a, c]": ["a", "c"]}


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory, synthetic_dir: Path) -> Path:
    """runs/a: a sweep of concat and ogm_ge over two modality sets (ogm_ge also over two
    alphas), 2 seeds; runs/b: late_fusion, 2 seeds."""
    root = tmp_path_factory.mktemp("many")
    base = {
        "seeds": [0, 1],
        "data": {"path": str(synthetic_dir)},
        "model": {"encoder": {"hidden": [16], "out_dim": 8, "dropout": 0.1}},
        "optim": {"name": "adam", "lr": 0.01},
        "train": {"epochs": 2, "batch_size": 64},
    }
    sweep = base | {
        "name": "sw",
        "methods": ["concat", "ogm_ge"],
        "grid": {"data.modalities": list(POINTS.values()), "method.alpha": [0.1, 0.5]},
        "output": str(root / "a"),
    }
    (root / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    run_plan(load_plan(root / "sweep.yaml"))
    late = base | {"name": "late", "method": {"name": "late_fusion"}, "output": str(root / "b")}
    late["model"] = late["model"] | {"fusion": "late"}
    for seed in (0, 1):
        Trainer(parse_recipe(late, "late"), seed).run()
    return root


def _csv(*args: str) -> pd.DataFrame:
    result = runner.invoke(app, ["report", *args, "--format", "csv"])
    assert result.exit_code == 0, result.output
    return pd.read_csv(StringIO(result.stdout), keep_default_na=False, na_values=[""])


def _rows(table: pd.DataFrame) -> list[str]:
    variant = table["variant"].astype(object).fillna("")
    return sorted(table["method"] + variant.map(lambda v: f" ({v})" if v else ""))


def _test_acc(folder: Path) -> float:
    """A run's test accuracy (%) at its best validation epoch, from metrics.parquet alone."""
    history = pd.read_parquet(folder / "metrics.parquet")
    return 100 * float(history.loc[history["val_acc"].idxmax(), "test_acc"])


def test_grid_rows_are_named_by_the_fields_that_differ(grid):
    table = _csv(str(grid / "a"))
    assert _rows(table) == sorted(
        [f"concat (data.modalities={p})" for p in POINTS]
        + [
            f"ogm_ge (data.modalities={p}, method.alpha={a})"
            for p in POINTS
            for a in ("0.1", "0.5")
        ]
    )
    assert (table["n_seeds"] == 2).all()


def test_baseline_per_grid_point(grid):
    table = _csv(str(grid / "a"), "--baseline", "concat")
    sweep = grid / "a" / "sw"
    for _, line in table.iterrows():
        point = re.match(r"data\.modalities=(\[.*?\])", line["variant"]).group(1)
        base_row = f"concat (data.modalities={point})"
        assert line["baseline"] == base_row
        if line["method"] == "concat":
            assert math.isnan(line["acc_delta"])
            continue
        alpha = re.search(r"method\.alpha=([0-9.]+)$", line["variant"]).group(1)
        label = "_".join(POINTS[point])
        mine = [
            _test_acc(sweep / f"ogm_ge-modalities_{label}-alpha{alpha}" / f"seed{s}")
            for s in (0, 1)
        ]
        base = [_test_acc(sweep / f"concat-modalities_{label}" / f"seed{s}") for s in (0, 1)]
        assert line["matched_seeds"] == 2
        assert line["acc_delta"] == pytest.approx(sum(mine) / 2 - sum(base) / 2, abs=1e-4), line[
            "variant"
        ]
    # a row name still picks one recipe for every row
    named = _csv(str(grid / "a"), "--baseline", "concat (data.modalities=[a, c])")
    assert set(named["baseline"]) == {"concat (data.modalities=[a, c])"}
    # ogm_ge's recipes differ in alpha, which concat has not: no row matches one of them
    result = runner.invoke(app, ["report", str(grid / "a"), "--baseline", "ogm_ge"])
    assert result.exit_code == 2 and "name one of them" in result.output


def test_rows_off_the_grid_have_no_baseline_and_are_named(grid):
    # late_fusion (runs/b) trained on all three modalities: no concat recipe of its grid point
    tree = find_runs([grid / "a", grid / "b"])
    comparison = compare(tree, ["acc"], baseline="concat")
    assert comparison.baseline_fields == ["data.modalities"]
    assert comparison.unmatched == ["late_fusion"]
    line = comparison.long.set_index("row").loc["late_fusion"]
    assert line["baseline"] == "" and math.isnan(line["acc_delta"])
    assert comparison.long["acc_delta"].notna().sum() == 4  # the ogm_ge rows
    legend = " ".join(comparison_legend(comparison))
    assert "the same data.modalities" in legend and "no single one for late_fusion" in legend
    # narrowed to one modality set, ogm_ge's recipes differ in alpha, which concat lacks
    narrowed = find_runs(grid / "a", narrowing=Narrowing(where=("data.modalities=[a, b]",)))
    with pytest.raises(UserError, match="name one of them"):
        compare(narrowed, ["acc"], baseline="ogm_ge")


def test_several_folders_methods_exclude_and_where(grid):
    both = _csv(str(grid / "a"), str(grid / "b"))
    assert "late_fusion" in set(both["method"]) and len(both) == 7
    # a folder given twice (or inside another) counts once
    assert len(_csv(str(grid), str(grid / "b"))) == 7
    only = _csv(str(grid / "a"), str(grid / "b"), "--methods", "late_fusion,concat")
    assert set(only["method"]) == {"late_fusion", "concat"}
    assert set(_csv(str(grid), "--exclude", "ogm_ge")["method"]) == {"concat", "late_fusion"}
    # --where keeps the runs with that value and those without the field (concat has no
    # alpha); the value is YAML, numbers compared by value
    where = _csv(str(grid), "--where", "method.alpha=5e-1", "--where", "data.modalities=[a, c]")
    assert _rows(where) == ["concat", "ogm_ge"]
    full = _csv(str(grid / "a"))
    full = full.assign(
        row=[f"{m} ({v})" for m, v in zip(full["method"], full["variant"], strict=True)]
    )
    kept = ("concat (data.modalities=[a, c])", "ogm_ge (data.modalities=[a, c], method.alpha=0.5)")
    assert set(where["settings_hash"]) == set(
        full.set_index("row").loc[list(kept), "settings_hash"]
    )
    for args, message in (
        (["--where", "method.beta=1"], "no run's recipe has a field method.beta"),
        (["--where", "method.alpha=0.7"], "values found: 0.1, 0.5"),
        (["--where", "alpha"], "dotted.path=value"),
        (["--methods", "concat,nope"], "--methods: no finished run of nope"),
        (["--exclude", "nope"], "--exclude: no finished run of nope"),
    ):
        result = runner.invoke(app, ["report", str(grid), *args])
        assert result.exit_code == 2 and message in result.output, (args, result.output)
    markdown = runner.invoke(app, ["report", str(grid), "--format", "md", "--exclude", "ogm_ge"])
    assert "Runs shown: --exclude ogm_ge." in markdown.stdout


def test_reference_rows_are_shown_unranked_and_never_tested(grid, tmp_path):
    refs = tmp_path / "refs.yaml"
    refs.write_text(yaml.safe_dump({"synthetic": {"Paper B": {"acc": 99.0, "f1": 1.5}}}))
    args = [str(grid / "b"), "--baseline", "late_fusion", "--reference", "Paper A=99.5"]
    table = _csv(*args, "--references", str(refs))
    paper = table.set_index("method").loc[["Paper A", "Paper B"]]
    assert list(paper["settings_hash"]) == ["reference", "reference"]
    assert list(paper["n_seeds"]) == [0, 0]
    assert list(paper["acc_mean"]) == [99.5, 99.0] and paper.loc["Paper B", "f1_mean"] == 1.5
    assert paper[["acc_delta", "acc_p_ttest", "acc_p_bootstrap"]].isna().all().all()
    markdown = runner.invoke(app, ["report", *args, "--references", str(refs), "--format", "md"])
    lines = {line.split(" | ")[0]: line for line in markdown.stdout.splitlines()}
    # 99.5 is above every run, yet not bold: references have no rank; late_fusion, alone, none
    assert lines["| *Paper A*"].count("**") == 0 and "99.50" in lines["| *Paper A*"]
    assert "<u>" not in markdown.stdout and "**" not in markdown.stdout
    assert "In italics: published numbers, not run here (Paper A, Paper B)" in markdown.stdout
    latex = runner.invoke(app, ["report", *args, "--format", "latex"]).stdout
    assert r"\textit{Paper A}" in latex
    # two data sets need the data set named; a wrong data set or metric is refused
    assert parse_reference("OGM-GE (paper)@crema-d:f1=61.7").metric == "f1"
    for ref, message in (
        ("X@nowhere=1", "no data set 'nowhere'"),
        ("X@synthetic:mae=1", "shows no metric mae"),
        ("late_fusion=1", "already a row of runs"),
        ("X=abc", "not a finite number"),
        ("=1", "write NAME=VALUE"),
    ):
        result = runner.invoke(app, ["report", str(grid / "b"), "--reference", ref])
        assert result.exit_code == 2 and message in result.output, (ref, result.output)


def test_figures_in_three_formats_with_their_numbers(grid, tmp_path):
    figs = tmp_path / "figs"
    result = runner.invoke(app, ["report", str(grid / "b"), "--figures", str(figs)])
    assert result.exit_code == 0, result.output
    stems = {p.stem for p in figs.iterdir()}
    assert stems == {"accuracy-synthetic", "unimodal-synthetic"}
    for stem in stems:
        assert (figs / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (figs / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"
        assert b"<svg" in (figs / f"{stem}.svg").read_bytes()[:1000]
    plotted = pd.read_csv(figs / "accuracy-synthetic.csv")
    histories = [
        pd.read_parquet(grid / "b" / "late" / f"seed{s}" / "metrics.parquet") for s in (0, 1)
    ]
    both = pd.concat(histories).groupby("epoch")["test_acc"]
    assert list(plotted["row"].unique()) == ["late_fusion"]
    assert plotted["mean"].to_numpy() == pytest.approx(100 * both.mean().to_numpy())
    assert plotted["std"].to_numpy() == pytest.approx(100 * both.std(ddof=1).to_numpy())


@pytest.fixture(scope="module")
def uci_run(tmp_path_factory: pytest.TempPathFactory, uci_dir: Path) -> Path:
    recipe = {
        "name": "uci",
        "seeds": [0],
        "data": {"path": str(uci_dir), "modalities": ["fac", "pix", "zer"]},
        "model": {"encoder": {"hidden": [16], "out_dim": 8, "dropout": 0.1}},
        "method": {"name": "concat"},
        "optim": {"name": "adam", "lr": 0.01},
        "train": {"epochs": 2, "batch_size": 256},
        "output": str(tmp_path_factory.mktemp("uci-run")),
    }
    return Trainer(parse_recipe(recipe, "uci"), 0).run().run_dir


def test_value_tables_name_classes_and_lowest_lists_sources(uci_run, uci_dir, tmp_path):
    full = value_checkpoint(uci_run / "best.pt", config=None).table
    classes = load_manifest(uci_dir).classes
    assert (full["class"] == full["label"].map(lambda i: classes[i])).all()
    out = tmp_path / "lowest.csv"
    args = ["value", str(uci_run / "best.pt"), "--lowest", "pix", "--k", "7", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    lowest = pd.read_csv(out)
    assert list(lowest.columns) == [
        "rank",
        "sample_id",
        "label",
        "class",
        "contribution",
        "pred",
        "correct",
        "v_full",
        "source",
    ]
    pix = full[full["modality"] == "pix"].sort_values(["contribution", "sample_id"])
    assert list(lowest["sample_id"]) == list(pix["sample_id"][:7])
    want = pix["contribution"][:7].to_numpy()
    assert lowest["contribution"].to_numpy() == pytest.approx(want, abs=1e-5)  # CSV: 6 digits
    # the sources, read from the test shards directly
    manifest = load_manifest(uci_dir)
    shards = [uci_dir / s.path for s in manifest.splits["test"].shards]
    sources = pd.concat([pd.read_parquet(p, columns=["sample_id", "source"]) for p in shards])
    want = sources.set_index("sample_id").loc[lowest["sample_id"], "source"]
    assert list(lowest["source"]) == list(want) and all(s.startswith("row ") for s in want)
    assert lowest["source"].iloc[0] in result.output
    # as Parquet: the k rows, with metadata that no report takes for a contribution table
    parquet = uci_run / "lowest-pix.parquet"
    args[-1] = str(parquet)
    assert runner.invoke(app, args).exit_code == 0
    meta = pq.read_schema(parquet).metadata
    assert b"mmval.method" not in meta and meta[b"mmval.lowest"] == b"pix"
    assert meta[b"mmval.valued_with"] == b"shapley"
    report = runner.invoke(app, ["report", str(uci_run.parent), "--figures", str(tmp_path / "f")])
    assert report.exit_code == 0, report.output
    assert not list((tmp_path / "f").glob("contribution-*"))
    for extra, message in (
        (["--lowest", "nope"], "no modality 'nope'"),
        (["--k", "3"], "pass --lowest MODALITY"),
        (["--lowest", "pix", "--method", "subsets"], "computes none"),
    ):
        result = runner.invoke(app, ["value", str(uci_run / "best.pt"), *extra])
        assert result.exit_code == 2 and message in result.output, (extra, result.output)
