"""The recipe's `evaluate:` section: the robustness protocols run on a finished run's best.pt,
written into `<run>/evaluate/` for `mmval report --robustness`, so that a sweep gives the whole
noise and missing-modality table in one command.

Each corruption spec lists its levels (`image=gaussian:0,5,10`); specs listed together are
applied together level by level (QMF noises the image and the text of a sample at the same
level), so they must list as many levels, or one level that holds for all. Level 0 is the
clean subsets table (a corruption at level 0 changes nothing), written whenever `subsets` is set
or any level is 0. A table already written for the same weights and settings is kept, so a
rerun (or a resumed sweep) computes only what is missing.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mmval.artifacts.checkpoint import load_checkpoint
from mmval.artifacts.layout import EVALUATE_DIR
from mmval.data.corrupt import Corruption
from mmval.errors import UserError
from mmval.valuation.config import MaskName, ValuationConfig
from mmval.valuation.feature_mask import (
    check_ratios,
    feature_mask_of_split,
    write_feature_mask,
)
from mmval.valuation.run import SplitOfCheckpoint, open_split
from mmval.valuation.subsets import subsets_of_split, write_subsets
from mmval.valuation.table import weights_fingerprint

FOLDER = EVALUATE_DIR


class EvaluateConfig(BaseModel):
    """What to evaluate after training, on the selected checkpoint (best.pt)."""

    model_config = ConfigDict(extra="forbid")
    corrupt: list[str] = Field(
        default_factory=list,
        description="corruptions MODALITY=KIND:L1,L2,... (kinds as `mmval value --corrupt`); "
        "the specs are applied together, level by level",
    )
    repeats: int = Field(default=5, ge=1, description="noise draws per level (QMF: 5)")
    seed: int = Field(default=0, description="seeds the noise draws and the masked dimensions")
    subsets: bool = Field(
        default=True, description="the missing-modality table: every non-empty subset"
    )
    mask: MaskName = Field(default="feature", description="how missing modalities are removed")
    feature_mask: list[float] | None = Field(
        default=None,
        description="IMML's probe: ratios of each modality's feature dimensions to mask "
        "(`repeats` draws each)",
    )
    split: Literal["train", "val", "test"] = Field(
        default="test", description="which of data.splits to evaluate"
    )

    @field_validator("corrupt", mode="before")
    @classmethod
    def _join_levels(cls, value: Any) -> Any:
        """YAML's flow style splits `[image=gaussian:0,5,10]` at the commas: numbers that
        follow a spec are further levels of it."""
        if not isinstance(value, list):
            return value
        joined: list[str] = []
        for item in value:
            if isinstance(item, int | float) and not isinstance(item, bool) and joined:
                joined[-1] += f",{item:g}"
            else:
                joined.append(str(item))
        return joined

    @model_validator(mode="after")
    def _check(self) -> EvaluateConfig:
        self.conditions()  # raises on a bad spec or unequal level counts
        if self.feature_mask is not None:
            try:
                check_ratios(self.feature_mask)
            except UserError as exc:
                raise ValueError(str(exc)) from None
        return self

    def conditions(self) -> list[list[Corruption]]:
        """The corruptions of each level position, e.g. [[image=gaussian:5, text=blank:5]]."""
        per_spec: list[list[Corruption]] = []
        for spec in self.corrupt:
            head, _, levels = spec.rpartition(":")
            try:
                per_spec.append(
                    [Corruption.parse(f"{head}:{level}") for level in levels.split(",")]
                )
            except UserError as exc:
                raise ValueError(f"corrupt {spec!r}: {exc}") from None
        counts = {len(levels) for levels in per_spec} - {1}
        if len(counts) > 1:
            raise ValueError(
                "the corrupt specs are applied together level by level, so each lists as many "
                f"levels (or one): {', '.join(self.corrupt)}"
            )
        positions = max(counts, default=1)
        return [
            [levels[0] if len(levels) == 1 else levels[i] for levels in per_spec]
            for i in range(positions if per_spec else 0)
        ]


def _name(corruptions: list[Corruption]) -> str:
    return "noise-" + "+".join(str(c).replace("=", "-").replace(":", "-") for c in corruptions)


def _current(path: Path, expected: dict[str, str]) -> bool:
    """Whether `path` holds a table of these weights and settings already."""
    if not path.is_file():
        return False
    meta = {k.decode(): v.decode() for k, v in (pq.read_schema(path).metadata or {}).items()}
    return all(meta.get(k) == v for k, v in expected.items())


def evaluate_run(
    config: EvaluateConfig,
    run_dir: Path,
    *,
    split: str,
    data_dir: Path,
    device: str,
    batch_size: int,
) -> list[Path]:
    """Write the evaluation tables of `run_dir/best.pt` that are missing (or of other weights
    or settings); return the paths of all of them."""
    best = run_dir / "best.pt"
    if not best.is_file():
        raise UserError(f"{run_dir} has no best.pt to evaluate.")
    folder = run_dir / FOLDER
    weights = weights_fingerprint(load_checkpoint(best).model)

    @functools.cache  # opened once, and only when some table is stale
    def split_of_best() -> SplitOfCheckpoint:
        return open_split(best, split, data_dir, ValuationConfig(mask=config.mask))

    same = {"mmval.checkpoint_fingerprint": weights, "mmval.split": split}
    noisy = [c for c in config.conditions() if any(x.level for x in c)]
    jobs: list[tuple[Path, list[Corruption]]] = [
        (folder / f"{_name(corruptions)}.parquet", corruptions) for corruptions in noisy
    ]
    if config.subsets or len(noisy) < len(config.conditions()):
        jobs.insert(0, (folder / "subsets.parquet", []))
    written = []
    for path, corruptions in jobs:
        repeats = config.repeats if corruptions else 1  # clean: every draw is the same
        expected = same | {
            "mmval.mask": config.mask,
            "mmval.corruptions": json.dumps([str(c) for c in corruptions]),
            "mmval.repeats": str(repeats),
        }
        if corruptions:
            expected["mmval.seed"] = str(config.seed)
        if not _current(path, expected):
            result = subsets_of_split(
                split_of_best(),
                mask=config.mask,
                batch_size=batch_size,
                device=device,
                corruptions=corruptions,
                seed=config.seed,
                repeats=repeats,
            )
            write_subsets(result, path)
        written.append(path)
    if config.feature_mask is not None:
        path = folder / "feature-mask.parquet"
        expected = same | {
            "mmval.ratios": json.dumps(config.feature_mask),
            "mmval.seed": str(config.seed),
            "mmval.repeats": str(config.repeats),
        }
        if not _current(path, expected):
            result = feature_mask_of_split(
                split_of_best(),
                ratios=config.feature_mask,
                seed=config.seed,
                repeats=config.repeats,
                batch_size=batch_size,
                device=device,
            )
            write_feature_mask(result, path)
        written.append(path)
    return written
