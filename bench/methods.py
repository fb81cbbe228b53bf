"""Training cost of every method relative to plain concat training, on uci-mfeat.

Each `recipes/<method>-uci-mfeat.yaml` is trained for a few epochs (seed 0, same data, same
batch size, in a temporary folder) in one process, one after the other; the figure per method
is its mean training time per epoch (evaluation excluded) over 10 epochs, divided by concat's:
periodic work (G-Blending's weight estimation every 10 epochs, Relearning's re-initialisation
every 5 in its uci-mfeat recipe) is counted at its own cadence. Runs that re-sample (more or
fewer steps per epoch) are compared per epoch, as a user experiences them.
Run: python bench/methods.py [--epochs N] [--methods a,b] (only those, with concat, merged into
the results file). Prints one JSON object on its last line and writes it
to bench/results/methods.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import pandas as pd
from _results import RESULTS, machine, publish

from mmval.recipe import load_recipe
from mmval.runner import Trainer

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


VIEWS = ("fou", "fac", "kar", "pix", "zer", "mor")


def epoch_seconds(recipe_file: Path, epochs: int, *extra: str) -> float:
    """Train seed 0 in the current folder (runs/, data/) and return its epoch time."""
    recipe = load_recipe(recipe_file, [f"train.epochs={epochs}", "seeds=[0]", *extra])
    result = Trainer(recipe, 0).run()
    metrics = pd.read_parquet(result.run_dir / "metrics.parquet")
    return float(metrics["seconds"].mean())


def ordered(files: list[Path]) -> list[Path]:
    """Runs that others start from come first: linear_probe probes ogm_ge's checkpoint, umt
    distils the unimodal runs (the recipes name those checkpoints relative to the folder)."""
    first = {"concat-uci-mfeat.yaml": 0, "ogm_ge-uci-mfeat.yaml": 1, "unimodal-uci-mfeat.yaml": 2}
    return sorted(files, key=lambda f: (first.get(f.name, 3), f.name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--methods",
        help="comma-separated methods to time (with concat, always); their figures replace "
        "those in the results file, the others are kept",
    )
    args = parser.parse_args()
    chosen = None if args.methods is None else {"concat", *args.methods.split(",")}
    seconds: dict[str, float] = {}
    here = Path.cwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            singles = [
                f for f in RECIPES.glob("*-uci-mfeat.yaml") if not f.name.startswith("sweep")
            ]
            for f in ordered(singles):
                name = f.name.removesuffix("-uci-mfeat.yaml")
                if chosen is not None and name not in chosen:
                    continue
                if name == "unimodal":  # every view, for umt's teachers; timed on the first
                    times = [epoch_seconds(f, args.epochs, f"method.modality={v}") for v in VIEWS]
                    seconds[name] = times[0]
                else:
                    seconds[name] = epoch_seconds(f, args.epochs)
        finally:
            os.chdir(here)
    base = seconds["concat"]
    measured_on = machine()
    ratios = {
        f"{name}_over_concat": round(s / base, 2) for name, s in seconds.items() if name != "concat"
    }
    out = RESULTS / "methods.json"
    if chosen is not None and out.is_file():  # a partial run: keep the other methods' figures
        kept = json.loads(out.read_text())
        ratios = {k: v for k, v in kept.items() if k.endswith("_over_concat")} | ratios
        chosen_names = ", ".join(sorted(chosen - {"concat"}))
        measured_on = f"{kept.get('machine')}; {chosen_names}: {measured_on}"
    result = {
        "bench": "methods",
        "data": "uci-mfeat (6 modalities, MLP encoders), recipes/<method>-uci-mfeat.yaml",
        "epochs": args.epochs,
        "concat_epoch_s": round(base, 4),
        **dict(sorted(ratios.items())),
        "machine": measured_on,
    }
    publish("methods", result)


if __name__ == "__main__":
    main()
