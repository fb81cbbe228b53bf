"""A small fake raw folder in the layout of AVE's released features (YapengTian/AVE-ECCV18 @
93f843fed72fb17394df76330df958b0c2dbde76, data/): Annotations.txt, audio_feature.h5 [N, 10, D],
visual_feature.h5 [N, 10, G, G, C] (h5 dataset `avadataset`), {train,val,test}_order.h5 (dataset
`order`) and optionally labels.h5 [N, 10, classes + 1].

The signal is learnable per segment: an event segment's audio is its class's prototype plus
noise, its visual map holds the class's visual prototype at one random grid cell over noise;
background segments are noise only. With `defects`, a few rows must end in the errors table (a
NaN visual map, a labels.h5 row that disagrees, an annotated row past the feature files, an event
window past the 10 segments), one video id occurs on two rows and one event window is empty
(Start == End, all background), as in the real Annotations.txt. The writer returns what a correct
prep must produce.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

HEADER = "Category&VideoID&Quality&StartTime&EndTime"
CLASSES = ["Church bell", "Male speech, man speaking", "Bark", "Fixed-wing aircraft, airplane"]
SEGMENTS = 10
_ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@dataclass
class FakeAve:
    classes: list[str]  # events in order of first appearance, then "background"
    splits: dict[str, list[int]]  # split -> the rows a correct prep stores
    sample_ids: dict[int, str] = field(default_factory=dict)  # row -> sample id
    labels: dict[int, int] = field(default_factory=dict)  # row -> event class
    targets: dict[int, np.ndarray] = field(default_factory=dict)  # row -> [T] segment classes
    failures: dict[str, str] = field(default_factory=dict)  # sample id -> part of the reason
    audio: np.ndarray = field(default_factory=lambda: np.zeros(0))  # as written
    visual: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def counts(self) -> dict[str, int]:
        return {split: len(rows) for split, rows in self.splits.items()}


def _write(path: Path, key: str, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset(key, data=values)


def write_ave(
    root: Path,
    *,
    rows: int = 120,
    classes: list[str] | None = None,
    audio_dim: int = 16,
    grid: int = 2,
    channels: int = 16,
    noise: float = 0.5,
    header: bool = False,
    labels_file: bool = True,
    defects: bool = True,
    seed: int = 0,
) -> FakeAve:
    """Write the fake folder under `root`; splits are 60/20/20 % of the rows in a shuffled order
    (the order files are not sorted, as the real ones)."""
    events = list(classes or CLASSES)
    k = len(events)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, rows)
    labels[:k] = np.arange(k)  # first appearance in the given order
    full = rng.random(rows) < 0.4
    starts = np.where(full, 0, rng.integers(0, SEGMENTS - 2, rows))
    ends = np.where(full, SEGMENTS, [rng.integers(s + 1, SEGMENTS + 1) for s in starts])
    videos = ["".join(rng.choice(list(_ID_CHARS), 11)) for _ in range(rows + 1)]
    order = rng.permutation(rows)
    cut = [round(0.6 * rows), round(0.8 * rows)]
    orders = dict(zip(("train", "val", "test"), np.split(order, cut), strict=True))
    if defects:
        videos[7] = videos[3]  # one video, two annotated events
        empty, outside = (int(i) for i in orders["test"][:2])
        starts[empty] = ends[empty] = 0  # as row 26 of the real file: background only, kept

    proto_audio = rng.normal(0, 1, (k, audio_dim))
    proto_visual = rng.normal(0, 1, (k, channels)) + 1
    audio = rng.normal(0, noise, (rows, SEGMENTS, audio_dim)).astype(np.float32)
    visual = rng.normal(0, noise, (rows, SEGMENTS, grid, grid, channels)).astype(np.float32)
    targets = np.full((rows, SEGMENTS), k, np.int16)
    for i in range(rows):
        for t in range(starts[i], ends[i]):
            targets[i, t] = labels[i]
            audio[i, t] += proto_audio[labels[i]]
            y, x = rng.integers(0, grid, 2)
            visual[i, t, y, x] += proto_visual[labels[i]]

    lines = [f"{events[labels[i]]}&{videos[i]}&good&{starts[i]}&{ends[i]}" for i in range(rows)]
    fake = FakeAve([*events, "background"], {})
    failures: dict[int, str] = {}
    if defects:
        orders["train"] = orders["train"][1:]  # a row in no order file: not a sample
        nan_row = int(orders["train"][0])
        visual[nan_row, 2, 0, 0, 1] = np.nan
        failures[nan_row] = "NaN or Inf in modality 'visual'"
        lines.append(f"{events[0]}&{videos[rows]}&good&0&10")  # annotated, no features
        orders["test"] = np.append(orders["test"], rows)
        failures[rows] = "no features"
        lines[outside] = f"{events[labels[outside]]}&{videos[outside]}&good&{SEGMENTS - 1}&11"
        failures[outside] = "is not inside the 10 segments"
    one_hot = np.eye(k + 1, dtype=np.float32)[targets]
    if defects and labels_file:
        wrong = int(orders["val"][0])
        one_hot[wrong, 0] = np.roll(one_hot[wrong, 0], 1)
        failures[wrong] = "differs from the labels rebuilt"

    root.mkdir(parents=True, exist_ok=True)
    text = "\n".join([HEADER, *lines] if header else lines) + "\n"
    (root / "Annotations.txt").write_text(text, encoding="utf-8")
    _write(root / "audio_feature.h5", "avadataset", audio)
    _write(root / "visual_feature.h5", "avadataset", visual)
    if labels_file:
        _write(root / "labels.h5", "avadataset", one_hot)
    for split, rows_of in orders.items():
        _write(root / f"{split}_order.h5", "order", rows_of.astype(np.int64))

    for i in range(rows + 1):
        fake.sample_ids[i] = f"row-{i:05d}-{videos[i]}"
    for i, reason in failures.items():
        fake.failures[fake.sample_ids[i]] = reason
    for i in range(rows):
        fake.labels[i] = int(labels[i])
        fake.targets[i] = targets[i]
    fake.splits = {
        split: [int(i) for i in rows_of if int(i) not in failures]
        for split, rows_of in orders.items()
    }
    fake.audio, fake.visual = audio, visual
    return fake
