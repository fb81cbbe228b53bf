"""Data set manifests (`data_manifests/<name>.yaml`): what a source reads and how it splits it."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mmval.data.shards import sha256_text
from mmval.errors import UserError
from mmval.overrides import load_yaml
from mmval.validation import format_validation_error


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModalityEntry(_Strict):
    name: str
    description: str = ""


class StratifiedSplits(_Strict):
    """A fixed per-class split: every class contributes the same counts to each split."""

    strategy: Literal["stratified"] = "stratified"
    seed: int = 0
    per_class: dict[str, int] = Field(description="samples per class in each split")


class DatasetManifest(_Strict):
    name: str
    version: str
    description: str
    source: str = Field(description="the source adapter that reads the raw data")
    raw: dict = Field(default_factory=dict, description="raw layout the source expects")
    classes: list[str] = Field(default_factory=list)
    modalities: list[ModalityEntry] = Field(default_factory=list)
    splits: StratifiedSplits | None = None
    params: dict = Field(default_factory=dict, description="extraction parameters")


def manifest_names() -> list[str]:
    folder = resources.files("mmval.data_manifests")
    return sorted(
        p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml")
    )


def is_manifest_file(name: str) -> bool:
    """A data set given as a manifest file (`my-data.yaml`) rather than a built-in name."""
    return name.endswith((".yaml", ".yml")) or "/" in name


def load_dataset_manifest(name: str) -> tuple[DatasetManifest, str]:
    """The parsed manifest (a built-in name, or a manifest file of the same schema) and the
    sha256 of its text (recorded in the prepared data)."""
    if is_manifest_file(name):
        path = Path(name).expanduser()
        if not path.is_file():
            raise UserError(f"no data set manifest file {name}.")
        label = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read the data set manifest {path}: {exc}") from None
    else:
        resource = resources.files("mmval.data_manifests") / f"{name}.yaml"
        if not resource.is_file():
            raise UserError(
                f"unknown data set {name!r}; known data sets: {', '.join(manifest_names())}, "
                "or a manifest file (`mmval prep my-data.yaml`, schema: `mmval prep --schema`)."
            )
        label = f"{name}.yaml"
        text = resource.read_text(encoding="utf-8")
    try:
        loaded = load_yaml(text)
    except yaml.YAMLError as exc:
        raise UserError(f"data manifest {label} is not YAML: {exc}") from None
    try:
        manifest = DatasetManifest.model_validate(loaded)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, f"data manifest {label}")) from None
    return manifest, sha256_text(text)
