"""`mmval quickstart`: the whole pipeline on real data in a few minutes on two CPU cores.

Prepares uci-mfeat into ./data, trains concat and OGM-GE (3 seeds each) and the six unimodal
baselines (1 seed each) into ./runs, values the test split of one concat checkpoint, and returns
the comparison table and the mean contribution of each modality.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pandas as pd

from mmval.artifacts.layout import BEST
from mmval.compose import compose_recipe
from mmval.data.prep import prepare
from mmval.engine.loop import Callback
from mmval.recipe import Recipe, parse_recipe
from mmval.report import collect_runs, summarize
from mmval.runner import Trainer
from mmval.valuation.run import value_checkpoint, write_valuation
from mmval.valuation.summary import contribution_summary

DATASET = "uci-mfeat"
VIEWS = ("fou", "fac", "kar", "pix", "zer", "mor")


@dataclass
class QuickstartResult:
    report: pd.DataFrame
    contributions: pd.DataFrame
    valuation_file: Path


def packaged_recipe(file_name: str, overrides: list[str]) -> Recipe:
    """A recipe shipped in the package; its bases (recipes/base/) are shipped next to it."""
    with resources.as_file(resources.files("mmval.recipes") / file_name) as path:
        raw = compose_recipe(path, overrides)
    return parse_recipe(raw, file_name)


def quickstart_recipes(workdir: Path) -> list[Recipe]:
    common = [f"data.root={workdir / 'data'}", f"output={workdir / 'runs'}"]
    recipes = [
        packaged_recipe("concat-uci-mfeat.yaml", common),
        packaged_recipe("ogm_ge-uci-mfeat.yaml", common),
    ]
    recipes += [
        packaged_recipe("unimodal-uci-mfeat.yaml", [*common, f"method.modality={v}", "seeds=[0]"])
        for v in VIEWS
    ]
    return recipes


def run_quickstart(workdir: Path, callbacks: Sequence[Callback] = ()) -> QuickstartResult:
    workdir = Path(workdir)
    prepare(DATASET, workdir / "data" / DATASET)
    recipes = quickstart_recipes(workdir)
    for recipe in recipes:
        for seed in recipe.seeds:
            Trainer(recipe, seed, callbacks=callbacks).run()
    concat = recipes[0]
    checkpoint = Path(concat.output) / concat.name / f"seed{concat.seeds[0]}" / BEST
    valuation = value_checkpoint(checkpoint, split="test")
    valuation_file = checkpoint.parent / "contrib-test.parquet"
    write_valuation(valuation, valuation_file)
    return QuickstartResult(
        report=summarize(collect_runs(workdir / "runs")),
        contributions=contribution_summary(valuation.table),
        valuation_file=valuation_file,
    )
