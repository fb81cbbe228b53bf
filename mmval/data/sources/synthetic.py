"""Seeded synthetic multimodal data in which chosen modalities dominate.

For class c and modality m a prototype mu[c, m] ~ N(0, I_d) is drawn once; a sample of class y
has x_m = signal[m] * mu[y, m] + noise * eps with eps ~ N(0, I_d). A larger signal makes a
modality easier to learn, so the strongest one dominates joint training: the situation the
balancing methods address. The same parameters always give the same bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mmval.data.manifest import DatasetManifest
from mmval.data.shards import ModalitySpec, SplitSamples
from mmval.data.sources.base import BuiltData


class SyntheticParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    modalities: list[str] = Field(default=["strong", "weak"], min_length=1)
    dims: list[int] = Field(default=[32, 32], description="feature size per modality")
    signal: list[float] = Field(default=[0.6, 0.2], description="prototype scale per modality")
    noise: float = Field(default=1.0, gt=0)
    n_classes: int = Field(default=4, ge=2)
    per_class: dict[str, int] = Field(default={"train": 300, "val": 50, "test": 100})
    seed: int = 0

    @model_validator(mode="after")
    def _one_entry_per_modality(self) -> SyntheticParams:
        m = len(self.modalities)
        if len(self.dims) != m or len(self.signal) != m:
            raise ValueError(f"dims and signal need one entry per modality ({m})")
        if "train" not in self.per_class:
            raise ValueError("per_class needs a 'train' split")
        return self


class SyntheticSource:
    name: ClassVar[str] = "synthetic"
    needs_raw: ClassVar[bool] = False
    Params: ClassVar[type[BaseModel]] = SyntheticParams

    def build(
        self, manifest: DatasetManifest, params: SyntheticParams, raw: Path | None
    ) -> BuiltData:
        rng = np.random.default_rng(params.seed)
        prototypes = [rng.standard_normal((params.n_classes, d)) for d in params.dims]
        splits = {}
        for split, per_class in params.per_class.items():
            labels = np.repeat(np.arange(params.n_classes), per_class)
            arrays = {
                name: (
                    signal * protos[labels]
                    + params.noise * rng.standard_normal((len(labels), protos.shape[1]))
                ).astype(np.float32)
                for name, signal, protos in zip(
                    params.modalities, params.signal, prototypes, strict=True
                )
            }
            ids = [f"{split}-{i:06d}" for i in range(len(labels))]
            splits[split] = SplitSamples(ids, labels, ["generated"] * len(ids), arrays)
        modalities = [
            ModalitySpec(name=name, dtype="float32", shape=[d], description=f"signal {s}")
            for name, d, s in zip(params.modalities, params.dims, params.signal, strict=True)
        ]
        classes = [f"class{c}" for c in range(params.n_classes)]
        return BuiltData(classes, modalities, {}, splits)
