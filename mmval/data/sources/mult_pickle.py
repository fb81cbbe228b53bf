"""CMU-MOSEI / CMU-MOSI features as the MulT code base distributes them (one pickle per variant).

A pickle holds `{train, valid, test} -> {text, audio, vision: [N, T, D], labels: [N, 1, 1],
id}` with sentiment scores in [-3, 3] as labels. The reading follows BalanceBenchmark's
`balancemm/datasets/Mosei_dataset.py` (itself MulT's `src/dataset.py`): features cast to float32,
audio -inf set to 0, label `< 0 -> 0 else 1` (score 0 counts as positive and is kept).

Pickles can run code when loaded, so they go through `SafeUnpickler`, which resolves only the
globals numpy arrays and plain containers need and refuses any other.
"""

from __future__ import annotations

import builtins
import codecs
import importlib
import pickle
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from mmval.data.manifest import DatasetManifest
from mmval.data.shards import TARGET, ModalitySpec, SplitSamples
from mmval.data.sources.base import BuiltData
from mmval.errors import UserError

LABEL_CLASSES = {
    # label 0: score < 0; label 1: score >= 0 (BalanceMM acc2)
    "binary": ["negative", "positive"],
    # MulT's 7-class accuracy: round(clip(score, -3, 3)), shifted to 0..6
    "seven": ["-3", "-2", "-1", "0", "1", "2", "3"],
    # the regression task (MulT, MMSA): the score itself is the target, the class the binary
    # rule's (for stratification and class-balanced sampling)
    "score": ["negative", "positive"],
}


class MultPickleParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    variant: Literal["aligned", "unaligned"] = Field(
        default="unaligned", description="which pickle of manifest raw.files to read"
    )
    labels: Literal["binary", "seven", "score"] = Field(
        default="binary",
        description="binary or seven: classification of the score; score: regression on it "
        "(the target), with the binary class as label",
    )
    seq_len: dict[str, PositiveInt] = Field(
        default_factory=dict,
        description="steps to keep per modality (zero-padded or cropped); absent: as stored",
    )
    pad: Literal["start", "end"] = Field(
        default="start",
        description="side that gets the zeros when padding and is cut when cropping",
    )
    dtype: Literal["float32", "float16"] = "float32"


class MultPickleRaw(BaseModel):
    """The manifest's `raw` section: file names and the keys inside the pickle."""

    model_config = ConfigDict(extra="forbid")
    files: dict[Literal["aligned", "unaligned"], str]
    splits: dict[str, str] = Field(description="mmval split -> pickle split key")
    keys: dict[str, str] = Field(description="modality -> pickle key")
    dims: dict[str, int] = Field(description="modality -> feature size, checked on load")
    labels: str = "labels"
    id: str = "id"


def _core_module(name: str) -> Any:
    """numpy's core submodule under its numpy 2 name, else its numpy 1 name."""
    for base in ("numpy._core", "numpy.core"):
        try:
            return importlib.import_module(f"{base}.{name}")
        except ImportError:
            continue
    raise ImportError(f"numpy has no core module {name}")


# Everything a pickle of numpy arrays inside dicts/lists can ask for. numpy 1.x writes
# numpy.core.*, numpy 2 numpy._core.*: both names resolve to the installed numpy's function.
_CORE_GLOBALS = {
    ("multiarray", "_reconstruct"),  # ndarray.__reduce__
    ("multiarray", "scalar"),  # numpy scalars
    ("numeric", "_frombuffer"),  # ndarray.__reduce_ex__ with protocol 5
}
_NUMPY_GLOBALS = {"ndarray", "dtype"}
_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "bytearray", "complex"}


class SafeUnpickler(pickle.Unpickler):
    """Resolves only what numpy arrays and plain containers need, so loading cannot run code."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name in _BUILTINS:
            return getattr(builtins, name)
        if module == "numpy" and name in _NUMPY_GLOBALS:
            return getattr(np, name)
        if (module, name) == ("_codecs", "encode"):  # bytes in protocol 2
            return codecs.encode
        for prefix in ("numpy._core.", "numpy.core."):
            sub = module.removeprefix(prefix)
            if module.startswith(prefix) and (sub, name) in _CORE_GLOBALS:
                return getattr(_core_module(sub), name)
        raise UserError(
            f"mmval refuses to load {self.path}: it asks for the global {module}.{name}, which "
            "a pickle of numpy arrays never needs (loading it could run code). Use the file as "
            "distributed with the MulT code base."
        )


def load_pickle(path: Path) -> Any:
    with path.open("rb") as file:
        try:
            return SafeUnpickler(file, path).load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, LookupError) as exc:
            raise UserError(f"{path} cannot be read as a MulT pickle: {exc}") from None


def _raw_file(raw: Path, layout: MultPickleRaw, variant: str) -> Path:
    path = raw / layout.files[variant]
    if path.is_file():
        return path
    found = sorted(p.name for p in raw.iterdir())
    shown = ", ".join(found[:20]) + (f" and {len(found) - 20} more" if len(found) > 20 else "")
    other = {v: f for v, f in layout.files.items() if v != variant and (raw / f).is_file()}
    hint = "".join(f" {f} is there: pass --set variant={v}." for v, f in other.items())
    raise UserError(
        f"{raw} has no {layout.files[variant]} (the {variant} features); expected one of "
        f"{', '.join(layout.files.values())}, found: {shown or 'nothing'}.{hint}"
    )


def _entry(container: Any, key: str, where: str, path: Path) -> Any:
    if not isinstance(container, dict) or key not in container:
        keys = sorted(map(str, container)) if isinstance(container, dict) else []
        raise UserError(
            f"{path} is not a MulT pickle: {where} has no key {key!r} (keys: {keys or 'none'})."
        )
    return container[key]


def _fit_length(values: np.ndarray, length: int, pad: str) -> np.ndarray:
    """Crop or zero-pad axis 1 to `length` steps on the `pad` side."""
    stored = values.shape[1]
    if stored >= length:
        return values[:, stored - length :] if pad == "start" else values[:, :length]
    zeros = np.zeros((values.shape[0], length - stored, values.shape[2]), values.dtype)
    parts = (zeros, values) if pad == "start" else (values, zeros)
    return np.concatenate(parts, axis=1)


def _clean(values: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    """Non-finite values -> 0 (the reference zeroes audio -inf; nan/+inf elsewhere would
    poison training), with counts of what was replaced."""
    bad = np.isfinite(values)
    np.logical_not(bad, out=bad)  # one mask: MOSEI's audio alone is ~600 M values
    if not bad.any():
        return values, {}
    replaced = values[bad]
    counts = {
        "-inf": int(np.isneginf(replaced).sum()),
        "+inf": int(np.isposinf(replaced).sum()),
        "nan": int(np.isnan(replaced).sum()),
    }
    values[bad] = 0
    return values, {kind: n for kind, n in counts.items() if n}


def _labels(scores: np.ndarray, rule: str) -> np.ndarray:
    if rule in ("binary", "score"):
        return (scores >= 0).astype(np.int64)
    return (np.round(np.clip(scores, -3.0, 3.0)) + 3).astype(np.int64)


def _id_text(row: Any) -> str:
    parts = np.atleast_1d(np.asarray(row, dtype=object)).ravel()
    text = [p.decode("utf-8", "replace") if isinstance(p, bytes) else str(p) for p in parts]
    return "_".join(t.strip() for t in text if t.strip())


def _unique_ids(ids: list[str]) -> tuple[list[str], int]:
    """Ids as given where unique; a repeated id becomes `id[k]` for its k-th occurrence."""
    counts = Counter(ids)
    seen: Counter[str] = Counter()
    out = []
    for sample_id in ids:
        if counts[sample_id] > 1:
            out.append(f"{sample_id}[{seen[sample_id]}]")
            seen[sample_id] += 1
        else:
            out.append(sample_id)
    return out, sum(n for n in counts.values() if n > 1)


def _array(value: Any, where: str, path: Path) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise UserError(f"{path}: {where} is a {type(value).__name__}, not a numpy array.")
    return value


@dataclass
class _SplitRead:
    """One split after checks and cleaning, before ids are made unique across splits."""

    ids: list[str]
    labels: np.ndarray
    scores: np.ndarray
    arrays: dict[str, np.ndarray]


def _read_split(
    part: Any, key: str, layout: MultPickleRaw, params: MultPickleParams, path: Path
) -> tuple[_SplitRead, dict[str, dict[str, int]], dict[str, str]]:
    """Check one pickle split, cast, clean and fit its features; also the non-finite counts
    per modality and the stored dtype of each feature."""
    scores = _array(_entry(part, layout.labels, key, path), f"{key}/{layout.labels}", path)
    n = len(scores) if scores.ndim else 0
    if scores.size != n:
        raise UserError(
            f"{path}: {key}/{layout.labels} has shape {list(scores.shape)}; a sentiment score "
            "per sample ([N, 1, 1]) was expected."
        )
    scores = scores.reshape(n).astype(np.float64)
    if not np.isfinite(scores).all():
        raise UserError(f"{path}: {key}/{layout.labels} holds non-finite scores.")
    arrays: dict[str, np.ndarray] = {}
    cleaned: dict[str, dict[str, int]] = {}
    stored: dict[str, str] = {}
    for name, pickle_key in layout.keys.items():
        where = f"{key}/{pickle_key}"
        values = _array(_entry(part, pickle_key, key, path), where, path)
        del part[pickle_key]  # the stored copy is freed once cast
        if values.ndim != 3 or len(values) != n or values.shape[2] != layout.dims[name]:
            raise UserError(
                f"{path}: {where} has shape {list(values.shape)}; [{n}, steps, "
                f"{layout.dims[name]}] was expected ({n} labels in {key}/{layout.labels})."
            )
        stored[name] = str(values.dtype)
        values, counts = _clean(values.astype(np.float32, copy=False))
        if counts:
            cleaned[name] = counts
        if name in params.seq_len:
            values = _fit_length(values, params.seq_len[name], params.pad)
        if params.dtype == "float16":
            values = values.astype(np.float16)
            if not np.isfinite(values).all():
                raise UserError(f"{path}: {where} exceeds the float16 range; keep float32.")
        arrays[name] = values
    if layout.id in part:
        id_rows = np.asarray(part[layout.id], dtype=object)
        if len(id_rows) != n:
            raise UserError(f"{path}: {key}/{layout.id} has {len(id_rows)} rows, not {n}.")
        ids = [_id_text(row) or f"{key}-{i:06d}" for i, row in enumerate(id_rows)]
    else:  # the reference treats the ids as optional too
        ids = [f"{key}-{i:06d}" for i in range(n)]
    return _SplitRead(ids, _labels(scores, params.labels), scores, arrays), cleaned, stored


class MultPickleSource:
    name: ClassVar[str] = "mult_pickle"
    needs_raw: ClassVar[bool] = True
    Params: ClassVar[type[BaseModel]] = MultPickleParams

    def build(
        self, manifest: DatasetManifest, params: MultPickleParams, raw: Path | None
    ) -> BuiltData:
        assert raw is not None
        layout = MultPickleRaw.model_validate(manifest.raw)
        names = [entry.name for entry in manifest.modalities]
        if not set(names) == set(layout.keys) == set(layout.dims):
            raise ValueError(f"{manifest.name}: raw.keys and raw.dims must name {names}")
        unknown = sorted(set(params.seq_len) - set(names))
        if unknown:
            raise UserError(f"seq_len names {unknown}; {manifest.name} has modalities {names}.")
        path = _raw_file(Path(raw), layout, params.variant)
        data = load_pickle(path)
        reads: dict[str, _SplitRead] = {}
        extraction: dict[str, Any] = {"file": path.name, "stored_dtype": {}, "non_finite": {}}
        for split, key in layout.splits.items():
            part = _entry(data, key, "the top level", path)
            reads[split], cleaned, stored = _read_split(part, key, layout, params, path)
            extraction["stored_dtype"][split] = stored
            extraction["non_finite"][split] = cleaned  # counts, all set to 0
        del data
        shapes = {name: {r.arrays[name].shape[1:] for r in reads.values()} for name in names}
        mixed = {name: sorted(s) for name, s in shapes.items() if len(s) > 1}
        if mixed:
            raise UserError(
                f"{path}: the splits store different sequence lengths {mixed}; pick one with "
                "--set seq_len.<modality>=STEPS."
            )
        ids, repeated = _unique_ids([i for r in reads.values() for i in r.ids])
        splits: dict[str, SplitSamples] = {}
        regression = params.labels == "score"
        start = 0
        for split, read in reads.items():
            key, n = layout.splits[split], len(read.labels)
            splits[split] = SplitSamples(
                sample_ids=ids[start : start + n],
                labels=read.labels,
                sources=[f"{path.name}:{key}[{row}]" for row in range(n)],
                arrays=read.arrays
                | ({TARGET: read.scores[:, None].astype(np.float32)} if regression else {}),
            )
            start += n
        classes = LABEL_CLASSES[params.labels]
        extraction["repeated_ids"] = repeated
        extraction["label_counts"] = {
            split: np.bincount(s.labels, minlength=len(classes)).tolist()
            for split, s in splits.items()
        }
        modalities = [
            ModalitySpec(
                name=entry.name,
                dtype=params.dtype,
                shape=list(next(iter(shapes[entry.name]))),
                description=entry.description,
            )
            for entry in manifest.modalities
        ]
        if not regression:
            return BuiltData(classes, modalities, extraction, splits)
        target = ModalitySpec(
            name=TARGET, dtype="float32", shape=[1], description="sentiment score in [-3, 3]"
        )
        return BuiltData(classes, modalities, extraction, splits, task="regression", target=target)
