"""`mmval report --robustness`: the noise table (Avg./Worst. per level, as QMF) and the
missing-modality table (per subset, as C3R) over a tree of tiny runs with subsets tables,
checked against a pandas recomputation from the tables themselves."""

from __future__ import annotations

import shutil
from io import StringIO
from pathlib import Path

import pandas as pd
import pytest
from mmval.cli.main import app
from typer.testing import CliRunner

from mmval.data.corrupt import Corruption
from mmval.recipe import parse_recipe
from mmval.runner import Trainer
from mmval.valuation.evaluate import EvaluateConfig
from mmval.valuation.subsets import subsets_checkpoint, write_subsets

runner = CliRunner()
SEEDS = (0, 1, 2)
METHODS = ("concat", "late_fusion")
LEVELS = (5, 10)


def _recipe(method: str, data: Path, output: Path) -> dict:
    return {
        "name": method,
        "seeds": list(SEEDS),
        "data": {"path": str(data)},
        "model": {"encoder": {"hidden": [16], "out_dim": 8}}
        | ({"fusion": "late"} if method == "late_fusion" else {}),
        "method": {"name": method},
        "optim": {"name": "adam", "lr": 0.01},
        "train": {"epochs": 2, "batch_size": 64},
        "output": str(output),
    }


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory, synthetic_dir: Path) -> Path:
    runs = tmp_path_factory.mktemp("robust") / "runs"
    for method in METHODS:
        recipe = parse_recipe(_recipe(method, synthetic_dir, runs), method)
        for seed in SEEDS:
            run = Trainer(recipe, seed).run().run_dir
            best = run / "best.pt"
            write_subsets(subsets_checkpoint(best), run / "evaluate" / "subsets.parquet")
            for level in LEVELS:
                noisy = subsets_checkpoint(
                    best, corruptions=[Corruption.parse(f"a=gaussian:{level}")], repeats=3, seed=7
                )
                write_subsets(noisy, run / "evaluate" / f"a-gaussian-{level}.parquet")
    return runs


def _csv(runs: Path, *args: str) -> pd.DataFrame:
    result = runner.invoke(app, ["report", str(runs), "--robustness", "--format", "csv", *args])
    assert result.exit_code == 0, result.output
    return pd.read_csv(StringIO(result.stdout), keep_default_na=False, na_values=[""])


def _full_set(path: Path) -> pd.Series:
    table = pd.read_parquet(path)
    return table[table["size"] == 3].groupby("repeat")["correct"].mean() * 100


def test_noise_table_matches_pandas(tree):
    csv = _csv(tree)
    noise = csv[csv["table"].str.contains("under noise")]
    assert set(noise["table"]) == {"synthetic: accuracy under noise (a=gaussian), test split"}
    assert list(dict.fromkeys(noise["group"])) == ["level 0", "level 5", "level 10"]
    for method in METHODS:
        for level in (0, *LEVELS):
            name = "subsets.parquet" if level == 0 else f"a-gaussian-{level}.parquet"
            per_seed = [_full_set(tree / method / f"seed{s}" / "evaluate" / name) for s in SEEDS]
            line = noise[(noise["method"] == method) & (noise["group"] == f"level {level}")]
            assert len(line) == 1
            means = pd.Series([acc.mean() for acc in per_seed])
            assert line["avg_mean"].iloc[0] == pytest.approx(means.mean(), abs=1e-4)
            assert line["avg_std"].iloc[0] == pytest.approx(means.std(ddof=1), abs=1e-4)
            worst = min(acc.min() for acc in per_seed)
            assert line["worst_mean"].iloc[0] == pytest.approx(worst, abs=1e-4)
            assert pd.isna(line["worst_std"].iloc[0])
            assert len(per_seed[0]) == (1 if level == 0 else 3)


def test_noise_lowers_accuracy_and_draws_differ(tree):
    accuracies = _full_set(tree / "concat" / "seed0" / "evaluate" / "a-gaussian-10.parquet")
    clean = _full_set(tree / "concat" / "seed0" / "evaluate" / "subsets.parquet")
    assert accuracies.nunique() > 1
    assert accuracies.mean() < clean.iloc[0]


def test_missing_modality_table_matches_pandas(tree):
    csv = _csv(tree)
    missing = csv[csv["table"].str.contains("missing modalities")]
    subsets = ["a", "b", "c", "a+b", "a+c", "b+c", "a+b+c"]
    for method in METHODS:
        per_seed = []
        for seed in SEEDS:
            table = pd.read_parquet(tree / method / f"seed{seed}" / "evaluate" / "subsets.parquet")
            per_seed.append(table.groupby("subset")["correct"].mean() * 100)
        frame = pd.DataFrame(per_seed)
        line = missing[missing["method"] == method].iloc[0]
        for subset in subsets:
            assert line[f"{subset}_mean"] == pytest.approx(frame[subset].mean(), abs=1e-4)
            assert line[f"{subset}_std"] == pytest.approx(frame[subset].std(ddof=1), abs=1e-4)
        assert line["mean_mean"] == pytest.approx(frame[subsets].mean(axis=1).mean(), abs=1e-4)


def test_baseline_tests_and_formats(tree):
    csv = _csv(tree, "--baseline", "concat")
    late = csv[(csv["method"] == "late_fusion") & (csv["group"] == "level 5")].iloc[0]
    base = csv[(csv["method"] == "concat") & (csv["group"] == "level 5")].iloc[0]
    assert late["avg_delta"] == pytest.approx(late["avg_mean"] - base["avg_mean"], abs=1e-4)
    assert late["worst_delta"] == pytest.approx(late["worst_mean"] - base["worst_mean"], abs=1e-4)
    assert not pd.isna(late["avg_p_ttest"]) and pd.isna(late["worst_p_ttest"])
    md = runner.invoke(app, ["report", str(tree), "--robustness", "--format", "md"])
    assert md.exit_code == 0, md.output
    header = next(line for line in md.stdout.splitlines() if line.startswith("| Method | level"))
    assert header.index("level 0 Avg.") < header.index("level 5 Avg.") < header.index("level 10")
    assert "Worst.: the lowest accuracy of any (seed, draw)" in md.stdout
    for fmt in ("latex", "html"):
        out = runner.invoke(app, ["report", str(tree), "--robustness", "--format", fmt])
        assert out.exit_code == 0, out.output
    assert out.stdout.count("<table") == 2 and "data:image/png;base64" in out.stdout


def test_left_out_and_refusals(tree, tmp_path):
    copy = tmp_path / "runs"
    shutil.copytree(tree, copy)
    evaluate = copy / "concat" / "seed0" / "evaluate"
    shutil.copy(evaluate / "a-gaussian-5.parquet", evaluate / "again.parquet")
    shutil.copy(evaluate / "subsets.parquet", copy / "stray.parquet")
    result = runner.invoke(app, ["report", str(copy), "--robustness", "--format", "md"])
    assert result.exit_code == 0, result.output
    assert "duplicate: the same evaluation as" in result.stdout
    assert "stray.parquet: evaluation table outside a finished, reported run" in result.stdout
    assert _csv(copy).equals(_csv(tree))  # neither counted
    for path in copy.rglob("evaluate"):
        shutil.rmtree(path)
    (copy / "stray.parquet").unlink()
    refused = runner.invoke(app, ["report", str(copy), "--robustness"])
    assert refused.exit_code == 2 and "no evaluation tables" in refused.output
    metric = runner.invoke(app, ["report", str(tree), "--robustness", "--metric", "f1"])
    assert metric.exit_code == 2 and "--metric does not apply" in metric.output


def test_evaluate_section_levels_are_joined_and_checked():
    config = EvaluateConfig.model_validate(
        {"corrupt": ["a=gaussian:0", 5, 10, "b=salt-pepper:0", 5, 10], "repeats": 2}
    )
    assert config.corrupt == ["a=gaussian:0,5,10", "b=salt-pepper:0,5,10"]
    assert [[str(c) for c in cs] for cs in config.conditions()] == [
        ["a=gaussian:0", "b=salt-pepper:0"],
        ["a=gaussian:5", "b=salt-pepper:5"],
        ["a=gaussian:10", "b=salt-pepper:10"],
    ]
    one = EvaluateConfig(corrupt=["a=gaussian:0,5", "b=mask:30"])
    assert [[str(c) for c in cs] for cs in one.conditions()] == [
        ["a=gaussian:0", "b=mask:30"],
        ["a=gaussian:5", "b=mask:30"],
    ]
    for bad in (["a=gaussian:0,5", "b=mask:10,20,30"], ["a=fog:5"], ["a=mask:150"]):
        with pytest.raises(ValueError, match="corrupt"):
            EvaluateConfig(corrupt=bad)
    with pytest.raises(ValueError, match="ratios"):
        EvaluateConfig(feature_mask=[0.5, 1.5])


def test_recipe_evaluate_section_writes_the_tables_once(synthetic_dir, tmp_path):
    raw = _recipe("concat", synthetic_dir, tmp_path / "runs") | {"seeds": [0]}
    raw["evaluate"] = {"corrupt": ["a=gaussian:0,10"], "repeats": 2, "feature_mask": [0, 0.5]}
    recipe = parse_recipe(raw, "evaluate")
    run = Trainer(recipe, 0).run().run_dir
    folder = run / "evaluate"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["feature-mask.parquet", "noise-a-gaussian-10.parquet", "subsets.parquet"]
    noisy = pd.read_parquet(folder / "noise-a-gaussian-10.parquet")
    direct = subsets_checkpoint(
        run / "best.pt", corruptions=[Corruption.parse("a=gaussian:10")], repeats=2, seed=0
    )
    pd.testing.assert_frame_equal(noisy, direct.table)
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert Trainer(recipe, 0).run().skipped  # finished: nothing trained, nothing recomputed
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    raw["evaluate"]["corrupt"] = ["a=gaussian:0,10,20"]
    assert Trainer(parse_recipe(raw, "evaluate"), 0).run().skipped
    assert (folder / "noise-a-gaussian-20.parquet").is_file()
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.name in stamps} == stamps
    result = runner.invoke(
        app, ["report", str(tmp_path / "runs"), "--robustness", "--format", "html"]
    )
    assert result.exit_code == 0, result.output
    assert 'id="feature-mask-synthetic"' in result.stdout and "level 20" in result.stdout
