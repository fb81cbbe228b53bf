"""Sweeps: expansion of methods x grid x seeds into validated recipes, errors that name the field
and the combination, the CLI on the synthetic fixture, restart after a stop, failure policy."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mmval.cli.main import app
from typer.testing import CliRunner

from mmval.data.manifest import load_dataset_manifest
from mmval.engine.loop import Callback, Fit
from mmval.errors import UserError
from mmval.recipe import check_against_data, load_recipe
from mmval.sweep import load_plan, plan_from_raw, run_plan
from tests.conftest import Crash

runner = CliRunner()
RECIPES = Path(__file__).parents[1] / "recipes"


def sweep_raw(tmp_path: Path, data: Path, **changes: object) -> dict:
    raw: dict = {
        "name": "sw",
        "seeds": [0, 1],
        "methods": ["concat", "ogm_ge"],
        "data": {"path": str(data)},
        "model": {"encoder": {"hidden": [16], "out_dim": 8, "dropout": 0.1}},
        "optim": {"name": "adam", "lr": 0.01},
        "train": {"epochs": 2, "batch_size": 32},
        "output": str(tmp_path / "runs"),
    }
    raw.update(changes)
    return raw


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def error_of(raw: dict) -> str:
    with pytest.raises(UserError) as info:
        plan_from_raw(raw, "sweep.yaml")
    return str(info.value)


def test_expansion_is_the_product_with_readable_names(tmp_path):
    raw = sweep_raw(
        tmp_path,
        tmp_path / "data",
        seeds=[0, 1, 2],
        methods=[
            "concat",
            "ogm_ge",
            {"name": "pmr", "momentum": 0.5},
            "mmcosine",
            {"name": "opm", "alpha": 2.0, "modulation_starts": 0},
        ],
        grid={"method.alpha": [0.1, 0.5], "optim": {"lr": [0.01, 0.001]}},
    )
    plan = plan_from_raw(raw, "sweep.yaml")
    # alpha applies to ogm_ge and pmr; opm has one but sets it itself; mmcosine has none:
    # concat 2 + ogm_ge 4 + pmr 4 + mmcosine 2 + opm 2 = 14 variants
    labels = [v.label for v in plan.variants]
    assert labels == [
        "concat-lr0.01",
        "concat-lr0.001",
        "ogm_ge-alpha0.1-lr0.01",
        "ogm_ge-alpha0.1-lr0.001",
        "ogm_ge-alpha0.5-lr0.01",
        "ogm_ge-alpha0.5-lr0.001",
        "pmr-alpha0.1-lr0.01",
        "pmr-alpha0.1-lr0.001",
        "pmr-alpha0.5-lr0.01",
        "pmr-alpha0.5-lr0.001",
        "mmcosine-lr0.01",
        "mmcosine-lr0.001",
        "opm-lr0.01",
        "opm-lr0.001",
    ]
    assert len(plan.runs()) == 42 and plan.is_sweep
    ogm = plan.variants[5].recipe
    assert (ogm.method.name, ogm.method.alpha, ogm.optim.lr) == ("ogm_ge", 0.5, 0.001)
    assert plan.variants[7].recipe.method.momentum == 0.5  # the entry's own setting is kept
    assert plan.variants[10].recipe.model.fusion.name == "cosine"  # the method's own fusion
    assert plan.variants[13].recipe.method.alpha == 2.0
    assert ogm.output == tmp_path / "runs" / "sw" and ogm.name == "ogm_ge-alpha0.5-lr0.001"
    # each grid point is its own setting, so the report keeps them apart
    assert len({v.recipe.settings_hash() for v in plan.variants}) == 14


def test_entries_of_one_method_are_told_apart_by_what_differs(tmp_path):
    raw = sweep_raw(
        tmp_path,
        tmp_path / "data",
        methods=["ogm_ge", {"name": "ogm_ge", "alpha": 0.8, "modulation_ends": 50}],
        grid={"model.fusion": ["concat", "sum"]},
    )
    labels = [v.label for v in plan_from_raw(raw, "s").variants]
    # the first entry shows the published defaults (alpha 0.1, modulation_ends 50): only alpha
    assert labels == [
        "ogm_ge-alpha0.1-fusion_concat",
        "ogm_ge-alpha0.1-fusion_sum",
        "ogm_ge-alpha0.8-fusion_concat",
        "ogm_ge-alpha0.8-fusion_sum",
    ]


def test_errors_name_the_field(tmp_path):
    data = tmp_path / "data"
    assert "methods[1]" in error_of(sweep_raw(tmp_path, data, methods=["concat", "ogmge"]))
    message = error_of(sweep_raw(tmp_path, data, methods=["concat", {"name": "pmr", "alpha": -1}]))
    assert "methods[1].alpha" in message and "greater than or equal to 0" in message
    message = error_of(sweep_raw(tmp_path, data, grid={"method.alpah": [1.0]}))
    assert "grid.method.alpah: no method of this sweep has a field 'alpah'" in message
    assert "grid.seeds: cannot be swept" in error_of(sweep_raw(tmp_path, data, grid={"seeds": [1]}))
    assert "grid.optim.lr: values repeat" in error_of(
        sweep_raw(tmp_path, data, grid={"optim.lr": [0.1, 0.1]})
    )
    assert "grid.optim.lr" in error_of(sweep_raw(tmp_path, data, grid={"optim.lr": 0.1}))
    message = error_of(
        sweep_raw(
            tmp_path,
            data,
            methods=["concat", {"name": "ogm_ge", "alpha": 0.3}],
            grid={"method.alpha": [0.1, 0.5]},
        )
    )
    assert "grid.method.alpha: every method with a field 'alpha' sets it in methods:" in message
    both = sweep_raw(tmp_path, data, method={"name": "concat"})
    assert "methods: give method: or methods:, not both" in error_of(both)
    assert "share a run folder (concat)" in error_of(
        sweep_raw(tmp_path, data, methods=["concat", "concat"])
    )


def test_an_invalid_combination_is_named_and_nothing_trains(tmp_path, synthetic_dir):
    raw = sweep_raw(tmp_path, synthetic_dir, grid={"model.fusion": ["concat", "film"]})
    message = error_of(raw)
    assert 'run ogm_ge-fusion_film (methods[1] ogm_ge, model.fusion="film") is invalid' in message
    assert "model.fusion: ogm_ge needs per-modality logits" in message
    raw["data"]["modalities"] = ["a", "b", "c"]  # now concat + film is wrong too (3 modalities)
    message = error_of(raw)
    assert 'run concat-fusion_film (methods[0] concat, model.fusion="film")' in message
    assert "model.fusion: film fusion takes exactly two modalities" in message
    assert "(2 of 4 combinations are invalid: concat-fusion_film, ogm_ge-fusion_film)" in message
    result = runner.invoke(app, ["train", "--recipe", str(write(tmp_path, raw))])
    assert result.exit_code == 2 and "model.fusion" in result.output
    assert not (tmp_path / "runs").exists()
    # known only once the data set names its modalities: checked before the first run too
    two = sweep_raw(tmp_path, synthetic_dir, grid={"model.fusion": ["concat", "gated"]})
    two["methods"] = ["concat"]
    result = runner.invoke(app, ["train", "--recipe", str(write(tmp_path, two))])
    assert result.exit_code == 2 and "exactly two" in result.output
    assert not (tmp_path / "runs").exists()


def test_a_plain_recipe_loader_points_to_the_sweep(tmp_path):
    path = write(tmp_path, sweep_raw(tmp_path, tmp_path / "data"))
    with pytest.raises(UserError, match="is a sweep"):
        load_recipe(path)


def test_shipped_sweep_expands_to_valid_runs():
    plan = load_plan(RECIPES / "sweep-seed-methods.yaml")
    labels = [v.label for v in plan.variants]
    assert labels == [
        "concat",
        "ogm_ge",
        "mmcooperation_sample",
        "cmob",
        "concat+imml",
        "concat+c3r",
    ]
    assert len(plan.runs()) == 18
    modalities = [m.name for m in load_dataset_manifest("uci-mfeat")[0].modalities]
    for variant in plan.variants:
        assert str(variant.recipe.output) == "runs/sweep-uci-mfeat"
        check_against_data(variant.recipe, modalities)  # as the sweep checks before training
        # the same setting as the method's own uci-mfeat recipe: reports can pool them
        if "+" in variant.label:  # the plug-ins' own recipes put them on qmf, as the papers
            single = load_recipe(
                RECIPES / f"{variant.label[7:]}-uci-mfeat.yaml",
                ["method={name: concat}", "model.fusion=concat"],
            )
        else:
            single = load_recipe(RECIPES / f"{variant.label}-uci-mfeat.yaml")
        assert variant.recipe.settings_hash() == single.settings_hash()


def test_cooperation_sweep_holds_the_supplements_comparisons():
    """Tables 6 and 7 of Wei et al.'s supplement on UCF-101: every run differs from the
    paper's sample-level recipe only in the enhancement or the method."""
    plan = load_plan(RECIPES / "sweep-mmcooperation-ucf101.yaml")
    labels = [v.label for v in plan.variants]
    assert labels == [
        "concat",
        *(f"mmcooperation_sample-enhancement_{e}" for e in ("resample", "drop", "mask")),
        *(f"mmcooperation_fixed-rate{r}" for r in (0.1, 0.3, 0.5)),
    ]
    paper = load_recipe(RECIPES / "mmcooperation-ucf101.yaml")
    assert plan.variants[1].recipe.settings_hash() == paper.settings_hash()
    for variant in plan.variants:
        check_against_data(variant.recipe, ["visual", "flow"])
        assert variant.recipe.optim == paper.optim and variant.recipe.train == paper.train


def test_sweep_trains_each_run_and_a_stopped_sweep_restarts(tmp_path, synthetic_dir):
    path = write(tmp_path, sweep_raw(tmp_path, synthetic_dir))
    runs = tmp_path / "runs" / "sw"
    started: list[str] = []

    class Stopping(Callback):
        def on_train_start(self, fit: Fit) -> None:
            started.append(fit.title)

        def on_epoch_end(self, fit: Fit, row: dict[str, float]) -> None:
            if len(started) == 3:
                raise Crash

    with pytest.raises(Crash):
        run_plan(load_plan(path), callbacks=[Stopping()])
    assert started == ["concat seed0", "concat seed1", "ogm_ge seed0"]
    done = {d: (d / "summary.json").stat().st_mtime_ns for d in runs.glob("concat/seed*")}
    assert len(done) == 2 and not (runs / "ogm_ge/seed0/summary.json").exists()

    # the stopped run needs --resume (or --overwrite): said before anything trains
    result = runner.invoke(app, ["train", "--recipe", str(path)])
    assert result.exit_code == 2 and "hold a run this recipe has not finished" in result.output
    assert "ogm_ge/seed0" in result.output

    result = runner.invoke(app, ["train", "--recipe", str(path), "--resume"])
    assert result.exit_code == 0, result.output
    assert "2 trained, 2 skipped, 0 failed" in result.output
    for d, mtime in done.items():  # finished runs were not trained again
        assert (d / "summary.json").stat().st_mtime_ns == mtime
    for label in ("concat", "ogm_ge"):
        for seed in (0, 1):
            assert (runs / label / f"seed{seed}" / "summary.json").is_file()
    result = runner.invoke(app, ["train", "--recipe", str(path), "--dry-run"])
    assert result.exit_code == 0 and result.output.count("finished") == 4


def test_a_failed_run_does_not_stop_the_sweep(tmp_path):
    from mmval.data.prep import prepare

    data = tmp_path / "holes"
    prepare("synthetic", data, overrides=["per_class={train: 10, val: 4, test: 5, extra: 0}"])
    raw = sweep_raw(
        tmp_path, data, methods=["concat"], seeds=[0], grid={"data.splits.test": ["extra", "test"]}
    )
    result = runner.invoke(app, ["train", "--recipe", str(write(tmp_path, raw))])
    assert result.exit_code == 1, result.output
    assert "1 trained, 0 skipped, 1 failed" in result.output
    assert "no samples in split(s) test (extra)" in result.output
    assert (tmp_path / "runs/sw/concat-test_test/seed0/summary.json").is_file()


def test_methods_entries_carry_plug_ins_and_are_labelled_with_them():
    plan = load_plan(RECIPES / "sweep-plugins-uci-mfeat.yaml")
    by_label = {v.label: v.recipe for v in plan.variants}
    assert list(by_label) == [
        f"{base}{plugin}"
        for base in ("concat", "late_fusion", "qmf")
        for plugin in ("", "+c3r", "+imml")
    ]
    qmf_c3r = by_label["qmf+c3r"]
    assert qmf_c3r.method.name == "qmf" and [p.name for p in qmf_c3r.plugins] == ["c3r"]
    assert qmf_c3r.model.fusion.name == "qmf" and qmf_c3r.run_label() == "qmf+c3r"
    assert by_label["late_fusion"].plugins == []


def test_a_grid_reaches_into_a_plug_in():
    plan = load_plan(RECIPES / "sweep-c3r-grid-uci-mfeat.yaml")
    settings = {
        (v.recipe.plugins[0].lambda_v, v.recipe.plugins[0].lambda_fe) for v in plan.variants
    }
    assert len(settings) == len(plan.variants) == 36
