"""Training cost of every method relative to plain concat training, on uci-mfeat.

Each `recipes/<method>-uci-mfeat.yaml` is trained for a few epochs (seed 0, same data, same
batch size, in a temporary folder) in one process, one after the other; the figure per method
is its mean training time per epoch (evaluation excluded) over 10 epochs, divided by concat's:
periodic work (G-Blending's weight estimation every 10 epochs, Relearning's re-initialisation
every 5 in its uci-mfeat recipe) is counted at its own cadence. Runs that re-sample (more or
fewer steps per epoch) are compared per epoch, as a user experiences them.

Besides, the per-step cost of an image-text model (ResNet-18 on 64x64 images, a BERT-tiny-sized
text encoder) for concat, qmf and qmf + IMML on synthetic image-text data: seconds per training
step (mean of 10 steps after 2 warm-up steps, batch 16) and the multiply-accumulates of one
training step (forward and backward passes of `method.train_step`, counted by torch's FLOP
counter as mmval.engine.cost counts a forward). The text encoder is a Hugging Face BERT with
BERT-tiny's sizes (2 layers, hidden 128, 2 heads, feed-forward 512), randomly initialised and
written to a temporary folder (`kind: hf`; needs `mmval[hf]`).
Run: python bench/methods.py [--epochs N] [--methods a,b] (only those, with concat, merged into
the results file) [--quick]. Prints one JSON object on its last line and writes it to
bench/results/methods.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from _results import RESULTS, add_quick, machine, publish
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mmval.data.prep import prepare
from mmval.data.shards import load_manifest
from mmval.engine.session import build_session
from mmval.methods import TrainContext
from mmval.methods.base import StepTools
from mmval.recipe import load_recipe, parse_recipe
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


IMAGE_TEXT = {
    "concat": {"method": {"name": "concat"}, "model": {"fusion": "concat"}},
    "qmf": {"method": {"name": "qmf", "rank_weight": 1.0}, "model": {"fusion": "qmf"}},
    "qmf_imml": {
        "method": {"name": "qmf", "rank_weight": 1.0},
        "model": {"fusion": "qmf"},
        "plugins": [{"name": "imml", "predominant": "text"}],
    },
}


def bert_tiny(folder: Path, vocab_size: int) -> dict[str, Any]:
    """A randomly initialised BERT of BERT-tiny's sizes (google/bert_uncased_L-2_H-128_A-2: 2
    layers, hidden 128, 2 heads, feed-forward 512) written as a Hugging Face folder for the
    data's vocabulary, and the `hf` text encoder that loads it: the cost of a step does not
    depend on the weights, and nothing is downloaded."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=512,
    )
    BertModel(config).save_pretrained(folder)
    return {"kind": "hf", "path": str(folder), "pooling": "pooler"}


def image_text_steps(steps: int = 10, warmup: int = 2) -> dict[str, Any]:
    """Seconds and multiply-accumulates per training step of each IMAGE_TEXT setting."""
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare(
            "synthetic",
            data,
            overrides=[
                "modalities=[image,text]",
                "kinds=[image,tokens]",
                "dims=[64,32]",
                "per_class={train: 64, val: 4, test: 4}",
            ],
        )
        vocab_size = load_manifest(data).modality("text").vocab_size
        assert vocab_size is not None
        text_encoder = bert_tiny(Path(tmp) / "bert-tiny", vocab_size)
        for name, setting in IMAGE_TEXT.items():
            model = {
                "encoders": {"image": {"kind": "resnet", "depth": 18}, "text": text_encoder},
                **setting["model"],
            }
            recipe = parse_recipe(
                {
                    "name": name,
                    "seeds": [0],
                    "data": {"path": str(data)},
                    "model": model,
                    "method": setting["method"],
                    "plugins": setting.get("plugins", []),
                    "optim": {"name": "adam", "lr": 1e-4},
                    "train": {"epochs": 1, "batch_size": 16, "device": "cpu"},
                    "output": str(Path(tmp) / "runs"),
                },
                "bench",
            )
            session = build_session(recipe, 0, torch.device("cpu"))
            ctx = TrainContext(
                epoch=0,
                epochs=1,
                step=0,
                steps_per_epoch=len(session.loader),
                train_size=len(session.datasets["train"]),
                sizes={role: len(d) for role, d in session.datasets.items()},
            )
            tools = StepTools(session.optimizer, contextlib.nullcontext)
            session.model.train()
            session.method.on_epoch_start(session.model, ctx)
            batches = [
                b for _, b in zip(range(warmup + steps), _cycle(session.loader), strict=False)
            ]
            with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
                session.method.train_step(session.model, batches[0], ctx, tools)
            for batch in batches[1:warmup]:
                session.method.train_step(session.model, batch, ctx, tools)
            started = time.perf_counter()
            for batch in batches[warmup:]:
                session.method.train_step(session.model, batch, ctx, tools)
            figures[f"{name}_step_s"] = round((time.perf_counter() - started) / steps, 4)
            figures[f"{name}_step_gmacs"] = round(counter.get_total_flops() / 2 / 1e9, 3)
    return {
        "image_text": "synthetic image-text, 64x64 images and 32 words, batch 16; ResNet-18 "
        "(mmval kind resnet, depth 18) + a Hugging Face BERT of BERT-tiny's sizes (2 layers, "
        "hidden 128, 2 heads; random weights, kind hf, pooled output)",
        **figures,
    }


def _cycle(loader: Any) -> Any:
    while True:
        yield from loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--image-text-only",
        action="store_true",
        help="only the image-text per-step figures; the uci-mfeat ratios are kept from the file",
    )
    parser.add_argument(
        "--methods",
        help="comma-separated methods to time (with concat, always); their figures replace "
        "those in the results file, the others are kept",
    )
    add_quick(parser)
    args = parser.parse_args()
    if args.quick:  # concat and one re-weighting method for one epoch, two image-text steps
        args.epochs, args.methods = 1, args.methods or "ogm_ge"
    out = RESULTS / "methods.json"
    if args.image_text_only:
        kept = json.loads(out.read_text())
        steps = image_text_steps()
        kept["machine"] = f"{kept.get('machine')}; image_text: {machine()}"
        publish(
            "methods",
            {k: v for k, v in kept.items() if k != "machine"}
            | steps
            | {"machine": kept["machine"]},
            args.quick,
        )
        return
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
    if chosen is not None and out.is_file() and not args.quick:  # keep the others' figures
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
        **(image_text_steps(2, 1) if args.quick else image_text_steps()),
        "machine": measured_on,
    }
    publish("methods", result, args.quick)


if __name__ == "__main__":
    main()
