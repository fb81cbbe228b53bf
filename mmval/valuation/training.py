"""Valuation during training (the recipe's `valuation:` section): `contrib_epoch<k>.parquet`
in the run folder every `every` epochs, to plot how modality contributions evolve.

It changes nothing in training: the model is valued in eval mode without gradients, batches
are read without a DataLoader and all sampling uses its own generators, so the global RNG, and
with it the run, is the same with or without valuation. `mmval.runner` calls `after_epoch`
from a training callback (valuation sits below the methods, which use it, and so below the
engine: it imports no engine code).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mmval.artifacts.layout import contrib_file
from mmval.data.dataset import ParquetSamples
from mmval.data.shards import DataManifest
from mmval.errors import UserError
from mmval.models import MultimodalModel
from mmval.tasks import CLASSIFICATION, Task
from mmval.valuation.config import TrainValuationConfig
from mmval.valuation.registry import build_method
from mmval.valuation.run import split_fills, value_dataset
from mmval.valuation.table import long_table, valuation_metadata, weights_fingerprint, write_parquet


def subset_positions(n: int, share: float, seed: int) -> np.ndarray:
    """A fixed random subset of round(share * n) positions (at least one), sorted."""
    count = max(1, round(share * n))
    return np.sort(np.random.default_rng([seed, n]).choice(n, size=count, replace=False))


class EpochValuation:
    """Values `split` (the split name behind `config.split`) of a run. Built before the first
    epoch, so that a setting it cannot run fails before training starts."""

    def __init__(
        self,
        config: TrainValuationConfig,
        *,
        data_dir: Path,
        manifest: DataManifest,
        modalities: list[str],
        split: str,
        train_split: str,
        seed: int,
        device: torch.device,
        batch_size: int,
        task: Task = CLASSIFICATION,
    ) -> None:
        self.config = config.for_task(task)
        self.manifest, self.modalities, self.task = manifest, modalities, task
        self.device, self.batch_size = device, batch_size
        self.method = build_method(config, modalities)
        self.split = split
        self.dataset = ParquetSamples(data_dir, self.split, modalities, manifest=manifest)
        if len(self.dataset) == 0:
            raise UserError(
                f"valuation.split: split {self.split!r} of {data_dir} has no samples to value."
            )
        self.positions = subset_positions(len(self.dataset), config.subset, seed)
        specs = [manifest.modality(m) for m in modalities]
        self.fills = split_fills(config, data_dir, manifest, specs, train_split)

    def after_epoch(self, model: MultimodalModel, epoch: int, run_dir: Path) -> None:
        """Write contrib_epoch<epoch>.parquet (epoch counted from 1) when it is due."""
        if epoch % self.config.every:
            return
        values = value_dataset(
            model,
            self.dataset,
            self.method,
            self.config,
            fills=self.fills,
            device=self.device,
            task=self.task,
            batch_size=self.batch_size,
            positions=self.positions,
        )
        metadata = valuation_metadata(
            self.config,
            self.modalities,
            self.split,
            self.manifest,
            weights_fingerprint(model.state_dict()),
        )
        metadata["mmval.epoch"] = str(epoch)
        out = run_dir / contrib_file(epoch)
        table = long_table(values, self.modalities, list(self.manifest.classes))
        write_parquet(table, metadata, out)
