"""A small fake raw folder in the nvGesture_v1 layout: the two `*_cvpr2016_v2.lst` lists in the
official line format and `Video_data/class_XX/subjectYY_rZ/{sk_color,sk_depth,duo_left}.avi`.

Every frame's grey level steps with its index (so a frame read at the wrong index is seen) and
its colour or brightness offset carries the label in each stream. The duo_left window starts
later and runs longer than the sk_* windows, as in the real lists. The writer returns what a
correct prep must produce.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np

SIZE = (24, 32)  # height, width of the fake videos
FRAMES = 30  # frames per video
STEP = 7  # grey-level step between consecutive frames


@dataclass
class FakeGesture:
    counts: dict[str, int]  # samples per split a correct prep writes (val carved from train)
    labels: dict[str, int] = field(default_factory=dict)  # sample id -> 0-based label
    windows: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)  # id -> sensor
    splits: dict[str, str] = field(default_factory=dict)  # sample id -> its list's split
    failures: dict[str, str] = field(default_factory=dict)  # source -> part of the reason


def frame_image(i: int, label: int, sensor: str) -> np.ndarray:
    """[H, W, 3] uint8 frame i of a video of `label` and `sensor`."""
    h, w = SIZE
    level = 30 + (STEP * i) % 180
    if sensor == "color":
        colour = np.array([level, (40 * label) % 200 + 20, 220 - level // 2])
        return np.broadcast_to(colour, (h, w, 3)).astype(np.uint8)
    grey = min(level + 3 * label, 255)
    return np.full((h, w, 3), grey, np.uint8)


def write_video(path: Path, label: int, sensor: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="avi") as c:
        stream = c.add_stream("mjpeg", rate=30)
        stream.height, stream.width = SIZE
        stream.pix_fmt = "yuvj420p"
        for i in range(FRAMES):
            frame = av.VideoFrame.from_ndarray(frame_image(i, label, sensor), format="rgb24")
            frame.pts = i
            c.mux(stream.encode(frame))
        c.mux(stream.encode())


def write_nvgesture(root: Path, classes: int, per_class: dict[str, int]) -> FakeGesture:
    """`per_class` samples per class (label 1..classes in the lists) per split; in the test
    split, one sample's depth video is not a video and another's colour video is missing."""
    fake = FakeGesture({})
    subject = 0
    for split, n in per_class.items():
        lines = []
        for label in range(classes):
            for r in range(n):
                subject += 1
                folder = f"Video_data/class_{label + 1:02d}/subject{subject}_r{r}"
                sk = (3 + label % 4, 3 + label % 4 + 10)  # 10-frame gesture window
                duo = (sk[0] + 2, sk[0] + 16)  # later and longer, as duo_left's are
                for sensor, name in (("color", "sk_color"), ("depth", "sk_depth")):
                    write_video(root / folder / f"{name}.avi", label, sensor)
                write_video(root / folder / "duo_left.avi", label, "duo_left")
                lines.append(
                    f"path:./{folder} depth:sk_depth:{sk[0]}:{sk[1]} "
                    f"color:sk_color:{sk[0]}:{sk[1]} duo_left:duo_left:{duo[0]}:{duo[1]} "
                    f"label:{label + 1}"
                )
                fake.labels[folder] = label
                fake.windows[folder] = {"color": sk, "depth": sk, "duo_left": duo}
                fake.splits[folder] = split
        (root / f"nvgesture_{split}_correct_cvpr2016_v2.lst").write_text("\n".join(lines) + "\n")
    test = [f for f, split in fake.splits.items() if split == "test"]
    broken = next(f for f in test if "class_02" in f)
    (root / broken / "sk_depth.avi").write_bytes(b"RIFF not really an avi")
    fake.failures[broken] = "depth (sk_depth.avi): undecodable"
    missing = next(f for f in test if "class_01" in f)
    (root / missing / "sk_color.avi").unlink()
    fake.failures[missing] = "video file not found"
    n_train = per_class["train"] * classes
    val = (per_class["train"] - round(per_class["train"] * 0.9)) * classes
    fake.counts = {"train": n_train - val, "test": per_class["test"] * classes - 2, "val": val}
    return fake
