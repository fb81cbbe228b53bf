"""Map-style access to shards by row group, and a resumable block-shuffle sampler.

Balancing methods need sample identity (valuation tables, re-sampling), so samples are addressed
by position in their split; reads go through whole row groups kept in a small LRU cache, and
`__getitems__` lets the DataLoader fetch a whole batch with one read per row group.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from mmval.data.augment import FrameAugment
from mmval.data.extract.video import decode_jpeg, segment_indices
from mmval.data.shards import (
    INDEX,
    TARGET,
    DataManifest,
    ModalitySpec,
    check_data_dir,
    corrupt_data,
    decode_tensor_column,
    is_float_raw,
    row_mismatch,
)
from mmval.errors import UserError


def random_resized_crop(
    frame: np.ndarray, augment: FrameAugment, rng: np.random.Generator
) -> np.ndarray:
    """torchvision's RandomResizedCrop.get_params (10 tries, then a central crop of the
    clamped ratio) with our generator, bilinear antialiased resize back, then the flip.

    The rounded resize is flipped while still channel-first and written to a fresh HWC array
    in one copy: numpy's copy of a mirrored or channel-first view into the batch cost about as
    much as the resize itself (bench/loader_scale.py), for the same bytes."""
    height, width = frame.shape[:2]
    area = height * width
    log_ratio = np.log(augment.crop_ratio)
    box = None
    for _ in range(10):
        target = area * rng.uniform(*augment.crop_scale)
        ratio = float(np.exp(rng.uniform(*log_ratio)))
        w, h = round(np.sqrt(target * ratio)), round(np.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            box = (int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w)
            break
    if box is None:
        ratio = width / height
        w, h = (
            (width, round(width / min(augment.crop_ratio)))
            if ratio < min(augment.crop_ratio)
            else (round(height * max(augment.crop_ratio)), height)
            if ratio > max(augment.crop_ratio)
            else (width, height)
        )
        box = ((height - h) // 2, (width - w) // 2, h, w)
    top, left, h, w = box
    patch = torch.from_numpy(np.ascontiguousarray(frame[top : top + h, left : left + w]))
    resized = F.interpolate(
        patch.permute(2, 0, 1)[None].float(),
        size=(height, width),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    )[0]
    resized = resized.round_().clamp_(0, 255)  # whole numbers in range: the uint8 copy is exact
    if rng.random() < augment.hflip:
        resized = resized.flip(-1)
    out = torch.empty((height, width, frame.shape[2]), dtype=torch.uint8)
    out.permute(2, 0, 1).copy_(resized)
    return out.numpy()


# Training-time corruption of a batch's inputs (`data.corrupt`, built by
# `mmval.data.corrupt.training_corruptor`): (inputs, positions, epoch, dataset) -> inputs
CorruptBatch = Callable[
    [dict[str, torch.Tensor], torch.Tensor, int, "ParquetSamples"], dict[str, torch.Tensor]
]


@dataclass
class Batch:
    """A collated batch: inputs by modality name, labels, positions within the split, and the
    tag a re-sampling method gave each entry (`TaggedPositions`; 0, the default, is a plain
    sample). `to` moves the tags with the labels; the positions stay on the CPU."""

    inputs: dict[str, torch.Tensor]
    label: torch.Tensor
    index: torch.Tensor
    tag: torch.Tensor | None = None  # [B] int64; None is filled with zeros
    # [B, *target shape] of a regression, localisation or segmentation data set (None: the
    # label is the target); moved with the label
    target: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.tag is None:
            self.tag = torch.zeros(len(self.label), dtype=torch.int64, device=self.label.device)

    def to(self, device: torch.device) -> Batch:
        non_blocking = device.type == "cuda"
        return Batch(
            inputs={m: x.to(device, non_blocking=non_blocking) for m, x in self.inputs.items()},
            label=self.label.to(device, non_blocking=non_blocking),
            index=self.index,
            tag=None if self.tag is None else self.tag.to(device, non_blocking=non_blocking),
            target=None
            if self.target is None
            else self.target.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> Batch:
        """Page-locked copies, which the DataLoader's pin_memory=True asks for (a batch that is
        not a tensor, tuple or mapping is pinned only through this method), so that `to` can
        copy to the GPU asynchronously."""
        return Batch(
            inputs={m: x.pin_memory() for m, x in self.inputs.items()},
            label=self.label.pin_memory(),
            index=self.index,
            tag=None if self.tag is None else self.tag.pin_memory(),
            target=None if self.target is None else self.target.pin_memory(),
        )

    def __len__(self) -> int:
        return int(self.label.shape[0])


@dataclass(frozen=True)
class TaggedPositions:
    """One epoch's train-split positions (repeats allowed), each with an integer tag that its
    batch carries in `Batch.tag`: 0 is a plain sample, other values mean what the method that
    built them says (e.g. which modality a re-sampled copy keeps). Between the sampler and the
    dataset an entry travels as the single int `tag * n_rows + position`, so a DataLoader, its
    workers and the sampler's resume state need nothing new."""

    positions: np.ndarray
    tags: np.ndarray

    def __post_init__(self) -> None:
        if self.positions.shape != self.tags.shape or self.positions.ndim != 1:
            raise ValueError("positions and tags must be 1-d arrays of the same length")
        if len(self.tags) and self.tags.min() < 0:
            raise ValueError("tags must be >= 0")

    def codes(self, n_rows: int) -> np.ndarray:
        return self.tags.astype(np.int64) * n_rows + self.positions.astype(np.int64)


def decode_entries(codes: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions, tags) of sampler entries; plain positions (< n_rows) decode to tag 0."""
    tags, positions = np.divmod(np.asarray(codes, dtype=np.int64), n_rows)
    return positions, tags


class ParquetSamples(Dataset):
    """Samples of one split, or of several read as one (the published protocol trains on train
    and val); item i is the i-th of their rows in `index.parquet` order."""

    def __init__(
        self,
        root: Path,
        split: str | Sequence[str],
        modalities: Sequence[str],
        *,
        manifest: DataManifest | None = None,
        cache_row_groups: int = 8,
        train: bool = False,
        seed: int = 0,
        augment: FrameAugment | None = None,
        corrupt: CorruptBatch | None = None,
    ) -> None:
        self.root = Path(root)
        self.manifest = manifest or check_data_dir(self.root)
        self.splits = (split,) if isinstance(split, str) else tuple(split)
        for name in self.splits:
            if name not in self.manifest.splits:
                known = ", ".join(self.manifest.splits)
                raise UserError(
                    f"data set {self.manifest.dataset!r} has no split {name!r} ({known})."
                )
        self.split = "+".join(self.splits)  # for messages
        self.specs = [self.manifest.modality(m) for m in modalities]
        self.target_spec = self.manifest.target
        index = pq.read_table(
            self.root / INDEX, filters=[("split", "in", list(self.splits))]
        ).to_pandas()
        self.shard_paths: list[str] = sorted(index["shard"].unique())
        shard_no = {path: i for i, path in enumerate(self.shard_paths)}
        self.sample_ids: list[str] = index["sample_id"].tolist()
        self.labels = index["label"].to_numpy(np.int64)
        self.shard_of = index["shard"].map(shard_no).to_numpy(np.int64)
        self.row_group_of = index["row_group"].to_numpy(np.int64)
        self.row_of = index["row"].to_numpy(np.int64)
        # what the first read of each row group checks against the shard (`_check_block`)
        self._ids = np.asarray(self.sample_ids, dtype=object)
        blocks = self.block_ids()
        self._by_block = np.argsort(blocks, kind="stable")
        self._block_of = blocks[self._by_block]
        split_of = {
            s.path: name for name, info in self.manifest.splits.items() for s in info.shards
        }
        self._split_of = [split_of.get(path, "?") for path in self.shard_paths]
        self._checked: set[tuple[int, int]] = set()
        self.cache_row_groups = cache_row_groups
        self.train, self.seed = train, seed
        # in shared memory, so that persistent DataLoader workers see set_epoch
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.augment = augment if train else None
        self.corrupt = corrupt if train else None
        self._files: dict[int, pq.ParquetFile] = {}
        self._cache: OrderedDict[tuple[int, int], dict[str, Any]] = OrderedDict()
        self._text_cache: OrderedDict[tuple[int, int, str], list[str]] = OrderedDict()

    def set_epoch(self, epoch: int) -> None:
        """Frame picks in training mode depend on (seed, epoch, sample): resumable, and the
        same whichever worker loads the sample."""
        self._epoch.fill_(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def block_ids(self) -> np.ndarray:
        """One id per sample naming its (shard, row group): the unit the sampler shuffles."""
        return self.shard_of * (int(self.row_group_of.max(initial=0)) + 1) + self.row_group_of

    def __getstate__(self) -> dict:
        # Workers reopen files lazily: open handles and memory maps do not cross processes.
        state = self.__dict__.copy()
        state["_files"], state["_cache"], state["_text_cache"] = {}, OrderedDict(), OrderedDict()
        return state

    def _file(self, shard: int) -> pq.ParquetFile:
        if shard not in self._files:
            self._files[shard] = pq.ParquetFile(
                self.root / self.shard_paths[shard], memory_map=True
            )
        return self._files[shard]

    def _row_group(self, shard: int, row_group: int) -> dict[str, np.ndarray]:
        key = (shard, row_group)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        first = key not in self._checked
        specs = self.specs + ([self.target_spec] if self.target_spec is not None else [])
        columns = [s.name for s in specs] + (["sample_id", "label"] if first else [])
        table = self._file(shard).read_row_group(row_group, columns=columns)
        decoded = {
            s.name: decode_tensor_column(table.column(s.name), s)
            if s.encoding == "raw"
            else table.column(s.name).to_pylist()
            for s in specs
        }
        if first:
            self._check_block(shard, row_group, table, decoded)
            self._checked.add(key)
        self._cache[key] = decoded
        if len(self._cache) > self.cache_row_groups:
            self._cache.popitem(last=False)
        return decoded

    def _check_block(self, shard: int, row_group: int, table: Any, decoded: dict[str, Any]) -> None:
        """On the first read of a row group (once per process), what the index says of the
        rows it points to there against the rows themselves: each row exists and holds the
        sample id and label the index gives. And every float value of the block is finite:
        data prepared before prep refused NaN and Inf may hold them. Raises a UserError naming
        the data folder, the split, the sample and what disagrees."""
        code = shard * (int(self.row_group_of.max(initial=0)) + 1) + row_group
        lo, hi = np.searchsorted(self._block_of, [code, code + 1])
        positions = self._by_block[lo:hi]
        rows = self.row_of[positions]
        ids = table.column("sample_id").to_numpy(zero_copy_only=False)
        labels = table.column("label").to_numpy()
        path, split = self.shard_paths[shard], self._split_of[shard]
        beyond = (rows < 0) | (rows >= len(ids))
        if beyond.any():
            i = int(positions[np.argmax(beyond)])
            raise corrupt_data(
                self.root,
                [
                    f"split {split}: sample {self.sample_ids[i]!r} is at row {int(self.row_of[i])} "
                    f"of row group {row_group} of {path}, which has {len(ids)} rows there"
                ],
            )
        differ = (ids[rows] != self._ids[positions]) | (labels[rows] != self.labels[positions])
        if differ.any():
            j = int(np.argmax(differ))
            i, row = int(positions[j]), int(rows[j])
            what = row_mismatch(
                split,
                self.sample_ids[i],
                int(self.labels[i]),
                path,
                row_group,
                row,
                (str(ids[row]), int(labels[row])),
            )
            more = int(differ.sum()) - 1
            raise corrupt_data(self.root, [what + (f" (and {more} more)" if more else "")])
        for spec in self.specs:
            values = decoded[spec.name]
            if not is_float_raw(spec) or np.isfinite(values).all():
                continue
            row = int(np.flatnonzero(~np.isfinite(values.reshape(len(values), -1)).all(1))[0])
            raise UserError(
                f"data directory {self.root}: sample {str(ids[row])!r} (split {split}, row "
                f"{row} of row group {row_group} of {path}) holds NaN or Inf in modality "
                f"{spec.name!r}; a model cannot learn from or be judged on it. The folder was "
                "prepared before prep refused such values: fix the input, or run `mmval prep` "
                "again with --overwrite (the sample then goes to errors.parquet)."
            )

    def __getitems__(self, entries: Sequence[int]) -> Batch:
        """A batch of positions, or of sampler entries `tag * len(self) + position`. Random
        frame picks are seeded by the entry, so a tagged copy draws its own."""
        codes = np.asarray(entries, dtype=np.int64)
        positions, tags = decode_entries(codes, len(self))
        out = {s.name: np.empty((len(positions), *s.shape), np.dtype(s.dtype)) for s in self.specs}
        kept = self.target_spec
        target = None if kept is None else np.empty((len(positions), *kept.shape), kept.dtype)
        shards, groups, rows = (
            self.shard_of[positions],
            self.row_group_of[positions],
            self.row_of[positions],
        )
        for shard, group in dict.fromkeys(zip(shards.tolist(), groups.tolist(), strict=True)):
            where = np.flatnonzero((shards == shard) & (groups == group))
            block = self._row_group(shard, group)
            if target is not None:
                target[where] = block[TARGET][rows[where]]
            for spec in self.specs:
                values = block[spec.name]
                if spec.encoding == "raw":
                    out[spec.name][where] = values[rows[where]]
                    continue
                if spec.encoding == "tokens":
                    for at, row in zip(where.tolist(), rows[where].tolist(), strict=True):
                        ids = values[row][: spec.shape[0]]
                        out[spec.name][at, : len(ids)] = ids
                        out[spec.name][at, len(ids) :] = spec.pad_id
                    continue
                for at, row in zip(where.tolist(), rows[where].tolist(), strict=True):
                    rng = np.random.default_rng([self.seed, self.epoch, int(codes[at])])
                    out[spec.name][at] = self._frames(spec, values[row], rng)
        inputs = {name: torch.from_numpy(values) for name, values in out.items()}
        if self.corrupt is not None:
            inputs = self.corrupt(inputs, torch.from_numpy(positions), self.epoch, self)
        return Batch(
            inputs=inputs,
            label=torch.from_numpy(self.labels[positions]),
            index=torch.from_numpy(positions),
            tag=torch.from_numpy(tags),
            target=None
            if target is None or kept is None
            else torch.from_numpy(target.astype(_widened(kept))),
        )

    def __getitem__(self, position: int) -> Batch:
        return self.__getitems__([position])

    def texts(self, modality: str, positions: Sequence[int]) -> list[str]:
        """The cleaned text a token modality's ids were made from (column `<modality>_text`),
        for corruptions that edit words and encode again (`mmval value --corrupt
        text=blank:L`). Read by row group, as the inputs, and cached apart from them."""
        column = f"{modality}_text"
        positions = np.asarray(positions, dtype=np.int64)
        shards, groups, rows = (
            self.shard_of[positions],
            self.row_group_of[positions],
            self.row_of[positions],
        )
        out = [""] * len(positions)
        for shard, group in dict.fromkeys(zip(shards.tolist(), groups.tolist(), strict=True)):
            key = (shard, group, column)
            if key in self._text_cache:
                self._text_cache.move_to_end(key)
            else:
                file = self._file(shard)
                if column not in file.schema_arrow.names:
                    raise UserError(
                        f"{self.root / self.shard_paths[shard]} has no column {column!r}: the "
                        f"text of {modality!r} was not stored beside its token ids; prepare "
                        "the data again with this mmval version."
                    )
                table = file.read_row_group(group, columns=[column])
                self._text_cache[key] = table.column(column).to_pylist()
                if len(self._text_cache) > self.cache_row_groups:
                    self._text_cache.popitem(last=False)
            values = self._text_cache[key]
            for at in np.flatnonzero((shards == shard) & (groups == group)).tolist():
                out[at] = values[int(rows[at])]
        return out

    def _frames(
        self, spec: ModalitySpec, stored: list[bytes], rng: np.random.Generator
    ) -> np.ndarray:
        """Pick K stored frames (or u/v pairs) by segments, as the reference loaders do: at
        random within each segment when training, at its middle otherwise, then decode."""
        k = spec.shape[0]
        if spec.encoding == "jpeg":
            picks = segment_indices(len(stored), k, train=self.train, rng=rng)
            frames = decode_jpeg([stored[i] for i in picks])
            if self.augment is None or frames.shape[-1] != 3:
                return frames
            return np.stack([random_resized_crop(f, self.augment, rng) for f in frames])
        picks = segment_indices(len(stored) // 2, k, train=self.train, rng=rng)
        planes = decode_jpeg([stored[j] for i in picks for j in (2 * i, 2 * i + 1)])
        return planes.reshape(k, 2, *planes.shape[1:3]).transpose(0, 2, 3, 1)


def _widened(spec: ModalitySpec) -> np.dtype:
    """The dtype a target is trained with: class indices as int64 (what cross-entropy takes),
    scores as float32."""
    return np.dtype(np.float32 if np.dtype(spec.dtype).kind == "f" else np.int64)


def collate_batch(batch: Batch) -> Batch:
    """`__getitems__` already collates; the DataLoader only has to pass the batch through."""
    return batch


class BlockShuffleSampler(Sampler[int]):
    """Seeded block shuffle with exact resume and disjoint per-rank slices.

    Each epoch, `rng([seed, epoch])` permutes the row-group blocks and shuffles samples within
    windows of `window` blocks, so a batch touches few row groups. The order is padded by
    wrap-around to a multiple of `num_replicas` and cut into global batches of
    `num_replicas * batch_size` entries (the last one shorter); rank r takes the r-th of the
    `num_replicas` equal parts of each, so that the ranks' batches together are the global
    batches of a single process that reads the padded order with the global batch size.
    `positions` may repeat or omit samples (re-sampling methods); by default every sample once.
    With `TaggedPositions` each (position, tag) pair moves as one entry and is yielded encoded
    (`TaggedPositions.codes`); blocks, windows and ranks are those of the positions alone.
    """

    def __init__(
        self,
        block_ids: np.ndarray,
        *,
        seed: int,
        shuffle: bool = True,
        window: int = 8,
        num_replicas: int = 1,
        rank: int = 0,
        batch_size: int = 1,
    ) -> None:
        self.block_ids = np.asarray(block_ids)
        self.seed, self.shuffle, self.window = seed, shuffle, window
        self.num_replicas, self.rank, self.batch_size = num_replicas, rank, batch_size
        self.positions = np.arange(len(self.block_ids))
        self.entries = self.positions  # what is yielded: positions, or tagged codes
        self.epoch = 0
        self.consumed = 0

    def set_positions(self, positions: np.ndarray | TaggedPositions | None) -> None:
        """This epoch's positions (None: every sample once), optionally tagged."""
        if isinstance(positions, TaggedPositions):
            self.positions = positions.positions
            self.entries = positions.codes(len(self.block_ids))
        else:
            self.positions = np.arange(len(self.block_ids)) if positions is None else positions
            self.entries = self.positions

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def epoch_order(self) -> np.ndarray:
        """The whole epoch's order for this rank (before skipping consumed samples)."""
        order = self.entries
        if self.shuffle and len(order):
            rng = np.random.default_rng([self.seed, self.epoch])
            unique_blocks, block_of = np.unique(self.block_ids[self.positions], return_inverse=True)
            block_rank = np.empty(len(unique_blocks), np.int64)
            block_rank[rng.permutation(len(unique_blocks))] = np.arange(len(unique_blocks))
            window_of = block_rank[block_of] // self.window
            order = order[np.lexsort((rng.random(len(order)), window_of))]
        replicas = self.num_replicas
        if replicas == 1:
            return order
        padded = np.resize(order, self._per_rank() * replicas) if len(order) else order
        full = len(padded) // (replicas * self.batch_size) * replicas * self.batch_size
        head = padded[:full].reshape(-1, replicas, self.batch_size)[:, self.rank].ravel()
        return np.concatenate([head, padded[full:].reshape(replicas, -1)[self.rank]])

    def _per_rank(self) -> int:
        return -(-len(self.positions) // self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_order()[self.consumed :].tolist())

    def __len__(self) -> int:
        return max(self._per_rank() - self.consumed, 0)

    def advance(self, n: int) -> None:
        self.consumed += n

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.epoch, self.consumed = state["seed"], state["epoch"], state["consumed"]
