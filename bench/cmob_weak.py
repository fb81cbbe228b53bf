"""How many modalities CMoB marks weak under each reading of its confidence condition, by the
number of modalities M.

CMoB's benefit B(T) = |T| needs T's prediction right and T at least as confident as its subsets
(poster Eq. 1); `confidence` says which subsets (`subsets`: every evaluated one; `treatment`:
in ITE_j only S minus j) and `confidence_score` what the confidence is (`max_softmax` or
`true_class`), see mmval/valuation/cmob.py. A reading degenerates when it marks (nearly) every
modality of every sample weak: the masks are then the same for all modalities, no re-balancing.

What this runs: plain joint training (concat, the uci-mfeat recipe: six MLP encoders, Adam
1e-3, batch 64) on the first M views of UCI Multiple Features (fou, fac, kar, pix, zer, mor)
for M = 2, 3, 4, 6, and on the imbalanced synthetic pair of the README (fast/slow), each for 5
epochs (what CMoB has seen at its first valuation, warm-up 5) and for 20 (the recipe's length).
The train split is then valued in evaluation mode, as CMoB does, under the four readings.
Figures per reading: `weak` the mean share of weak modalities per correctly classified sample,
`all_weak` the share of correctly classified samples with every modality weak, and
`weak_all_samples` the share over every sample (misclassified ones have every modality weak by
construction); `misclassified` the share of training samples the full set gets wrong.
Run: python bench/cmob_weak.py [--seed S] [--quick]. Prints one JSON object on its last line
and writes it to bench/results/cmob_weak.json.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
from _results import add_quick, machine, publish

from mmval.data.prep import prepare
from mmval.recipe import load_recipe
from mmval.runner import Trainer
from mmval.valuation.config import ValuationConfig
from mmval.valuation.run import value_checkpoint

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "concat-uci-mfeat.yaml"
VIEWS = ["fou", "fac", "kar", "pix", "zer", "mor"]
READINGS = [
    (confidence, score)
    for confidence in ("subsets", "treatment")
    for score in ("max_softmax", "true_class")
]
SYNTHETIC = [  # the imbalanced pair of the README's seed-method table
    "modalities=[fast,slow]",
    "dims=[4,32]",
    "signal=[1.0,0.3]",
    "n_classes=10",
    "per_class={train: 200, val: 40, test: 80}",
]


def shares(checkpoint: Path, confidence: str, score: str) -> dict[str, float]:
    config = ValuationConfig(method="cmob", confidence=confidence, confidence_score=score)
    table = value_checkpoint(checkpoint, split="train", config=config).table
    m = table["modality"].nunique()
    weak = (table["contribution"].to_numpy() <= 1.0).reshape(-1, m)
    correct = table["correct"].to_numpy().reshape(-1, m)[:, 0]
    return {
        "weak": round(float(weak[correct].mean()), 3),
        "all_weak": round(float(weak[correct].all(1).mean()), 3),
        "weak_all_samples": round(float(weak.mean()), 3),
        "misclassified": round(float(1 - correct.mean()), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    add_quick(parser)
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    sizes, lengths = ((2,), (1,)) if args.quick else ((2, 3, 4, 6), (5, 20))
    sets = {f"uci-mfeat M={k}": (None, VIEWS[:k]) for k in sizes}
    results: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        uci = Path(tmp) / "uci-mfeat"
        prepare("uci-mfeat", uci)
        synthetic = Path(tmp) / "synthetic"
        prepare("synthetic", synthetic, overrides=SYNTHETIC)
        sets["synthetic fast/slow M=2"] = (synthetic, None)
        for label, (data, views) in sets.items():
            results[label] = {}
            for epochs in lengths:
                overrides = [
                    f"data.path={data or uci}",
                    "data.dataset=null",
                    f"train.epochs={epochs}",
                    f"seeds=[{args.seed}]",
                    f"output={tmp}/runs",
                    f"name=e{epochs}-{label.replace(' ', '-').replace('/', '-').replace('=', '')}",
                ]
                if views is not None:
                    overrides.append(f"data.modalities=[{','.join(views)}]")
                run = Trainer(load_recipe(RECIPE, overrides), args.seed).run()
                last = run.run_dir / "last.pt"
                results[label][f"epoch {epochs}"] = {
                    f"{confidence}/{score}": shares(last, confidence, score)
                    for confidence, score in READINGS
                }
    result = {
        "bench": "cmob_weak",
        "seed": args.seed,
        "results": results,
        "machine": machine(),
    }
    publish("cmob_weak", result, args.quick)


if __name__ == "__main__":
    main()
