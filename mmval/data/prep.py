"""`mmval prep`: run a source adapter and write its output in shard format v1."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from mmval.atomic import remove_stale_temps, write_text_atomic
from mmval.data.manifest import load_dataset_manifest
from mmval.data.pipeline import (
    CLIP_TIMEOUT,
    PARTIAL,
    PrepCallbacks,
    PrepSummary,
    SplitCounts,
    run_plan,
)
from mmval.data.shards import (
    MANIFEST,
    VERIFIED,
    DataManifest,
    DatasetHeader,
    ModalitySpec,
    check_data_dir,
    load_manifest,
    write_dataset,
)
from mmval.data.sources import SOURCES
from mmval.errors import UserError
from mmval.overrides import apply_overrides
from mmval.validation import format_validation_error


@dataclass
class PrepResult:
    manifest: DataManifest
    wrote: bool  # False: an existing output with the same settings was verified and kept
    summary: PrepSummary | None = None


def prepare(
    dataset: str,
    out: Path,
    *,
    raw: Path | None = None,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
    workers: int | None = None,
    limit: int | None = None,
    splits: Sequence[str] | None = None,
    clip_timeout: float = CLIP_TIMEOUT,
    callbacks: PrepCallbacks | None = None,
) -> PrepResult:
    """Prepare `dataset` into `out`. A complete output with the same source manifest and
    settings is verified and kept; an interrupted one (even by `kill -9`) is resumed shard by
    shard. A clip that takes longer than `clip_timeout` seconds is recorded as an error."""
    entry, entry_sha = load_dataset_manifest(dataset)
    source = SOURCES[entry.source]
    try:
        params = source.Params.model_validate(apply_overrides(entry.params, overrides))
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, f"parameters of {dataset}")) from None
    if source.needs_raw and (raw is None or not Path(raw).is_dir()):
        where = "pass --raw DIR" if raw is None else f"--raw {raw} is not a folder"
        raise UserError(f"{dataset} is prepared from its raw files: {where}. {entry.description}")
    out = Path(out)
    _remove_stale_temps(out)
    settings = {
        "params": params.model_dump(mode="json"),
        "limit": limit,
        "splits": list(splits) if splits else None,
    }
    if (out / MANIFEST).is_file():
        existing = load_manifest(out)
        same_source = (existing.dataset, existing.source_manifest_sha256) == (dataset, entry_sha)
        same = same_source and existing.extraction.get("settings") == settings
        if same and not overwrite:
            manifest = check_data_dir(out, verify_checksums=True)
            shutil.rmtree(out / PARTIAL, ignore_errors=True)  # killed after its manifest
            return PrepResult(manifest, wrote=False)
        if not overwrite:
            raise UserError(
                f"{out} already holds a prepared data set made with other settings; "
                "pass --overwrite to rebuild it or choose another --out."
            )
    if overwrite and out.exists():
        _clear(out)
    partial_settings = out / PARTIAL / "settings.json"
    if partial_settings.is_file() and json.loads(partial_settings.read_text()) != settings:
        raise UserError(
            f"{out} holds an interrupted prep made with other settings; pass --overwrite to "
            "discard it, or re-run with the same settings to resume it."
        )
    write_text_atomic(partial_settings, json.dumps(settings))

    def header(
        classes: list[str],
        modalities: list[ModalitySpec],
        extraction: dict,
        ground_truth: list[ModalitySpec] | None = None,
    ) -> DatasetHeader:
        extraction = {"settings": settings, **extraction}
        return DatasetHeader(
            dataset, entry.version, entry_sha, classes, modalities, extraction, ground_truth or []
        )

    if hasattr(source, "plan"):
        plan = source.plan(entry, params, Path(raw), limit=limit, only_splits=splits)
        manifest, summary = run_plan(
            plan,
            out,
            header(plan.classes, plan.modalities, plan.extraction),
            workers=workers,
            clip_timeout=clip_timeout,
            callbacks=callbacks,
        )
        return PrepResult(manifest, wrote=True, summary=summary)
    built = source.build(entry, params, raw)
    manifest = write_dataset(
        out,
        header(built.classes, built.modalities, built.extraction, built.ground_truth),
        built.splits,
        built.errors,
    )
    shutil.rmtree(out / PARTIAL, ignore_errors=True)
    counts = {
        name: SplitCounts(planned=len(s.sample_ids), written=len(s.sample_ids))
        for name, s in built.splits.items()
    }
    return PrepResult(manifest, wrote=True, summary=PrepSummary(counts, len(built.errors)))


def _clear(out: Path) -> None:
    """Remove what a previous prep wrote (and only that) before rebuilding."""
    for name in (MANIFEST, "index.parquet", "errors.parquet", VERIFIED):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / PARTIAL, ignore_errors=True)
    for written in (*out.glob("*/part-*.parquet"), *out.glob("tokenizer-*.json")):
        written.unlink()


def _remove_stale_temps(out: Path) -> None:
    """Half-written files of a killed prep: in `out`, its split folders and `.partial`."""
    if not out.is_dir():
        return
    folders = [out, *(p for p in out.iterdir() if p.is_dir())]
    if (out / PARTIAL).is_dir():
        folders += [p for p in (out / PARTIAL).iterdir() if p.is_dir()]
    for folder in folders:
        remove_stale_temps(folder)
