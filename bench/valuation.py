"""Exact Shapley valuation of a split vs one plain evaluation pass over it, for M = 2, 4, 6.

Data: `synthetic` with UCI-Multiple-Features-sized modalities (dims 76, 216, 64, 240, 47, 6,
the first M of them) and 2000 samples in the valued split. Model: the uci-mfeat recipe's (MLP
encoders [256] -> 128, concat fusion), one per M, shared by the contenders, which read
the same Parquet shards with the same batch size:
- eval: `mmval.engine.loop.predict`, the evaluation the trainer runs each epoch;
- engine: `value_dataset` (encoders once, all 2^M subsets through the head in batched calls);
- naive: `value_dataset` with path="naive" (one full forward per subset);
- subsets: `subsets_dataset`, the `mmval value --method subsets` table (every sample on every
  non-empty subset, the missing-modality protocol), which should cost about what engine does;
- games, games_confidences: what the subsets table computes before it builds its rows: every
  sample's outcome on every non-empty subset (the encoders once per batch, `Game.play`), without
  and with the softmax confidences the table's `p_true` column needs.
Each is timed `--repeats` times, interleaved, each timed run right after an untimed one of
the same contender, and the fastest run counts (the machine is shared).
Run: python bench/valuation.py [--repeats R] [--device cpu|cuda] [--quick]. Prints one JSON
object on its last line and writes it to bench/results/valuation.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _results import add_quick, machine, publish

from mmval.data.dataset import ParquetSamples
from mmval.data.prep import prepare
from mmval.engine.loop import predict
from mmval.models import ModelConfig, build_model
from mmval.tasks import CLASSIFICATION
from mmval.valuation.base import Game
from mmval.valuation.config import ValuationConfig
from mmval.valuation.engine import EvalPath, build_evaluator
from mmval.valuation.registry import build_method
from mmval.valuation.run import value_dataset
from mmval.valuation.subsets import subset_names, subsets_dataset

DIMS = [76, 216, 64, 240, 47, 6]  # fou, fac, kar, pix, zer, mor
CLASSES = 10


def fastest(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            # untimed first, so that no contender pays for the memory another left behind
            # (the naive path's many large buffers made the next one page-fault its own)
            run()
            started = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


@torch.no_grad()
def play_every_subset(
    model: torch.nn.Module,
    dataset: ParquetSamples,
    device: torch.device,
    batch_size: int,
    confidences: bool,
) -> None:
    """The outcomes the subsets table is built from, and nothing else."""
    names = [s.name for s in dataset.specs]
    keep, _ = subset_names(names)
    evaluator = build_evaluator(model, names, "feature", None, device=device)
    for start in range(0, len(dataset), batch_size):
        batch = dataset.__getitems__(range(start, min(start + batch_size, len(dataset))))
        game = Game(evaluator, batch.to(device), CLASSIFICATION.default_benefit(), CLASSIFICATION)
        game.play(keep, confidences=confidences)


def bench_m(
    m: int, root: Path, repeats: int, batch_size: int, device: torch.device, per_class: int
) -> dict:
    names = [f"m{j}" for j in range(m)]
    out = root / f"syn{m}"
    prepare(
        "synthetic",
        out,
        overrides=[
            f"modalities=[{','.join(names)}]",
            f"dims={DIMS[:m]}",
            f"signal={[1.0] * m}",
            f"n_classes={CLASSES}",
            f"per_class={{train: 20, test: {per_class}}}",
        ],
    )
    dataset = ParquetSamples(out, "test", names)
    torch.manual_seed(0)
    config = ModelConfig.model_validate(
        {
            "encoder": {"kind": "mlp", "hidden": [256], "out_dim": 128, "dropout": 0.2},
            "fusion": "concat",
        }
    )
    model = build_model(config, dataset.specs, CLASSES).to(device).eval()
    valuation = ValuationConfig()
    method = build_method(valuation, names)

    def engine(path: EvalPath) -> Callable[[], object]:
        return lambda: value_dataset(
            model,
            dataset,
            method,
            valuation,
            fills=None,
            device=device,
            batch_size=batch_size,
            path=path,
        )

    runs = {
        "eval": lambda: predict(model, dataset, device, CLASSIFICATION, batch_size=batch_size),
        "engine": engine("auto"),
        "naive": engine("naive"),
        "subsets": lambda: subsets_dataset(
            model, dataset, "feature", fills=None, device=device, batch_size=batch_size
        ),
        "games": lambda: play_every_subset(model, dataset, device, batch_size, False),
        "games_confidences": lambda: play_every_subset(model, dataset, device, batch_size, True),
    }
    times = fastest(runs, repeats)
    return {
        f"eval_s_M{m}": round(times["eval"], 4),
        f"engine_s_M{m}": round(times["engine"], 4),
        f"naive_s_M{m}": round(times["naive"], 4),
        f"engine_over_eval_M{m}": round(times["engine"] / times["eval"], 2),
        f"naive_over_eval_M{m}": round(times["naive"] / times["eval"], 2),
        f"subsets_over_eval_M{m}": round(times["subsets"] / times["eval"], 2),
        f"subsets_games_over_eval_M{m}": round(times["games"] / times["eval"], 2),
        f"subsets_games_confidences_over_eval_M{m}": round(
            times["games_confidences"] / times["eval"], 2
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    add_quick(parser)
    args = parser.parse_args()
    per_class = 10 if args.quick else 200
    repeats = 1 if args.quick else args.repeats
    device = torch.device(args.device)
    result: dict = {
        "bench": "valuation",
        "samples": per_class * CLASSES,
        "method": "shapley (exact), benefit correct, feature masking, concat fusion",
        "batch_size": args.batch_size,
        "repeats": repeats,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for m in (2, 4, 6):
            result.update(bench_m(m, Path(tmp), repeats, args.batch_size, device, per_class))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    result["machine"] = f"{machine()}, device {device} (GPU: {gpu})"
    publish("valuation", result, args.quick)


if __name__ == "__main__":
    main()
