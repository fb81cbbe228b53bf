"""The contract between `mmval prep` and a source adapter."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mmval.data.manifest import DatasetManifest, StratifiedSplits
from mmval.data.shards import ModalitySpec, SplitSamples, TaskKind


@dataclass
class BuiltData:
    classes: list[str]
    modalities: list[ModalitySpec]
    extraction: dict
    splits: dict[str, SplitSamples]
    errors: list[tuple[str, str]] = field(default_factory=list)
    # per-sample variables stored beside the inputs but never fed to a model (arrays in
    # `SplitSamples.arrays` under these names)
    ground_truth: list[ModalitySpec] = field(default_factory=list)
    # written beside the shards (the tokenizer a text modality was encoded with)
    files: dict[str, bytes] = field(default_factory=dict)
    task: TaskKind = "classification"
    # the per-sample target of other tasks (`SplitSamples.arrays["target"]`)
    target: ModalitySpec | None = None


class Source(Protocol):
    name: ClassVar[str]
    needs_raw: ClassVar[bool]
    Params: ClassVar[type[BaseModel]]

    def build(self, manifest: DatasetManifest, params: BaseModel, raw: Path | None) -> BuiltData:
        """Read (or generate) the whole data set."""
        ...


def stratified_split(labels: np.ndarray, splits: StratifiedSplits) -> dict[str, np.ndarray]:
    """Fixed per-class split: in each class, a seeded permutation is cut into the split counts."""
    rng = np.random.default_rng(splits.seed)
    chosen: dict[str, list[np.ndarray]] = {name: [] for name in splits.per_class}
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        need = sum(splits.per_class.values())
        if need > len(members):
            raise ValueError(f"class {cls} has {len(members)} samples, the split needs {need}")
        start = 0
        for name, count in splits.per_class.items():
            chosen[name].append(members[start : start + count])
            start += count
    return {name: np.sort(np.concatenate(parts)) for name, parts in chosen.items()}


def standardize(values: np.ndarray, fit_rows: np.ndarray) -> np.ndarray:
    """z-score every row with statistics of `fit_rows` only (the train split); constant -> 0."""
    mean = values[fit_rows].mean(axis=0)
    std = values[fit_rows].std(axis=0)
    std[std == 0] = 1.0
    return (values - mean) / std


def stratified_fractions(
    keys: list[str], labels: list[int], fractions: dict[str, float], seed: int
) -> dict[str, list[str]]:
    """Cut every class into the named shares (normalised to sum 1) after a seeded permutation
    of its keys in sorted order, so the result depends only on the keys, labels and seed."""
    rng = np.random.default_rng(seed)
    total = sum(fractions.values())
    by_label: dict[int, list[str]] = {}
    for key, label in sorted(zip(keys, labels, strict=True)):
        by_label.setdefault(label, []).append(key)
    out: dict[str, list[str]] = {name: [] for name in fractions}
    for label in sorted(by_label):
        members = [by_label[label][i] for i in rng.permutation(len(by_label[label]))]
        start = 0.0
        for name, share in fractions.items():
            lo = round(start / total * len(members))
            hi = round((start + share) / total * len(members))
            out[name].extend(members[lo:hi])
            start += share
    return out


SPLITS = ("train", "val", "test")


class SplitShares(BaseModel):
    """A stratified train/val/test split of the user's own data, when no split is given."""

    model_config = ConfigDict(extra="forbid")
    ratios: list[float] = Field(
        default=[0.7, 0.1, 0.2],
        min_length=3,
        max_length=3,
        description="shares of train, val and test within each class (normalised to sum 1) [ours]",
    )
    seed: int = Field(default=0, description="seed of the per-class permutation")

    @field_validator("ratios")
    @classmethod
    def _usable(cls, ratios: list[float]) -> list[float]:
        if any(r < 0 for r in ratios) or ratios[0] <= 0:
            raise ValueError("ratios are [train, val, test] shares >= 0, with train > 0")
        return ratios

    def fractions(self) -> dict[str, float]:
        return dict(zip(SPLITS, self.ratios, strict=True))


def stratified_positions(
    ids: list[str], labels: np.ndarray, shares: SplitShares
) -> dict[str, np.ndarray]:
    """`stratified_fractions` as sorted positions into `ids`, one array per split."""
    chosen = stratified_fractions(ids, labels.tolist(), shares.fractions(), shares.seed)
    position = {sample: i for i, sample in enumerate(ids)}
    return {s: np.sort(np.array([position[k] for k in chosen[s]], int)) for s in SPLITS}
