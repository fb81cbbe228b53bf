"""`mmval prep`: run a source adapter and write its output in shard format v1."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from mmval.data.manifest import load_dataset_manifest
from mmval.data.shards import MANIFEST, DataManifest, check_data_dir, load_manifest, write_dataset
from mmval.data.sources import SOURCES
from mmval.errors import UserError
from mmval.overrides import apply_overrides
from mmval.validation import format_validation_error


def prepare(
    dataset: str,
    out: Path,
    *,
    raw: Path | None = None,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
) -> tuple[DataManifest, bool]:
    """Prepare `dataset` into `out`; returns the manifest and whether anything was written.

    A complete output with the same source manifest and parameters is verified and kept.
    """
    entry, entry_sha = load_dataset_manifest(dataset)
    source = SOURCES[entry.source]
    try:
        params = source.Params.model_validate(apply_overrides(entry.params, overrides))
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, f"parameters of {dataset}")) from None
    if source.needs_raw and (raw is None or not raw.is_dir()):
        raise UserError(f"{dataset} needs its raw data: pass --raw DIR (an existing folder).")
    out = Path(out)
    if (out / MANIFEST).is_file() and not overwrite:
        existing = load_manifest(out)
        same_source = (existing.dataset, existing.source_manifest_sha256) == (dataset, entry_sha)
        if same_source and existing.extraction.get("params") == params.model_dump():
            return check_data_dir(out, verify_checksums=True), False
        raise UserError(
            f"{out} already holds a prepared data set made with other settings; "
            "pass --overwrite to rebuild it or choose another --out."
        )
    built = source.build(entry, params, raw)
    manifest = write_dataset(
        out,
        dataset=dataset,
        version=entry.version,
        source_manifest_sha256=entry_sha,
        classes=built.classes,
        modalities=built.modalities,
        extraction={"params": params.model_dump(), **built.extraction},
        splits=built.splits,
        errors=built.errors,
    )
    return manifest, True
