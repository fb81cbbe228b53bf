"""Shard format v1: Parquet shards of samples, a manifest that pins them, a global index.

Layout of a data directory (see docs/shard-format.md):
    manifest.json          what the shards hold and their checksums
    index.parquet          sample_id, split, label, shard, row_group, row
    errors.parquet         source, reason (inputs that produced no sample)
    <split>/part-NNNNN.parquet
Tensors are stored as raw little-endian bytes in binary columns with their dtype and shape in
the manifest (and the field metadata): Arrow tensor types and compression on media columns were
measured to be several times slower to read (../shared/specs/data.md, B.1).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from mmval.atomic import atomic_path, write_text_atomic
from mmval.errors import UserError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.parquet"
ERRORS = "errors.parquet"
ROWS_PER_SHARD = 1024
ROW_GROUP_SIZE = 64
SMALL_COLUMNS = ("sample_id", "split", "label", "source")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModalitySpec(_Strict):
    name: str
    dtype: Literal["float32", "float16", "uint8", "int16", "int32"]
    shape: list[int]
    encoding: Literal["raw"] = "raw"
    description: str = ""

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

    def modality(self, name: str) -> ModalitySpec:
        for spec in self.modalities:
            if spec.name == name:
                return spec
        known = ", ".join(m.name for m in self.modalities)
        raise UserError(f"data set {self.dataset!r} has no modality {name!r} (it has: {known}).")

    def fingerprint(self) -> str:
        """Identifies the exact shard content a checkpoint was trained on."""
        return sha256_text(self.model_dump_json())


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
    """All samples of one split, in memory: enough for vector and feature data sets."""

    sample_ids: list[str]
    labels: np.ndarray
    sources: list[str]
    arrays: dict[str, np.ndarray]  # modality -> [N, *shape]


def _tensor_column(values: np.ndarray, spec: ModalitySpec) -> pa.Array:
    flat = np.ascontiguousarray(values.astype(np.dtype(spec.dtype).newbyteorder("<"), copy=False))
    n = flat.shape[0]
    offsets = np.arange(n + 1, dtype=np.int64) * spec.item_bytes
    return pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(flat.tobytes())]
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
        fields.append(pa.field(spec.name, pa.large_binary(), nullable=False, metadata=meta))
    return pa.schema(fields)


def write_shard(
    root: Path, rel_path: str, table: pa.Table, modalities: Sequence[ModalitySpec]
) -> ShardInfo:
    """Write one shard atomically; media columns uncompressed, small columns zstd."""
    path = root / rel_path
    compression = {name: "zstd" for name in SMALL_COLUMNS}
    compression.update({spec.name: "none" for spec in modalities})
    with atomic_path(path) as tmp:
        pq.write_table(
            table,
            tmp,
            row_group_size=ROW_GROUP_SIZE,
            compression=compression,
            use_dictionary=["split"],
            write_statistics=["sample_id", "label"],
            data_page_size=1 << 20,
        )
    meta = pq.ParquetFile(path).metadata
    return ShardInfo(
        path=rel_path,
        rows=meta.num_rows,
        row_groups=meta.num_row_groups,
        bytes=path.stat().st_size,
        sha256=sha256_file(path),
    )


def write_dataset(
    out: Path,
    *,
    dataset: str,
    version: str,
    source_manifest_sha256: str,
    classes: Sequence[str],
    modalities: Sequence[ModalitySpec],
    extraction: Mapping,
    splits: Mapping[str, SplitSamples],
    errors: Sequence[tuple[str, str]] = (),
    shuffle_seed: int = 0,
) -> DataManifest:
    """Write every split as shards, then the index, the errors table and (last) the manifest.

    Rows are permuted with a fixed seed so that each row group mixes classes; the same input
    always gives the same bytes. The manifest is written last: its presence marks a complete set.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    schema = _schema(modalities)
    index_parts: list[pa.Table] = []
    split_infos: dict[str, SplitInfo] = {}
    for split_name, samples in splits.items():
        n = len(samples.sample_ids)
        order = np.random.default_rng([shuffle_seed, n]).permutation(n)
        shards: list[ShardInfo] = []
        for shard_no, start in enumerate(range(0, n, ROWS_PER_SHARD)):
            rows = order[start : start + ROWS_PER_SHARD]
            columns = [
                pa.array([samples.sample_ids[i] for i in rows], pa.string()),
                pa.DictionaryArray.from_arrays(
                    pa.array(np.zeros(len(rows), np.int8)), pa.array([split_name])
                ),
                pa.array(samples.labels[rows].astype(np.int32)),
                pa.array([samples.sources[i] for i in rows], pa.string()),
            ]
            columns += [_tensor_column(samples.arrays[s.name][rows], s) for s in modalities]
            rel = f"{split_name}/part-{shard_no:05d}.parquet"
            table = pa.Table.from_arrays(columns, schema=schema)
            shards.append(write_shard(out, rel, table, modalities))
            positions = np.arange(len(rows))
            index_parts.append(
                pa.table(
                    {
                        "sample_id": columns[0],
                        "split": pa.array([split_name] * len(rows)),
                        "label": columns[2],
                        "shard": pa.array([rel] * len(rows)),
                        "row_group": pa.array(positions // ROW_GROUP_SIZE, pa.int32()),
                        "row": pa.array(positions % ROW_GROUP_SIZE, pa.int32()),
                    }
                )
            )
        split_infos[split_name] = SplitInfo(samples=n, shards=shards)
    with atomic_path(out / INDEX) as tmp:
        pq.write_table(pa.concat_tables(index_parts), tmp, compression="zstd")
    error_schema = pa.schema([("source", pa.string()), ("reason", pa.string())])
    error_table = pa.Table.from_pylist(
        [{"source": source, "reason": reason} for source, reason in errors], schema=error_schema
    )
    with atomic_path(out / ERRORS) as tmp:
        pq.write_table(error_table, tmp)
    manifest = DataManifest(
        dataset=dataset,
        version=version,
        source_manifest_sha256=source_manifest_sha256,
        classes=list(classes),
        modalities=list(modalities),
        extraction=dict(extraction),
        extraction_sha256=sha256_json(dict(extraction)),
        splits=split_infos,
    )
    write_text_atomic(out / MANIFEST, manifest.model_dump_json(indent=2) + "\n")
    return manifest


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


def check_data_dir(root: Path, *, verify_checksums: bool = False) -> DataManifest:
    """Check the shards against the manifest; raise a UserError listing every problem found."""
    root = Path(root)
    manifest = load_manifest(root)
    problems: list[str] = []
    for path in (root / INDEX, root / ERRORS):
        if not path.is_file():
            problems.append(f"{path.name} is missing")
    for split_name, split in manifest.splits.items():
        for shard in split.shards:
            path = root / shard.path
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
            elif verify_checksums and sha256_file(path) != shard.sha256:
                problems.append(f"{shard.path} does not match its sha256 in the manifest")
    if problems:
        listing = "; ".join(problems)
        raise UserError(
            f"data directory {root} is incomplete or corrupt: {listing}. "
            "Re-run `mmval prep` with --overwrite to rebuild it."
        )
    return manifest


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
