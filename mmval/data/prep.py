"""`mmval prep`: run a source adapter and write its output in shard format v1, in one piece or
in parts on several machines (`part`), then merged into one data set (`merge_parts`)."""

from __future__ import annotations

import contextlib
import functools
import json
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema

from mmval.atomic import TEMP_SUFFIX, remove_stale_temps, write_atomic, write_text_atomic
from mmval.data.manifest import DatasetManifest, load_dataset_manifest
from mmval.data.pipeline import (
    CLIP_TIMEOUT,
    PARTIAL,
    PartSpec,
    PrepCallbacks,
    PrepPlan,
    PrepSummary,
    SplitCounts,
    part_ranges,
    plan_digest,
    run_plan,
)
from mmval.data.shards import (
    ERRORS,
    INDEX,
    MANIFEST,
    VERIFIED,
    DataManifest,
    DatasetHeader,
    check_data_dir,
    load_manifest,
    merge_data_dirs,
    sha256_file,
    shard_path,
    write_dataset,
)
from mmval.data.sources import SOURCES, BuiltData, Source
from mmval.describe import FieldDoc, describe_values
from mmval.errors import UserError
from mmval.locks import LOCK_FILE, locked
from mmval.overrides import apply_overrides
from mmval.validation import format_validation_error


@dataclass
class PrepResult:
    manifest: DataManifest
    wrote: bool  # False: an existing output with the same settings was verified and kept
    summary: PrepSummary | None = None


def _one_writer(prep: Callable[..., PrepResult]) -> Callable[..., PrepResult]:
    """Run `prep` holding the lock of the folder it writes (the data folder, or with `part` the
    part folder), so that a second prep of it stops (exit 2) naming the first."""

    @functools.wraps(prep)
    def locked_prep(dataset: str, out: Path, **kwargs: Any) -> PrepResult:
        part: PartSpec | None = kwargs.get("part")
        folder = Path(out) if part is None else Path(out) / part.name
        with locked(folder, folder=True, what=f"data folder {folder}"):
            return prep(dataset, out, **kwargs)

    return locked_prep


@_one_writer
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
    part: PartSpec | None = None,
    inputs: dict[str, Any] | None = None,
) -> PrepResult:
    """Prepare `dataset` into `out`. A complete output with the same source manifest and
    settings is verified and kept; an interrupted one (even by `kill -9`) is resumed shard by
    shard. A clip that takes longer than `clip_timeout` seconds is recorded as an error.
    With `part`, only that part's shards are extracted, into the data directory
    `out/<part.name>`; `merge_parts` then makes one data set of all parts. `dataset` is a
    built-in name or a manifest file; `inputs` are parameters given as files on the command
    line (`mmval prep table --view NAME=PATH`), applied before `overrides`."""
    entry, entry_sha, source, params = _parameters(dataset, overrides, inputs)
    dataset = entry.name
    _check_raw(entry, source, raw)
    root = out = Path(out)
    name = _data_name(entry, params.model_dump(), root)
    if part is not None:
        if not hasattr(source, "plan"):
            raise UserError(
                f"{dataset} is built in one piece in memory: --shard-index/--num-shards apply "
                "to data sets extracted clip by clip (audio-visual, image-text)."
            )
        if (root / MANIFEST).is_file() and not _is_merged(root):
            raise UserError(
                f"{root} holds a data set prepared in one piece; prepare the parts into "
                "another --out."
            )
        out = root / part.name
    _check_data_folder(out)
    parts = _mmval_parts(root)
    if part is None and parts and not (root / MANIFEST).is_file() and not overwrite:
        raise UserError(
            f"{root} holds parts of a prep split across machines ({', '.join(parts)}): "
            f"merge them with `mmval prep {dataset} --out {root} --merge`, or pass --overwrite "
            "to discard them and prepare in one piece."
        )
    _remove_stale_temps(out)
    settings = _settings(source, params, limit, splits)
    if not overwrite and (out / MANIFEST).is_file():
        existing = load_manifest(out)
        same_source = (existing.dataset, existing.source_manifest_sha256) == (name, entry_sha)
        if same_source and existing.extraction.get("settings") == settings:
            manifest = check_data_dir(out, verify_checksums=True)
            shutil.rmtree(out / PARTIAL, ignore_errors=True)  # killed after its manifest
            return PrepResult(manifest, wrote=False)
        raise UserError(
            f"{out} already holds a prepared data set made with other settings; "
            "pass --overwrite to rebuild it or choose another --out."
        )
    # planned before anything is written: a plan refused (a bad labels file) leaves `out` as it was
    plan = (
        source.plan(entry, params, Path(raw), limit=limit, only_splits=splits)
        if hasattr(source, "plan")
        else None
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
    if part is not None:  # the merged data set no longer matches this part: merge again
        (root / MANIFEST).unlink(missing_ok=True)

    def header(data: PrepPlan | BuiltData) -> DatasetHeader:
        extraction = {"settings": settings, **data.extraction}
        ground_truth = data.ground_truth if isinstance(data, BuiltData) else []
        return DatasetHeader(
            name,
            entry.version,
            entry_sha,
            data.classes,
            data.modalities,
            extraction,
            ground_truth,
            data.task,
            data.target,
        )

    if plan is not None:
        manifest, summary = run_plan(
            plan,
            out,
            header(plan),
            workers=workers,
            clip_timeout=clip_timeout,
            callbacks=callbacks,
            part=part,
        )
        return PrepResult(manifest, wrote=True, summary=summary)
    try:
        built = source.build(entry, params, raw)
    except UserError:  # refused input: leave nothing behind but what a successful prep writes
        shutil.rmtree(out / PARTIAL, ignore_errors=True)
        raise
    for name, data in built.files.items():  # before the manifest, which marks a complete set
        write_atomic(out / name, lambda path, data=data: path.write_bytes(data))
    manifest = write_dataset(
        out,
        header(built),
        built.splits,
        built.errors,
    )
    shutil.rmtree(out / PARTIAL, ignore_errors=True)
    counts = {  # samples with a NaN or Inf went to the errors table
        name: SplitCounts(
            planned=len(s.sample_ids),
            written=manifest.splits[name].samples,
            failed=len(s.sample_ids) - manifest.splits[name].samples,
        )
        for name, s in built.splits.items()
    }
    return PrepResult(manifest, wrote=True, summary=PrepSummary(counts, len(built.errors)))


def _clear(out: Path) -> None:
    """Remove what a previous prep wrote, and only that, before rebuilding: the files its
    manifest and its `.partial/` records list, the files mmval names (manifest, index, errors,
    verified marker, `.partial/`), and the same in each part folder. Anything else stays: the
    user's files, and shards no record lists (a rebuild ignores them). A part-like folder that
    holds no mmval data is refused before anything is deleted."""
    parts = part_dirs(out)
    foreign = [name for name in parts if _folder_kind(out / name) == "foreign"]
    if foreign:
        raise UserError(
            f"{out} holds folders named like parts of a prep that hold no mmval data "
            f"({', '.join(foreign[:3])}); mmval does not delete them. Move them away, or prepare "
            "into another --out."
        )
    for name in parts:
        _clear(out / name)
        _remove_if_empty(out / name)
    for path in _written_files(out):
        path.unlink(missing_ok=True)
        if path.parent != out:
            _remove_if_empty(path.parent)
    shutil.rmtree(out / PARTIAL, ignore_errors=True)


def _written_files(out: Path) -> list[Path]:
    """The files of data folder `out` that a prep wrote, by its own records: the named files,
    the shards and files (tokenizers) its manifest lists, the shards `.partial/` records list,
    and shard temp files a killed prep left. Only paths inside `out`."""
    named = [MANIFEST, INDEX, ERRORS, VERIFIED]
    manifest = _manifest_json(out) or {}
    splits = manifest.get("splits")
    for info in splits.values() if isinstance(splits, dict) else []:
        shards = info.get("shards") if isinstance(info, dict) else None
        named += [s.get("path") for s in shards or [] if isinstance(s, dict)]
    extraction = manifest.get("extraction")
    files = extraction.get("files") if isinstance(extraction, dict) else None
    named += list(files) if isinstance(files, dict) else []
    for record in (out / PARTIAL).glob("*/*.json"):
        try:
            shard = json.loads(record.read_text(encoding="utf-8")).get("shard")
        except (OSError, ValueError, AttributeError):
            continue
        named.append(shard.get("path") if isinstance(shard, dict) else None)
    found = [out / p for p in named if isinstance(p, str) and _inside(p)]
    found += out.glob(".*.tmp")
    for folder in {path.parent for path in found}:
        found += folder.glob(SHARD_TEMP)
    return [path for path in dict.fromkeys(found) if path.is_file() and not path.is_symlink()]


def _inside(relative: str) -> bool:
    """Whether a path a record lists stays inside its folder (no `..`, not absolute)."""
    path = Path(relative)
    return not path.is_absolute() and ".." not in path.parts and bool(path.parts)


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()


def _manifest_json(out: Path) -> dict[str, Any] | None:
    """`out/manifest.json` read as plain JSON when it is an mmval manifest (any version), else
    None: only its own records say what a data folder holds."""
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    keys = {"schema_version", "dataset", "splits"}
    return manifest if isinstance(manifest, dict) and keys <= manifest.keys() else None


def _folder_kind(out: Path) -> Literal["empty", "data", "foreign"]:
    """The folder's kind: "empty" (or missing; a lock file does not count), "data" (an mmval
    manifest, the `.partial/` record of a prep under way, or part folders that are data
    folders), or "foreign": another program's folder, which prep neither writes into nor
    deletes from."""
    if not out.is_dir():
        return "empty"
    if not [p for p in out.iterdir() if p.name != LOCK_FILE]:
        return "empty"
    if _manifest_json(out) is not None or (out / PARTIAL).is_dir() or _mmval_parts(out):
        return "data"
    return "foreign"


def _mmval_parts(out: Path) -> list[str]:
    """The part folders in `out` that hold (part of) an mmval prep."""
    return [name for name in part_dirs(out) if _folder_kind(out / name) == "data"]


def _check_data_folder(out: Path) -> None:
    """Refuse (exit 2) to prepare into a folder that holds other files than an mmval data set."""
    if _folder_kind(out) != "foreign":
        return
    held = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE)
    listed = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if held[3:] else "")
    raise UserError(
        f"{out} is not an mmval data folder: it holds {listed}, but no mmval manifest.json, "
        f"{PARTIAL}/ record or part folders. mmval neither writes into nor deletes from another "
        "program's folder: choose a new or empty --out."
    )


PART_DIR = re.compile(r"part-(\d{5,})-of-(\d{5,})")
SHARD_TEMP = f".part-*.parquet.*{TEMP_SUFFIX}"  # a shard's temp file (mmval.atomic.atomic_path)


def part_dirs(out: Path) -> dict[str, tuple[int, int]]:
    """The part folders in `out`: name -> (index, count)."""
    if not Path(out).is_dir():
        return {}
    found = {}
    for path in sorted(Path(out).iterdir()):
        match = PART_DIR.fullmatch(path.name)
        if match and path.is_dir():
            found[path.name] = (int(match[1]), int(match[2]))
    return found


def _is_merged(out: Path) -> bool:
    """Whether `out/manifest.json` was written by a merge of parts (not by a one-piece prep)."""
    try:
        return "parts" in json.loads((out / MANIFEST).read_text(encoding="utf-8"))["extraction"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _merge_locks(merge: Callable[..., PrepResult]) -> Callable[..., PrepResult]:
    """Run `merge` holding the locks of the merged folder and of each part folder: no part is
    prepared again while it is merged, and two merges do not write one folder."""

    @functools.wraps(merge)
    def locked_merge(dataset: str, out: Path, **kwargs: Any) -> PrepResult:
        out = Path(out)
        with contextlib.ExitStack() as held:
            if part_dirs(out):  # else `merge` refuses, creating no folder
                for folder in [out, *(out / name for name in part_dirs(out))]:
                    held.enter_context(locked(folder, folder=True, what=f"data folder {folder}"))
            return merge(dataset, out, **kwargs)

    return locked_merge


@_merge_locks
def merge_parts(
    dataset: str,
    out: Path,
    *,
    count: int | None = None,
    raw: Path | None = None,
    overrides: Sequence[str] | None = None,
    limit: int | None = None,
    splits: Sequence[str] | None = None,
    inputs: dict[str, Any] | None = None,
) -> PrepResult:
    """Make one data set in `out` of the parts `out/part-IIIII-of-NNNNN/` of a prep split
    across machines: a manifest, index and errors table over the parts' shards, which stay where
    they are. Refused, naming each part concerned, when a part is missing, incomplete or
    corrupt, was prepared with other parameters or from other raw inputs, or when the parts do
    not account for every planned input exactly once. `overrides`, `limit` and `splits`, when
    given, must be what the parts were prepared with; with `raw`, the raw folder is planned again
    and must list what the parts saw. Merging again over the same parts changes nothing."""
    out = Path(out)
    found = part_dirs(out)
    if not found:
        raise UserError(
            f"{out} holds no parts to merge (folders part-IIIII-of-NNNNN that `mmval prep "
            f"{dataset} --raw RAW --out {out} --shard-index I --num-shards N` writes)."
        )
    counts = sorted({n for _, n in found.values()})
    if count is None and len(counts) == 1:
        count = counts[0]
    if count is None or counts != [count]:
        other = [name for name, (_, n) in found.items() if n != count]
        raise UserError(
            f"{out} holds parts of preps split in different numbers of parts ({', '.join(other)});"
            " remove the stale ones, or pass --num-shards to say which to merge."
            if count is None
            else f"{out} holds parts of a prep in another number of parts than --num-shards "
            f"{count}: {', '.join(other)}; remove them before merging."
        )
    if (out / MANIFEST).is_file() and not _is_merged(out):
        raise UserError(
            f"{out} holds a data set prepared in one piece besides the parts; merge the parts "
            "into a folder of their own."
        )
    parts = [PartSpec(i, count) for i in range(count)]
    usage = f"`mmval prep {dataset} --raw RAW --out {out} --shard-index I --num-shards {count}`"
    manifests = _complete_parts(out, parts, usage)
    reference = _same_parameters(dataset, out, parts, manifests)
    record = reference.extraction["part"]
    if overrides or limit is not None or splits:
        _, _, source, params = _parameters(dataset, overrides or (), inputs)
        asked = _settings(source, params, limit, splits)
        if asked != reference.extraction["settings"]:
            found_diff = _differences(asked, reference.extraction["settings"], "settings")
            raise UserError(
                f"the parts in {out} were prepared with other settings than this command asks "
                f"for: {'; '.join(found_diff[:3])} (this command first, the parts second). "
                "Leave out --set/--limit/--splits to merge what the parts hold."
            )
    _accounted(out, parts, manifests, record)
    if raw is not None:
        _same_raw(dataset, Path(raw), reference, record["plan_sha256"])
    extraction = {k: v for k, v in reference.extraction.items() if k != "part"}
    extraction["parts"] = {"count": count, "plan_sha256": record["plan_sha256"]}
    files = extraction.get("files", {})
    for name, digest in files.items():
        path = out / parts[0].name / name
        if not path.is_file() or sha256_file(path) != digest:
            raise UserError(
                f"{path} is missing or does not match its sha256 in the part's manifest; "
                "prepare that part again with --overwrite."
            )
    header = DatasetHeader(
        reference.dataset,
        reference.version,
        reference.source_manifest_sha256,
        reference.classes,
        reference.modalities,
        extraction,
        reference.ground_truth,
        reference.task,
        reference.target,
    )
    _remove_stale_temps(out, parts=False)
    manifest, wrote = merge_data_dirs(out, header, [p.name for p in parts], list(files))
    planned = record["plan"]["clips"]
    summary = PrepSummary(
        {
            split: SplitCounts(
                planned=planned[split],
                written=info.samples,
                failed=planned[split] - info.samples,
            )
            for split, info in manifest.splits.items()
        },
        record["plan"]["planning_errors"],
    )
    return PrepResult(manifest, wrote=wrote, summary=summary)


def _complete_parts(out: Path, parts: Sequence[PartSpec], usage: str) -> list[DataManifest]:
    """Each part's manifest, its shards checked (sha256 included); every missing, unfinished or
    damaged part is named in one error."""
    problems: list[str] = []
    manifests: list[DataManifest] = []
    for part in parts:
        folder = out / part.name
        what = f"part {part.index} of {part.count} ({part.name})"
        if not folder.is_dir():
            problems.append(f"{what} is missing")
        elif not (folder / MANIFEST).is_file():
            problems.append(
                f"{what} is incomplete: it has no {MANIFEST} (still running, or interrupted: "
                "run its command again to resume it)"
            )
        else:
            try:
                manifests.append(check_data_dir(folder, verify_checksums=True, cached=True))
            except UserError as exc:
                problems.append(f"{what}: {exc}")
    if problems:
        raise UserError(
            f"cannot merge {out}: {'; '.join(problems)}. Prepare each missing or incomplete part "
            f"with {usage} (the same --set, --limit and --splits as the other parts)."
        )
    return manifests


def _part_key(manifest: DataManifest) -> dict[str, Any]:
    """What must be equal in every part: the manifest without its shards and its own share."""
    dump = manifest.model_dump(mode="json", exclude={"splits", "extraction_sha256", "index_sha256"})
    record = dump["extraction"].pop("part", None)
    dump["plan"] = (
        None if record is None else {k: record[k] for k in ("count", "plan", "plan_sha256")}
    )
    return dump


def _same_parameters(
    dataset: str, out: Path, parts: Sequence[PartSpec], manifests: Sequence[DataManifest]
) -> DataManifest:
    """The manifest most parts agree on (ties: the one part 0 has); any part that differs from
    it is named with what differs."""
    keys = [_part_key(m) for m in manifests]
    texts = [json.dumps(k, sort_keys=True) for k in keys]
    best = max(dict.fromkeys(texts), key=texts.count)  # first seen wins a tie: part 0's
    agree = [p.index for p, t in zip(parts, texts, strict=True) if t == best]
    reference = keys[texts.index(best)]
    problems = []
    for part, key, text in zip(parts, keys, texts, strict=True):
        if text == best:
            continue
        found = sorted(_differences(key, reference), key=lambda d: "settings" not in d)
        hint = (
            " (it saw other raw inputs)"
            if any(d.startswith("plan.plan_sha256") for d in found)
            else ""
        )
        if key["plan"] is None:
            found, hint = ["extraction.part: absent"], " (it was not prepared as a part)"
        problems.append(
            f"part {part.index} ({part.name}) was prepared with other parameters than part(s) "
            f"{', '.join(map(str, agree))}{hint}: {'; '.join(found[:3])}"
        )
    if problems:
        raise UserError(
            f"cannot merge {out}: {'; '.join(problems)} (the part named first, the others "
            "second). Prepare it again with the others' arguments and --overwrite."
        )
    manifest = manifests[texts.index(best)]
    entry, _ = load_dataset_manifest(dataset)
    name = _data_name(entry, manifest.extraction["settings"]["params"], out)
    if manifest.dataset != name:
        raise UserError(f"the parts in {out} hold {manifest.dataset!r}, not {name!r}.")
    return manifest


def _differences(a: object, b: object, path: str = "") -> list[str]:
    """Dotted paths at which two JSON-like values differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        found = []
        for key in dict.fromkeys([*a, *b]):
            where = f"{path}.{key}" if path else str(key)
            found += _differences(a.get(key, "absent"), b.get(key, "absent"), where)
        return found
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in _differences(x, y, f"{path}.{i}")
        ]
    return [] if a == b else [f"{path}: {json.dumps(a)[:80]} vs {json.dumps(b)[:80]}"]


def _accounted(
    out: Path, parts: Sequence[PartSpec], manifests: Sequence[DataManifest], record: dict
) -> None:
    """Check that the parts hold exactly the shares the plan gives them and that every planned
    input is in exactly one part: a sample of its shards or a row of its errors table."""
    plan = record["plan"]
    problems: list[str] = []
    seen: dict[tuple[str, str], int] = {}
    for part, manifest in zip(parts, manifests, strict=True):
        share = manifest.extraction["part"]
        what = f"part {part.index} ({part.name})"
        ranges = part_ranges(plan["shards"], part)
        if (share["index"], share["shards"]) != (part.index, ranges):
            problems.append(f"{what} holds the share of part {share['index']} ({share['shards']})")
            continue
        for split, info in manifest.splits.items():
            allowed = {shard_path(split, j) for j in range(*ranges[split])}
            stray = [s.path for s in info.shards if s.path not in allowed]
            if stray:
                problems.append(f"{what} holds shards outside its share: {', '.join(stray[:3])}")
        folder = out / part.name
        index = pq.read_table(folder / INDEX, columns=["sample_id", "split"])
        errors = pq.read_metadata(folder / ERRORS).num_rows
        inputs = sum(share["clips"].values()) + (plan["planning_errors"] if part.index == 0 else 0)
        if index.num_rows + errors != inputs:
            problems.append(
                f"{what} accounts for {index.num_rows} samples and {errors} errors, but its share "
                f"is {inputs} inputs"
            )
        ids = zip(
            index.column("split").to_pylist(), index.column("sample_id").to_pylist(), strict=True
        )
        for key in ids:
            if key in seen:
                problems.append(
                    f"sample {key[1]!r} ({key[0]}) is in parts {seen[key]} and {part.index}"
                )
            seen[key] = part.index
    if problems:
        raise UserError(
            f"cannot merge {out}: {'; '.join(problems[:5])}. Prepare the parts named again with "
            "--overwrite."
        )


def manifest_schema() -> dict[str, Any]:
    """The JSON Schema of a data set manifest (`mmval prep --schema`): `source` one of mmval's
    sources, and `params` checked against that source's parameters."""
    models = [(DatasetManifest, "validation")]
    models += [(SOURCES[name].Params, "validation") for name in sorted(SOURCES)]
    refs, schema = models_json_schema(models, title="mmval data set manifest")
    manifest = schema["$defs"][refs[(DatasetManifest, "validation")]["$ref"].split("/")[-1]]
    manifest["properties"]["source"]["enum"] = sorted(SOURCES)
    schema |= {"$ref": refs[(DatasetManifest, "validation")]["$ref"]}
    schema["allOf"] = [
        {
            "if": {"properties": {"source": {"const": name}}},
            "then": {"properties": {"params": refs[(SOURCES[name].Params, "validation")]}},
        }
        for name in sorted(SOURCES)
    ]
    return schema


def check_raw(dataset: str, raw: Path | None) -> None:
    """Refuse a prep without the raw folder its data set reads, or with one it does not read
    (before anything starts)."""
    entry, _ = load_dataset_manifest(dataset)
    if entry.source in SOURCES:  # else `prepare` names the problem
        _check_raw(entry, SOURCES[entry.source], raw)


def _check_raw(entry: DatasetManifest, source: Source, raw: Path | None) -> None:
    if source.needs_raw and (raw is None or not Path(raw).is_dir()):
        where = "pass --raw DIR" if raw is None else f"--raw {raw} is not a folder"
        raise UserError(
            f"{entry.name} is prepared from its raw files: {where}. {entry.description}"
        )
    if not source.needs_raw and raw is not None:
        raise UserError(
            f"{entry.name} does not read raw files ({entry.description}); leave out --raw {raw}."
        )


def dataset_parameters(dataset: str) -> list[FieldDoc]:
    """The `--set` parameters of a data set (a built-in name or a manifest file): its source's
    parameters, with the values its manifest sets as their defaults."""
    entry, _ = load_dataset_manifest(dataset)
    if entry.source not in SOURCES:
        raise UserError(f"data manifest {dataset}: source {entry.source!r} is not one of mmval's.")
    return describe_values(entry.params, SOURCES[entry.source].Params)


def _parameters(
    dataset: str, overrides: Sequence[str], inputs: dict[str, Any] | None = None
) -> tuple[DatasetManifest, str, Source, BaseModel]:
    """The data set's manifest entry, its sha256, its source and the validated parameters."""
    entry, entry_sha = load_dataset_manifest(dataset)
    if entry.source not in SOURCES:
        raise UserError(
            f"data manifest {dataset}: source {entry.source!r} is not one of mmval's sources "
            f"({', '.join(sorted(SOURCES))})."
        )
    source = SOURCES[entry.source]
    try:
        given = {**entry.params, **(inputs or {})}
        params = source.Params.model_validate(apply_overrides(given, overrides))
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, f"parameters of {dataset}")) from None
    return entry, entry_sha, source, params


def _data_name(entry: DatasetManifest, params: dict[str, Any], out: Path) -> str:
    """The name a prep records: the manifest's, or for the user's own data (a source whose
    parameters have a `name` field: table, folder) that field, by default the output folder's
    name, so that two users' data sets are told apart in runs and reports."""
    if "name" not in SOURCES[entry.source].Params.model_fields:
        return entry.name
    return params.get("name") or Path(out).resolve().name or entry.name


def _settings(
    source: Source, params: BaseModel, limit: int | None, splits: Sequence[str] | None
) -> dict[str, Any]:
    """What a prep records as `extraction.settings`: a re-run or a part must match it. A
    source that reads the user's files (`input_files`) adds their paths and sha256, so that a
    number can be traced to its files and a changed file is a changed setting."""
    settings: dict[str, Any] = {
        "params": params.model_dump(mode="json"),
        "limit": limit,
        "splits": list(splits) if splits else None,
    }
    if hasattr(source, "input_files"):
        settings["inputs"] = source.input_files(params)
    return settings


def _same_raw(dataset: str, raw: Path, reference: DataManifest, digest: str) -> None:
    """Plan `raw` again with the parts' settings: it must list exactly what the parts saw."""
    if not raw.is_dir():
        raise UserError(f"--raw {raw} is not a folder.")
    entry, _ = load_dataset_manifest(dataset)
    source = SOURCES[entry.source]
    settings = reference.extraction["settings"]
    params = source.Params.model_validate(settings["params"])
    plan = source.plan(entry, params, raw, limit=settings["limit"], only_splits=settings["splits"])
    if plan_digest(plan) != digest:
        raise UserError(
            f"{raw} lists other inputs than the parts were prepared from (clips added, removed "
            "or renamed since); prepare every part again with --overwrite."
        )


def _remove_stale_temps(out: Path, *, parts: bool = True) -> None:
    """Half-written files of a killed prep: in `out` and `.partial`, and the shard temps in its
    subfolders (nothing else there: a subfolder may be the user's). Part folders are left alone
    (`parts=False`, or a part's own run): another machine may be writing."""
    if not out.is_dir():
        return
    folders = [out]
    if (out / PARTIAL).is_dir():
        folders += [out / PARTIAL, *(p for p in (out / PARTIAL).iterdir() if p.is_dir())]
    for folder in folders:
        remove_stale_temps(folder)
    if parts:
        for folder in out.iterdir():
            if folder.is_dir() and folder.name not in part_dirs(out) and folder.name != PARTIAL:
                for temp in folder.glob(SHARD_TEMP):
                    temp.unlink(missing_ok=True)
