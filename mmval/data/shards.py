"""Shard format v1: Parquet shards of samples, a manifest that pins them, a global index.

Layout of a data directory (see docs/shard-format.md):
    manifest.json          what the shards hold and their checksums
    index.parquet          sample_id, split, label, shard, row_group, row
    errors.parquet         source, reason (inputs that produced no sample)
    <split>/part-NNNNN.parquet
    part-IIIII-of-NNNNN/   a part of a prep split across machines (a data directory itself); a
                           merged manifest and index reference the parts' shards where they lie
    .verified.json         (size, mtime) at which each shard last matched its sha256, and at
                           which the index last matched the shards row by row
Tensors are stored as raw little-endian bytes in binary columns with their dtype and shape in
the manifest (and the field metadata): Arrow tensor types and compression on media columns were
measured to be several times slower to read (docs/data.md#why-parquet-shards). Video frames and
optical flow are stored as lists of JPEG images with their timestamps; text as token ids with
the text they were made from.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from mmval.atomic import atomic_path, write_text_atomic
from mmval.errors import UserError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.parquet"
ERRORS = "errors.parquet"
VERIFIED = ".verified.json"
ROWS_PER_SHARD = 1024
ROW_GROUP_SIZE = 64
SMALL_COLUMNS = ("sample_id", "split", "label", "source")
INDEX_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("split", pa.string()),
        ("label", pa.int32()),
        ("shard", pa.string()),
        ("row_group", pa.int32()),
        ("row", pa.int32()),
    ]
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Encoding = Literal["raw", "jpeg", "jpeg-uv", "tokens"]
# what a data set's samples are labelled for (`mmval.tasks` holds what each means for training):
# one class per sample, a score, a class per time segment, a class per voxel
TaskKind = Literal["classification", "regression", "localisation", "segmentation"]
TARGET = "target"  # the column holding a non-classification task's per-sample target


class ModalitySpec(_Strict):
    """One modality column. `raw`: one fixed-shape tensor per sample, `shape` is its shape.
    `jpeg`: a list of JPEG frames per sample (any count); `shape` is what the loader returns,
    [K, H, W, C] with K frames picked by segments. `jpeg-uv`: optical flow as grayscale JPEGs
    interleaved [u0, v0, u1, v1, ...]; the loader returns K pairs as [K, H, W, 2]. `tokens`: the
    token ids of a text (at most shape[0]), beside the cleaned text in `<name>_text`; the loader
    pads them with `pad_id` to [shape[0]]. `vocab_file` names the tokenizer saved in the data
    directory, `vocab_size` the size of its vocabulary."""

    name: str
    dtype: Literal["float32", "float16", "uint8", "int16", "int32"]
    shape: list[int]
    encoding: Encoding = "raw"
    description: str = ""
    vocab_size: int | None = None
    pad_id: int = 0
    vocab_file: str | None = None

    @property
    def item_bytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize * np.prod(self.shape, dtype=np.int64))


class ShardInfo(_Strict):
    path: str
    rows: int
    row_groups: int
    bytes: int
    sha256: str


class SplitInfo(_Strict):
    samples: int
    shards: list[ShardInfo]


class DataManifest(_Strict):
    schema_version: int = SCHEMA_VERSION
    dataset: str
    version: str
    source_manifest_sha256: str = Field(description="sha256 of the data_manifests/ YAML used")
    classes: list[str]
    modalities: list[ModalitySpec]
    extraction: dict = Field(default_factory=dict)
    extraction_sha256: str
    splits: dict[str, SplitInfo]
    ground_truth: list[ModalitySpec] = Field(
        default_factory=list,
        description="per-sample variables that are not model inputs (a generator's latent "
        "factors), stored as raw columns beside the modalities; no recipe can pick them",
    )
    index_sha256: str | None = Field(
        default=None,
        description="sha256 of index.parquet; absent in data folders prepared before it was "
        "recorded (their index is still checked against the manifest and the shards)",
    )
    task: TaskKind = Field(
        default="classification",
        description="what the samples are labelled for; `label` is always one class per "
        "sample (stratified splits, class-balanced sampling), other tasks add `target`",
    )
    target: ModalitySpec | None = Field(
        default=None,
        description="the raw column `target` of a regression (score [1]), localisation "
        "(class per segment [T]) or segmentation (class per voxel [D, H, W]) data set",
    )

    @model_validator(mode="after")
    def _ground_truth_columns(self) -> DataManifest:
        taken = {*SMALL_COLUMNS, *(m.name for m in self.modalities)}
        for spec in self.ground_truth:
            if spec.encoding != "raw":
                raise ValueError(f"ground-truth column {spec.name!r} must be raw-encoded")
            if spec.name in taken:
                raise ValueError(f"ground-truth column {spec.name!r} clashes with another column")
            taken.add(spec.name)
        if (self.task == "classification") != (self.target is None):
            raise ValueError(
                f"a {self.task} data set needs a target exactly when it is not classification"
            )
        if self.target is not None and (
            self.target.name != TARGET or self.target.encoding != "raw" or TARGET in taken
        ):
            raise ValueError(f"the target must be the raw column {TARGET!r}, used by nothing else")
        return self

    @property
    def stored_columns(self) -> list[ModalitySpec]:
        """Every tensor column of a shard: the modalities, the ground truth, the target."""
        return [*self.modalities, *self.ground_truth, *([self.target] if self.target else [])]

    @model_serializer(mode="wrap")
    def _omit_empty_optional_fields(self, handler: SerializerFunctionWrapHandler) -> dict:
        """A data set without ground truth or index sha256 dumps as before those fields
        existed, so its manifest.json and fingerprint (recorded in checkpoints) do not change."""
        dump = handler(self)
        if not self.ground_truth:
            dump.pop("ground_truth", None)
        if self.index_sha256 is None:
            dump.pop("index_sha256", None)
        if self.target is None:  # a classification set: as before tasks existed
            dump.pop("task", None)
            dump.pop("target", None)
        return dump

    def modality(self, name: str) -> ModalitySpec:
        for spec in self.modalities:
            if spec.name == name:
                return spec
        known = ", ".join(m.name for m in self.modalities)
        raise UserError(f"data set {self.dataset!r} has no modality {name!r} (it has: {known}).")

    def fingerprint(self) -> str:
        """Identifies the exact shard content a checkpoint was trained on. The index sha256 is
        left out: the shards' sha256 already pin the samples, and a checkpoint trained before
        the index had one must still match the same data prepared again."""
        return sha256_text(self.model_copy(update={"index_sha256": None}).model_dump_json())


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_json(obj: object) -> str:
    return sha256_text(json.dumps(obj, sort_keys=True, separators=(",", ":")))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class SplitSamples:
    """All samples of one split, in memory: enough for vector and feature data sets, and for
    small generated image-text sets (one JPEG still image per sample, stored as the image-text
    sources store it: one frame at time 0; token ids in `arrays` with their text in `texts`)."""

    sample_ids: list[str]
    labels: np.ndarray
    sources: list[str]
    arrays: dict[str, np.ndarray]  # modality -> [N, *shape]
    texts: dict[str, list[str]] = field(default_factory=dict)  # tokens modality -> text per sample
    images: dict[str, list[bytes]] = field(default_factory=dict)  # jpeg modality -> one JPEG each

    def subset(self, rows: np.ndarray) -> SplitSamples:
        """The samples at `rows`, in that order."""
        return SplitSamples(
            sample_ids=[self.sample_ids[i] for i in rows],
            labels=self.labels[rows],
            sources=[self.sources[i] for i in rows],
            arrays={name: values[rows] for name, values in self.arrays.items()},
            texts={name: [texts[i] for i in rows] for name, texts in self.texts.items()},
            images={name: [images[i] for i in rows] for name, images in self.images.items()},
        )

    def records(self, rows: Sequence[int]) -> list[SampleRecord]:
        return [
            SampleRecord(
                sample_id=self.sample_ids[i],
                label=int(self.labels[i]),
                source=self.sources[i],
                values={
                    **{name: values[i] for name, values in self.arrays.items()},
                    **{name: [images[i]] for name, images in self.images.items()},
                },
                times={name: np.zeros(1, np.float32) for name in self.images},
                texts={name: texts[i] for name, texts in self.texts.items()},
            )
            for i in rows
        ]


@dataclass
class SampleRecord:
    """One extracted sample: a raw tensor, or JPEG bytes (with their times) per modality."""

    sample_id: str
    label: int
    source: str
    values: dict[str, np.ndarray | list[bytes]]
    times: dict[str, np.ndarray] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetHeader:
    """What a prepared data set says about itself besides its shards."""

    dataset: str
    version: str
    source_manifest_sha256: str
    classes: list[str]
    modalities: list[ModalitySpec]
    extraction: dict
    ground_truth: list[ModalitySpec] = field(default_factory=list)
    task: TaskKind = "classification"
    target: ModalitySpec | None = None

    @property
    def columns(self) -> list[ModalitySpec]:
        """Every tensor column a shard stores (`DataManifest.stored_columns`)."""
        return [*self.modalities, *self.ground_truth, *([self.target] if self.target else [])]

    def manifest(self, splits: dict[str, SplitInfo], index_sha256: str) -> DataManifest:
        """The data folder's manifest once its splits and its index are written."""
        return DataManifest(
            dataset=self.dataset,
            version=self.version,
            source_manifest_sha256=self.source_manifest_sha256,
            classes=list(self.classes),
            modalities=list(self.modalities),
            extraction=dict(self.extraction),
            extraction_sha256=sha256_json(dict(self.extraction)),
            splits=splits,
            ground_truth=list(self.ground_truth),
            index_sha256=index_sha256,
            task=self.task,
            target=self.target,
        )


class ShardResult(_Strict):
    """What one planned shard became; kept while a prep runs so that a re-run can resume."""

    tasks: list[str] = Field(description="sample ids planned for this shard, in order")
    shard: ShardInfo | None = Field(description="None when every planned sample failed")
    sample_ids: list[str]
    labels: list[int]
    errors: list[tuple[str, str]] = Field(default_factory=list)


def is_float_raw(spec: ModalitySpec) -> bool:
    """A raw-encoded modality of a float dtype: the kind that can hold NaN or Inf."""
    return spec.encoding == "raw" and np.dtype(spec.dtype).kind == "f"


def non_finite_reason(values: np.ndarray, spec: ModalitySpec) -> str:
    """Why one sample's tensor of a float modality may not be stored ("": it may). Checked in
    the stored dtype: a value beyond float16's range becomes Inf when it is cast."""
    if not is_float_raw(spec) or np.isfinite(np.asarray(values).astype(spec.dtype)).all():
        return ""
    return f"NaN or Inf in modality {spec.name!r} (as {spec.dtype}); the sample is not stored"


def record_problem(record: SampleRecord, modalities: Sequence[ModalitySpec]) -> str:
    """Why an extracted sample may not be stored ("": it may): a non-finite float value."""
    for spec in modalities:
        value = record.values.get(spec.name)
        if isinstance(value, np.ndarray):
            reason = non_finite_reason(value, spec)
            if reason:
                return reason
    return ""


def finite_samples(
    samples: SplitSamples, modalities: Sequence[ModalitySpec]
) -> tuple[SplitSamples, list[tuple[str, str]]]:
    """The samples whose float modalities are finite, and (source, reason) for the others:
    a NaN or Inf input trains to nothing (every prediction one class) or stops training far
    from its cause, so it goes to the errors table like any input that gave no sample."""
    reasons = [""] * len(samples.sample_ids)
    for spec in modalities:
        values = samples.arrays.get(spec.name)
        if values is None or not len(values) or not is_float_raw(spec):
            continue
        stored = values.astype(spec.dtype, copy=False).reshape(len(values), -1)
        for i in np.flatnonzero(~np.isfinite(stored).all(axis=1)).tolist():
            reasons[i] = reasons[i] or non_finite_reason(values[i], spec)
    bad = [i for i, reason in enumerate(reasons) if reason]
    if not bad:
        return samples, []
    errors = [(samples.sources[i], reasons[i]) for i in bad]
    keep = np.asarray([i for i, reason in enumerate(reasons) if not reason], dtype=np.int64)
    return samples.subset(keep), errors


def _tensor_column(values: list[np.ndarray], spec: ModalitySpec) -> pa.Array:
    dtype = np.dtype(spec.dtype).newbyteorder("<")
    flat = np.ascontiguousarray(np.stack(values).astype(dtype, copy=False)) if values else b""
    offsets = np.arange(len(values) + 1, dtype=np.int64) * spec.item_bytes
    return pa.LargeBinaryArray.from_buffers(  # the buffers wrap the arrays: no copy
        pa.large_binary(), len(values), [None, pa.py_buffer(offsets), pa.py_buffer(flat)]
    )


def _schema(modalities: Sequence[ModalitySpec]) -> pa.Schema:
    fields = [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("split", pa.dictionary(pa.int8(), pa.string()), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
    ]
    for spec in modalities:
        meta = {"dtype": spec.dtype, "shape": json.dumps(spec.shape), "encoding": spec.encoding}
        if spec.encoding == "raw":
            fields.append(pa.field(spec.name, pa.large_binary(), nullable=False, metadata=meta))
        elif spec.encoding == "tokens":
            fields.append(pa.field(spec.name, pa.list_(pa.int32()), nullable=False, metadata=meta))
            fields.append(pa.field(f"{spec.name}_text", pa.string(), nullable=False))
        else:
            fields.append(pa.field(spec.name, pa.list_(pa.binary()), nullable=False, metadata=meta))
            fields.append(pa.field(f"{spec.name}_t", pa.list_(pa.float32()), nullable=False))
    return pa.schema(fields)


def records_table(
    records: Sequence[SampleRecord], split: str, modalities: Sequence[ModalitySpec]
) -> pa.Table:
    n = len(records)
    columns: list[pa.Array] = [
        pa.array([r.sample_id for r in records], pa.string()),
        pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int8)), pa.array([split])),
        pa.array([r.label for r in records], pa.int32()),
        pa.array([r.source for r in records], pa.string()),
    ]
    for spec in modalities:
        if spec.encoding == "raw":
            columns.append(_tensor_column([r.values[spec.name] for r in records], spec))
        elif spec.encoding == "tokens":
            ids = [np.asarray(r.values[spec.name], np.int32) for r in records]
            columns.append(pa.array(ids, pa.list_(pa.int32())))
            columns.append(pa.array([r.texts[spec.name] for r in records], pa.string()))
        else:
            columns.append(pa.array([r.values[spec.name] for r in records], pa.list_(pa.binary())))
            columns.append(
                pa.array(
                    [np.asarray(r.times[spec.name], np.float32) for r in records],
                    pa.list_(pa.float32()),
                )
            )
    return pa.Table.from_arrays(columns, schema=_schema(modalities))


def write_shard(
    root: Path, rel_path: str, table: pa.Table, modalities: Sequence[ModalitySpec]
) -> ShardInfo:
    """Write one shard atomically; media columns uncompressed, small columns zstd."""
    with atomic_path(root / rel_path) as tmp:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_SIZE, **_write_options(modalities))
    return _shard_info(root, rel_path)


class ShardWriter:
    """A shard written row group by row group as its records come (`add`), atomically, the
    same bytes as `write_shard` of all its rows: they never sit in memory together (a
    Kinetics-Sounds shard's 512 records are about 150 MB, the table built of them as much
    again). Use it as a context manager; after a clean exit `info` describes the shard, or is
    None when no record came (no file is written then)."""

    def __init__(
        self, root: Path, rel_path: str, split: str, modalities: Sequence[ModalitySpec]
    ) -> None:
        self._root, self._rel_path, self._split = root, rel_path, split
        self._modalities = modalities
        self._rows: list[SampleRecord] = []  # not yet written: fewer than a row group
        self._file = contextlib.ExitStack()  # the temp file, renamed over the shard at the end
        self._writer: pq.ParquetWriter | None = None
        self.info: ShardInfo | None = None

    def __enter__(self) -> ShardWriter:
        return self

    def add(self, record: SampleRecord) -> None:
        self._rows.append(record)
        if len(self._rows) == ROW_GROUP_SIZE:
            self._write_rows()

    def _write_rows(self) -> None:
        table = records_table(self._rows, self._split, self._modalities)
        if self._writer is None:
            tmp = self._file.enter_context(atomic_path(self._root / self._rel_path))
            options = _write_options(self._modalities)
            self._writer = pq.ParquetWriter(tmp, table.schema, **options)
        self._writer.write_table(table, row_group_size=ROW_GROUP_SIZE)
        self._rows = []

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None and self._rows:
                self._write_rows()
            if self._writer is not None:
                self._writer.close()
        except BaseException as error:
            self._file.__exit__(type(error), error, error.__traceback__)  # removes the temp
            raise
        # renames the temp file over the shard, or removes it when the caller failed (whose
        # error then goes on, or becomes a WriteError when the file system refused a write)
        self._file.__exit__(exc_type, exc, traceback)
        if exc_type is None and self._writer is not None:
            self.info = _shard_info(self._root, self._rel_path)


def _write_options(modalities: Sequence[ModalitySpec]) -> dict[str, Any]:
    """Media columns uncompressed (zstd saves little and slows reads), small columns zstd."""
    compression = dict.fromkeys(_schema(modalities).names, "zstd")
    for spec in modalities:
        if spec.encoding != "tokens":  # token ids are small and compress well
            compression[spec.name] = "none"
    return {
        "compression": compression,
        "use_dictionary": ["split"],
        "write_statistics": ["sample_id", "label"],
        "data_page_size": 1 << 20,
    }


def _shard_info(root: Path, rel_path: str) -> ShardInfo:
    path = root / rel_path
    meta = pq.ParquetFile(path).metadata
    return ShardInfo(
        path=rel_path,
        rows=meta.num_rows,
        row_groups=meta.num_row_groups,
        bytes=path.stat().st_size,
        sha256=sha256_file(path),
    )


def shard_path(split: str, number: int) -> str:
    return f"{split}/part-{number:05d}.parquet"


def shard_order(sample_ids: Sequence[str], seed: int = 0) -> np.ndarray:
    """The fixed order in which a split's samples are cut into shards: sorted by id, then
    permuted with a fixed seed so that each row group mixes classes."""
    by_id = np.argsort(np.asarray(sample_ids, dtype=object), kind="stable")
    return by_id[np.random.default_rng([seed, len(sample_ids)]).permutation(len(sample_ids))]


def finalize_dataset(
    out: Path,
    header: DatasetHeader,
    results: Mapping[str, Sequence[ShardResult]],
    errors: Sequence[tuple[str, str]] = (),
) -> DataManifest:
    """Write the index, the errors table and (last) the manifest over finished shards."""
    index_parts: list[pa.Table] = []
    split_infos: dict[str, SplitInfo] = {}
    all_errors = list(errors)
    for split_name, shard_results in results.items():
        shards = [r.shard for r in shard_results if r.shard is not None]
        for result in shard_results:
            all_errors += result.errors
            if result.shard is None:
                continue
            positions = np.arange(len(result.sample_ids))
            index_parts.append(
                pa.table(
                    {
                        "sample_id": pa.array(result.sample_ids, pa.string()),
                        "split": pa.array([split_name] * len(positions), pa.string()),
                        "label": pa.array(result.labels, pa.int32()),
                        "shard": pa.array([result.shard.path] * len(positions), pa.string()),
                        "row_group": pa.array(positions // ROW_GROUP_SIZE, pa.int32()),
                        "row": pa.array(positions % ROW_GROUP_SIZE, pa.int32()),
                    }
                )
            )
        split_infos[split_name] = SplitInfo(samples=sum(s.rows for s in shards), shards=shards)
    index = pa.concat_tables(index_parts) if index_parts else INDEX_SCHEMA.empty_table()
    index_bytes = _index_bytes(index)
    with atomic_path(out / INDEX) as tmp:
        tmp.write_bytes(index_bytes)
    error_schema = pa.schema([("source", pa.string()), ("reason", pa.string())])
    error_table = pa.Table.from_pylist(
        [{"source": source, "reason": reason} for source, reason in all_errors],
        schema=error_schema,
    )
    with atomic_path(out / ERRORS) as tmp:
        pq.write_table(error_table, tmp)
    manifest = header.manifest(split_infos, hashlib.sha256(index_bytes).hexdigest())
    write_text_atomic(out / MANIFEST, manifest.model_dump_json(indent=2) + "\n")
    return manifest


def _index_bytes(index: pa.Table) -> bytes:
    """index.parquet as it is written, so that its sha256 goes in the manifest."""
    sink = pa.BufferOutputStream()
    pq.write_table(index, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def write_dataset(
    out: Path,
    header: DatasetHeader,
    splits: Mapping[str, SplitSamples],
    errors: Sequence[tuple[str, str]] = (),
) -> DataManifest:
    """Write in-memory splits as shards, then index, errors and manifest. The same input always
    gives the same bytes; the manifest is written last: its presence marks a complete set.
    A sample with a NaN or Inf in a float modality is not written: it goes to the errors
    table with the modality named."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    results: dict[str, list[ShardResult]] = {}
    columns = header.columns  # ground truth and target: raw columns too
    errors = list(errors)
    for split_name, samples in splits.items():
        samples, dropped = finite_samples(samples, header.modalities)
        errors += dropped
        order = shard_order(samples.sample_ids)
        results[split_name] = []
        for number, start in enumerate(range(0, len(order), ROWS_PER_SHARD)):
            records = samples.records(order[start : start + ROWS_PER_SHARD])
            table = records_table(records, split_name, columns)
            info = write_shard(out, shard_path(split_name, number), table, columns)
            ids = [r.sample_id for r in records]
            labels = [r.label for r in records]
            results[split_name].append(
                ShardResult(tasks=ids, shard=info, sample_ids=ids, labels=labels)
            )
    return finalize_dataset(out, header, results, errors)


def merge_data_dirs(
    out: Path, header: DatasetHeader, parts: Sequence[str], files: Sequence[str] = ()
) -> tuple[DataManifest, bool]:
    """Write one index, errors table and manifest in `out` over the complete data directories
    `out/<part>`, each holding a contiguous run of one plan's shards, given in shard order.
    Shards stay where they are, referenced as `<part>/<split>/part-NNNNN.parquet` (nothing is
    copied), so `out` reads as one data set whose rows come in the order one prep of all the
    shards gives. `files` (tokenizers) are copied from the first part. The manifest is written
    last, after the old one is removed; an output identical to the existing one is kept (False)."""
    out = Path(out)
    manifests = [load_manifest(out / part) for part in parts]
    indexes = [pq.read_table(out / part / INDEX) for part in parts]
    split_infos: dict[str, SplitInfo] = {}
    index_parts: list[pa.Table] = []
    for split in manifests[0].splits:
        shards: list[ShardInfo] = []
        for part, manifest, index in zip(parts, manifests, indexes, strict=True):
            info = manifest.splits.get(split)
            shards += [
                shard.model_copy(update={"path": f"{part}/{shard.path}"})
                for shard in (info.shards if info else [])
            ]
            rows = index.filter(pc.equal(index.column("split"), split))
            where = [f"{part}/{path}" for path in rows.column("shard").to_pylist()]
            index_parts.append(
                rows.set_column(
                    rows.schema.get_field_index("shard"), "shard", pa.array(where, pa.string())
                )
            )
        split_infos[split] = SplitInfo(samples=sum(s.rows for s in shards), shards=shards)
    index = (
        pa.concat_tables(index_parts).cast(INDEX_SCHEMA).combine_chunks()
        if index_parts
        else INDEX_SCHEMA.empty_table()
    )
    errors = pa.concat_tables([pq.read_table(out / part / ERRORS) for part in parts])
    errors = errors.combine_chunks()
    index_bytes = _index_bytes(index)
    manifest = header.manifest(split_infos, hashlib.sha256(index_bytes).hexdigest())
    text = manifest.model_dump_json(indent=2) + "\n"
    copies = [(out / parts[0] / name, out / name) for name in files]
    if _holds(out, text, index_bytes, errors, copies):
        return manifest, False
    (out / MANIFEST).unlink(missing_ok=True)
    with atomic_path(out / INDEX) as tmp:
        tmp.write_bytes(index_bytes)
    with atomic_path(out / ERRORS) as tmp:
        pq.write_table(errors, tmp)
    for name in files:
        data = (out / parts[0] / name).read_bytes()
        with atomic_path(out / name) as tmp:
            tmp.write_bytes(data)
    write_text_atomic(out / MANIFEST, text)
    return manifest, True


def _holds(
    out: Path, manifest: str, index: bytes, errors: pa.Table, copies: Sequence[tuple[Path, Path]]
) -> bool:
    """Whether `out` already holds exactly this manifest, index (its bytes), errors table and
    copies."""
    paths = [out / MANIFEST, out / INDEX, out / ERRORS, *(target for _, target in copies)]
    if not all(path.is_file() for path in paths):
        return False
    try:
        same = (
            (out / MANIFEST).read_text(encoding="utf-8") == manifest
            and (out / INDEX).read_bytes() == index
            and pq.read_table(out / ERRORS).equals(errors)
        )
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError):
        return False
    return same and all(a.read_bytes() == b.read_bytes() for a, b in copies)


def load_manifest(root: Path) -> DataManifest:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise UserError(
            f"{root} is not a prepared data directory: {MANIFEST} is missing. "
            "Prepare it with `mmval prep DATASET --out DIR` "
            "(an interrupted prep writes no manifest)."
        )
    try:
        manifest = DataManifest.model_validate_json(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise UserError(f"{path} is not a valid mmval manifest: {exc}") from None
    if manifest.schema_version != SCHEMA_VERSION:
        raise UserError(
            f"{path} has shard schema version {manifest.schema_version}; this mmval reads "
            f"version {SCHEMA_VERSION}. Re-run `mmval prep`."
        )
    return manifest


def check_data_dir(
    root: Path, *, verify_checksums: bool = False, cached: bool = False
) -> DataManifest:
    """Check the folder against its manifest and raise one UserError listing every problem.
    Shards: inside the folder, present, their size, Parquet footer and schema, and with
    `verify_checksums` their sha256. Index: its sha256 (when the manifest records one), and,
    since a tampered index with a recomputed or absent sha256 would be trusted otherwise, its
    rows against the manifest (`_index_problems`) and, with `verify_checksums`, row by row
    against the shards' sample ids and labels. `cached` skips the sha256 of shards, and the
    row-by-row comparison, for files unchanged (size, mtime) since they last agreed."""
    root = Path(root)
    manifest = load_manifest(root)
    problems: list[str] = []
    if not (root / ERRORS).is_file():
        problems.append(f"{ERRORS} is missing")
    index_problem = _schema_problem(root / INDEX, INDEX_SCHEMA)
    if index_problem is not None:
        problems.append(index_problem)
    expected = _schema(manifest.stored_columns)
    intact: list[ShardInfo] = []
    for split_name, split in manifest.splits.items():
        for shard in split.shards:
            path = root / shard.path
            outside = _outside(root, shard.path)
            if outside:
                problems.append(f"{shard.path} ({split_name}) {outside}")
                continue
            if not path.is_file():
                problems.append(f"{shard.path} ({split_name}) is missing")
                continue
            size = path.stat().st_size
            if size != shard.bytes:
                problems.append(f"{shard.path} has {size} bytes, the manifest says {shard.bytes}")
                continue
            try:
                meta = pq.ParquetFile(path).metadata
            except (pa.ArrowInvalid, OSError) as exc:
                problems.append(f"{shard.path} is not a readable Parquet file ({exc})")
                continue
            if (meta.num_rows, meta.num_row_groups) != (shard.rows, shard.row_groups):
                problems.append(
                    f"{shard.path} has {meta.num_rows} rows in {meta.num_row_groups} row groups, "
                    f"the manifest says {shard.rows} in {shard.row_groups}"
                )
                continue
            schema_problem = _schema_problem(path, expected, shard.path)
            if schema_problem is not None:
                problems.append(schema_problem)
                continue
            intact.append(shard)
    index: IndexRows | None = None
    if index_problem is None:
        data = (root / INDEX).read_bytes()
        index = IndexRows.read(pa.BufferReader(data))
        problems += index.problems(root, manifest)
        if manifest.index_sha256 not in (None, hashlib.sha256(data).hexdigest()):
            changed = [] if problems else index.against_shards(root)  # name a sample
            what = f" ({'; '.join(changed)})" if changed else ""
            problems.insert(0, f"{INDEX} does not match its sha256 in the manifest{what}")
    if verify_checksums:
        known = _stamps(root) if cached else {}
        stamps, bad = _verify_checksums(root, intact, known)
        problems += bad
        if not problems and index is not None:
            stamp = _index_stamp(root, stamps)
            if known.get(INDEX) != stamp:
                problems += index.against_shards(root)
            if not problems:
                stamps[INDEX] = stamp
        if stamps != known:
            with contextlib.suppress(OSError):  # a read-only data folder: verified again next time
                write_text_atomic(root / VERIFIED, json.dumps(stamps))
    if problems:
        raise corrupt_data(root, problems)
    return manifest


def corrupt_data(root: Path, problems: Sequence[str]) -> UserError:
    """The error for a data folder that disagrees with its manifest."""
    listing = "; ".join(problems)
    return UserError(
        f"data directory {root} is incomplete or corrupt: {listing}. "
        "Re-run `mmval prep` with --overwrite to rebuild it."
    )


def _outside(root: Path, rel: str) -> str:
    """Why the shard path `rel` (from the manifest or the index) does not name a file inside
    the data folder ("": it does): absolute, climbing with `..`, or a symlink leading out."""
    if PurePosixPath(rel).is_absolute() or Path(rel).is_absolute():
        return "is outside the data folder (an absolute path)"
    if ".." in PurePosixPath(rel).parts:
        return "is outside the data folder (a path with '..')"
    target = (root / rel).resolve()
    if not target.is_relative_to(root.resolve()):
        return f"resolves outside the data folder (to {target})"
    return ""


def row_mismatch(
    split: str,
    sample: str,
    label: int,
    shard: str,
    row_group: int,
    row: int,
    held: tuple[str, int],
) -> str:
    """An index row whose sample id or label differs from the row of the shard it points to."""
    return (
        f"split {split}: {INDEX} says sample {sample!r} with label {label} is row {row} of "
        f"row group {row_group} of {shard}, but the shard holds sample {held[0]!r} with label "
        f"{held[1]} there"
    )


def _first(what: str, count: int) -> str:
    return what if count <= 1 else f"{what} (and {count - 1} more)"


@dataclass
class IndexRows:
    """index.parquet as arrays, with the (split, shard) pair of each row numbered."""

    sample_id: np.ndarray  # object
    split: list[str]  # split of each pair
    shard: list[str]  # shard path of each pair
    pair: np.ndarray  # [N] pair number of each row
    label: np.ndarray
    row_group: np.ndarray
    row: np.ndarray
    nulls: list[str]  # columns holding nulls (then the arrays are empty)

    @classmethod
    def read(cls, source: pa.BufferReader | Path) -> IndexRows:
        table = pq.read_table(source).combine_chunks()
        nulls = [name for name in table.column_names if table.column(name).null_count]
        if nulls:
            table = table.slice(0, 0)
        splits = pc.dictionary_encode(table.column("split")).chunks
        shards = pc.dictionary_encode(table.column("shard")).chunks
        split_names = splits[0].dictionary.to_pylist() if splits else []
        shard_names = shards[0].dictionary.to_pylist() if shards else []
        split_of = splits[0].indices.to_numpy().astype(np.int64) if splits else np.zeros(0, int)
        shard_of = shards[0].indices.to_numpy().astype(np.int64) if shards else np.zeros(0, int)
        width = max(len(shard_names), 1)
        pairs, pair = np.unique(split_of * width + shard_of, return_inverse=True)
        return cls(
            sample_id=table.column("sample_id").to_numpy(zero_copy_only=False),
            split=[split_names[p // width] for p in pairs.tolist()],
            shard=[shard_names[p % width] for p in pairs.tolist()],
            pair=pair.reshape(-1).astype(np.int64),
            label=table.column("label").to_numpy().astype(np.int64),
            row_group=table.column("row_group").to_numpy().astype(np.int64),
            row=table.column("row").to_numpy().astype(np.int64),
            nulls=nulls,
        )

    def _pair_rows(self) -> list[np.ndarray]:
        """The rows of each pair, in index order."""
        if not self.split:
            return []
        order = np.argsort(self.pair, kind="stable")
        ends = np.cumsum(np.bincount(self.pair, minlength=len(self.split)))
        return np.split(order, ends[:-1])

    def problems(self, root: Path, manifest: DataManifest) -> list[str]:
        """Where the index disagrees with the manifest: a row in a split the manifest lacks or
        pointing to a shard it does not list for that split (a path outside the folder
        included), a row address beyond its shard, two rows at one address, a shard or split
        with another count of rows than the manifest says, a label beyond the classes."""
        if self.nulls:
            return [f"{INDEX} has empty values in column(s) {', '.join(self.nulls)}"]
        listed = {
            (s, shard.path): shard for s, info in manifest.splits.items() for shard in info.shards
        }
        problems: list[str] = []
        rows_of_pair = self._pair_rows()
        capacity = np.zeros(len(self.split), np.int64)  # rows of each pair's shard
        groups = np.zeros(len(self.split), np.int64)
        known = np.zeros(len(self.split), bool)
        counted: dict[tuple[str, str], int] = {}
        for k, (split, shard, rows) in enumerate(
            zip(self.split, self.shard, rows_of_pair, strict=True)
        ):
            info = listed.get((split, shard))
            first = repr(str(self.sample_id[rows[0]]))
            if split not in manifest.splits:
                problems.append(
                    _first(
                        f"sample {first} is in split {split!r}, which the manifest does not have",
                        len(rows),
                    )
                )
            elif info is None:
                outside = _outside(root, shard) if shard else "is empty"
                where = f", and {outside}" if outside else ""
                problems.append(
                    _first(
                        f"split {split}: sample {first} points to {shard!r}, not a shard the "
                        f"manifest lists for this split{where}",
                        len(rows),
                    )
                )
            else:
                capacity[k], groups[k], known[k] = info.rows, info.row_groups, True
                counted[(split, shard)] = len(rows)
        group, row = self.row_group, self.row
        address = group * ROW_GROUP_SIZE + row
        beyond = known[self.pair] & (
            (group < 0)
            | (group >= groups[self.pair])
            | (row < 0)
            | (row >= ROW_GROUP_SIZE)
            | (address >= capacity[self.pair])
        )
        for count, i in _worst(beyond):
            k = int(self.pair[i])
            problems.append(
                _first(
                    f"split {self.split[k]}: sample {str(self.sample_id[i])!r} is at row "
                    f"{int(row[i])} of row group {int(group[i])} of {self.shard[k]}, which "
                    f"has {int(capacity[k])} rows in {int(groups[k])} row groups",
                    count,
                )
            )
        placed = known[self.pair] & ~beyond
        where = self.pair[placed] * (int(capacity.max(initial=0)) + 1) + address[placed]
        values, counts = np.unique(where, return_counts=True)
        if (counts > 1).any():
            at = np.flatnonzero(placed)
            twice = np.flatnonzero(where == values[np.argmax(counts > 1)])
            i, j = at[twice[0]], at[twice[1]]
            k = int(self.pair[i])
            problems.append(
                _first(
                    f"split {self.split[k]}: samples {str(self.sample_id[i])!r} and "
                    f"{str(self.sample_id[j])!r} both point to row {int(row[i])} of row group "
                    f"{int(group[i])} of {self.shard[k]}",
                    int((counts > 1).sum()),
                )
            )
        for (split, path), shard in listed.items():
            found = counted.get((split, path), 0)
            if found != shard.rows:
                problems.append(
                    f"split {split}: {INDEX} lists {found} samples in {path}, which holds "
                    f"{shard.rows}"
                )
        per_pair = np.bincount(self.pair, minlength=len(self.split))
        for split, info in manifest.splits.items():
            found = int(sum(n for s, n in zip(self.split, per_pair, strict=True) if s == split))
            if found != info.samples:
                problems.append(
                    f"split {split}: {INDEX} lists {found} samples, the manifest says "
                    f"{info.samples}"
                )
        classes = len(manifest.classes)
        wrong = (self.label < 0) | (self.label >= classes)
        for count, i in _worst(wrong):
            problems.append(
                _first(
                    f"split {self.split[int(self.pair[i])]}: sample {str(self.sample_id[i])!r} "
                    f"has label {int(self.label[i])}, but the data set has {classes} classes "
                    f"(labels 0..{classes - 1})",
                    count,
                )
            )
        return problems

    def against_shards(self, root: Path) -> list[str]:
        """Rows whose sample id or label differs from the row of the shard they point to
        (every shard read whole, its sample_id and label columns only); call it once
        `problems` found nothing."""
        problems: list[str] = []
        for k, rows in enumerate(self._pair_rows()):
            try:
                table = pq.read_table(root / self.shard[k], columns=["sample_id", "label"])
            except (pa.ArrowInvalid, OSError) as exc:
                problems.append(f"{self.shard[k]} is not a readable Parquet file ({exc})")
                continue
            ids = table.column("sample_id").to_numpy(zero_copy_only=False)
            labels = table.column("label").to_numpy()
            at = self.row_group[rows] * ROW_GROUP_SIZE + self.row[rows]
            differ = (ids[at] != self.sample_id[rows]) | (labels[at] != self.label[rows])
            if differ.any():
                j = int(np.argmax(differ))
                i = int(rows[j])
                what = row_mismatch(
                    self.split[k],
                    str(self.sample_id[i]),
                    int(self.label[i]),
                    self.shard[k],
                    int(self.row_group[i]),
                    int(self.row[i]),
                    (str(ids[at[j]]), int(labels[at[j]])),
                )
                problems.append(_first(what, int(differ.sum())))
        if len(problems) > 3:
            problems[3:] = [f"{len(problems) - 3} more shards disagree with {INDEX}"]
        return problems


def _worst(mask: np.ndarray) -> list[tuple[int, int]]:
    """[(how many rows are flagged, the first of them)], or [] when none is."""
    flagged = np.flatnonzero(mask)
    return [(len(flagged), int(flagged[0]))] if len(flagged) else []


def _schema_problem(path: Path, expected: pa.Schema, name: str | None = None) -> str | None:
    """What differs between the Parquet schema of `path` and `expected` (None: nothing)."""
    name = name or path.name
    if not path.is_file():
        return f"{name} is missing"
    try:
        found = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as exc:
        return f"{name} is not a readable Parquet file ({exc})"
    got = {f.name: f for f in found}
    want = {f.name: f for f in expected}
    differences = [f"no column {n!r}" for n in want if n not in got]
    differences += [f"unexpected column {n!r}" for n in got if n not in want]
    for n, column in want.items():
        if n in got and _column_key(got[n]) != _column_key(column):
            differences.append(
                f"column {n!r} is {got[n].type} {_meta(got[n])}, expected {column.type} "
                f"{_meta(column)}"
            )
    if not differences and found.names != expected.names:
        differences.append(f"columns in the order {found.names}, expected {expected.names}")
    if not differences:
        return None
    return f"{name} does not have the schema the manifest implies ({'; '.join(differences)})"


def _column_key(column: pa.Field) -> tuple:
    """What must match in a column: type, nullability, metadata (not Parquet's list naming)."""
    return _plain_type(column.type), column.nullable, column.metadata or {}


def _plain_type(kind: pa.DataType) -> pa.DataType:
    """A list type with its element field named as pyarrow names it (Parquet says element)."""
    if pa.types.is_list(kind):
        return pa.list_(_plain_type(kind.value_type))
    if pa.types.is_large_list(kind):
        return pa.large_list(_plain_type(kind.value_type))
    return kind


def _meta(column: pa.Field) -> str:
    meta = {k.decode(): v.decode() for k, v in (column.metadata or {}).items()}
    return f"{meta or ''}{'' if column.nullable else ' not null'}".strip()


def _stamps(root: Path) -> dict[str, list]:
    """What VERIFIED says was last found intact ({} when absent or unreadable)."""
    try:
        known = json.loads((root / VERIFIED).read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return {}
    return known if isinstance(known, dict) else {}


def _verify_checksums(
    root: Path, shards: Sequence[ShardInfo], known: Mapping[str, list]
) -> tuple[dict[str, list], list[str]]:
    """The stamps (size, mtime, sha256) of the shards that match their sha256 in the manifest
    (those `known` with the same stamp are trusted), and problems for those that do not."""
    problems: list[str] = []
    stamps: dict[str, list] = {}
    for shard in shards:
        path = root / shard.path
        stat = path.stat()
        stamp = [stat.st_size, stat.st_mtime_ns, shard.sha256]
        if known.get(shard.path) != stamp and sha256_file(path) != shard.sha256:
            problems.append(f"{shard.path} does not match its sha256 in the manifest")
            continue
        stamps[shard.path] = stamp
    return stamps, problems


def _index_stamp(root: Path, shard_stamps: Mapping[str, list]) -> list:
    """The index's (size, mtime) and a digest of the shards' stamps: the index was last found
    to agree with the shards row by row under this stamp."""
    stat = (root / INDEX).stat()
    return [stat.st_size, stat.st_mtime_ns, sha256_json(dict(shard_stamps))]


def decode_tensor_column(column: pa.ChunkedArray | pa.Array, spec: ModalitySpec) -> np.ndarray:
    """Turn a binary column of fixed-size raw tensors into one [rows, *shape] array, zero-copy."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not pa.types.is_large_binary(array.type):
        array = array.cast(pa.large_binary())
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int64)[
        array.offset : array.offset + len(array) + 1
    ]
    sizes = np.diff(offsets)
    if len(array) and (sizes.min() != spec.item_bytes or sizes.max() != spec.item_bytes):
        raise UserError(
            f"column {spec.name!r} holds values of {int(sizes.min())}..{int(sizes.max())} bytes, "
            f"expected {spec.item_bytes} ({spec.dtype} {spec.shape}): the shard is corrupt."
        )
    data = np.frombuffer(array.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    return data.view(np.dtype(spec.dtype).newbyteorder("<")).reshape(len(array), *spec.shape)


def read_ground_truth(root: Path, split: str, manifest: DataManifest) -> dict[str, np.ndarray]:
    """Every ground-truth column of one split as [N, *shape] arrays, row i belonging to item i
    of `ParquetSamples(root, split, ...)` (the split's rows in index.parquet order)."""
    if split not in manifest.splits:
        known = ", ".join(manifest.splits)
        raise UserError(f"data set {manifest.dataset!r} has no split {split!r} ({known}).")
    index = pq.read_table(
        Path(root) / INDEX, columns=["shard", "row_group", "row"], filters=[("split", "=", split)]
    )
    shards = np.asarray(index.column("shard").to_pylist(), dtype=object)
    rows = (
        index.column("row_group").to_numpy().astype(np.int64) * ROW_GROUP_SIZE
        + index.column("row").to_numpy()
    )
    out = {
        spec.name: np.empty((len(rows), *spec.shape), np.dtype(spec.dtype))
        for spec in manifest.ground_truth
    }
    for shard in dict.fromkeys(shards.tolist()):
        where = np.flatnonzero(shards == shard)
        table = pq.read_table(Path(root) / shard, columns=list(out))
        for spec in manifest.ground_truth:
            out[spec.name][where] = decode_tensor_column(table.column(spec.name), spec)[rows[where]]
    return out


def read_sources(root: Path, split: str, sample_ids: Sequence[str]) -> list[str]:
    """Where each of `sample_ids` (of one split) came from: the shards' `source` column (the
    input file, or the row of a table, that prep made the sample of), read through the index
    from only the shards that hold them."""
    index = pq.read_table(
        Path(root) / INDEX,
        columns=["sample_id", "shard", "row_group", "row"],
        filters=[("split", "=", split)],
    ).to_pandas()
    located = index.set_index("sample_id").reindex(list(sample_ids))
    missing = located.index[located["shard"].isna()].tolist()
    if missing:
        raise UserError(
            f"{root}: split {split!r} has no sample {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; is this the data the table was computed on?"
        )
    rows = located["row_group"].to_numpy(np.int64) * ROW_GROUP_SIZE + located["row"].to_numpy(
        np.int64
    )
    shards = located["shard"].to_numpy(dtype=object)
    sources = np.empty(len(rows), dtype=object)
    for shard in dict.fromkeys(shards.tolist()):
        where = np.flatnonzero(shards == shard)
        column = pq.read_table(Path(root) / shard, columns=["source"]).column("source")
        sources[where] = np.asarray(column.to_pylist(), dtype=object)[rows[where]]
    return sources.tolist()
