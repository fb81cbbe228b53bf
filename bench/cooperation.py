"""Valuation cost of the modality-level variant (a 20 % draw of the train split) against the
sample-level one (every training sample), with ResNet-18 audio and visual encoders.

Synthetic audio-visual clips in the Kinetics-Sounds layout are written and prepped once (3 frames
of 112 x 112 and a 128 x 256 fbank per clip); then `recipes/mmcooperation_sample-synthetic-av.yaml`
and `recipes/mmcooperation_modality-synthetic-av.yaml` and concat are trained side by side in one
process, each for a few epochs with warm-up 1, so that every epoch from the first ends with a
valuation. Figures: the mean valuation seconds per epoch (`method_valuation_seconds`, logged by
the methods), their ratio, each over concat's training epoch, and the samples valued.
Run: python bench/cooperation.py [--clips N] [--epochs E] [--quick]. Prints one JSON object on
its last line and writes it to bench/results/cooperation.json.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
from _results import add_quick, machine, publish

from mmval.data.prep import prepare
from mmval.data.synthetic_av import SyntheticAVParams, write_synthetic_raw
from mmval.recipe import load_recipe
from mmval.runner import Trainer

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def train(recipe: str, data: Path, epochs: int, *extra: str) -> pd.DataFrame:
    overrides = [
        f"data.path={data}",
        f"train.epochs={epochs}",
        "seeds=[0]",
        "train.batch_size=32",
        *extra,
    ]
    result = Trainer(load_recipe(RECIPES / recipe, overrides), 0).run()
    return pd.read_parquet(result.run_dir / "metrics.parquet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=40, help="clips per class (3 classes)")
    parser.add_argument("--epochs", type=int, default=3)
    add_quick(parser)
    args = parser.parse_args()
    if args.quick:
        args.clips, args.epochs = 3, 2
    size = 32 if args.quick else 112
    here = Path.cwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            params = SyntheticAVParams(
                layout="kinetics-sounds",
                classes=["0", "1", "2"],
                clips_per_class=args.clips,
                seconds=2.0,
                size=(size, size),
            )
            write_synthetic_raw(Path("raw"), params)
            data = Path("ks").resolve()
            prepare(
                "kinetics-sounds",
                data,
                raw=Path("raw"),
                workers=2,
                overrides=[
                    f"modalities.0.size=[{size},{size}]",
                    "modalities.1.target_frames=256",
                ],
            )
            index = pq.read_table(data / "index.parquet", filters=[("split", "=", "train")])
            train_samples = index.num_rows
            concat = train("concat-synthetic-av.yaml", data, args.epochs)
            sample = train(
                "mmcooperation_sample-synthetic-av.yaml", data, args.epochs, "method.warmup=1"
            )
            modality = train(
                "mmcooperation_modality-synthetic-av.yaml", data, args.epochs, "method.warmup=1"
            )
        finally:
            os.chdir(here)
    epoch = float(concat["seconds"].mean())
    full = float(sample["method_valuation_seconds"].mean())
    part = float(modality["method_valuation_seconds"].mean())
    result = {
        "bench": "cooperation",
        "data": f"synthetic Kinetics-Sounds layout, 3 classes x {args.clips} clips per split, "
        f"3 frames {size}x{size} + fbank 256x128, ResNet-18 encoders, batch 32",
        "epochs": args.epochs,
        "train_samples": train_samples,
        "modality_level_valued_per_epoch": float(modality["method_valued"].mean()),
        "concat_epoch_s": round(epoch, 3),
        "sample_level_valuation_s": round(full, 3),
        "modality_level_valuation_s": round(part, 3),
        "modality_over_sample_valuation": round(part / full, 3),
        "sample_valuation_over_concat_epoch": round(full / epoch, 3),
        "modality_valuation_over_concat_epoch": round(part / epoch, 3),
        "machine": machine(),
    }
    publish("cooperation", result, args.quick)


if __name__ == "__main__":
    main()
