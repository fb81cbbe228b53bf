"""A small fake raw folder in the layout of QMF's RGB-D scene data (nyud2_trainvaltest, sun_rgbd):
<split>/<class>/*.png, each PNG the RGB image and the depth image side by side.

The RGB half is a flat class colour with noise, the depth half a vertical ramp whose level
depends on the class: each modality carries the label. The writer returns what a correct prep
must produce.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torchvision.io import encode_jpeg, encode_png

HALF = (24, 40)  # height, width of each half: not square, wider than the test's fine size


@dataclass
class FakeRgbd:
    classes: list[str]
    counts: dict[str, int]  # samples per split a correct prep writes (val carved from train)
    images: dict[str, Path] = field(default_factory=dict)  # sample id -> PNG
    labels: dict[str, int] = field(default_factory=dict)  # sample id -> label
    failures: dict[str, str] = field(default_factory=dict)  # source -> part of the reason


def pair(label: int, rng: np.random.Generator, half: tuple[int, int] = HALF) -> np.ndarray:
    """[H, 2W(+1), 3] uint8: RGB on the left, grey depth ramp on the right."""
    h, w = half
    colour = np.array([(60 + 90 * label) % 256, 200 - 70 * label % 200, 40 + 50 * label], float)
    rgb = colour + rng.normal(0, 6, (h, w, 3))
    ramp = np.linspace(0, 60, h)[:, None, None] + 40 * label + rng.normal(0, 3, (h, w + 1, 1))
    depth = np.repeat(ramp, 3, axis=2)
    return np.clip(np.concatenate([rgb, depth], axis=1), 0, 255).astype(np.uint8)


def _png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    chw = torch.from_numpy(image.transpose(2, 0, 1).copy())
    path.write_bytes(bytes(encode_png(chw).numpy()))


def write_rgbd(root: Path, classes: list[str], per_class: dict[str, int]) -> FakeRgbd:
    """`per_class` images per class in train/ and test/; one test image is undecodable, one
    train image sits in a sub-folder of its class (make_dataset walks them), one is narrower
    than the fine size (no LOAD_SIZE resize), and a JPEG beside them is not a sample."""
    rng = np.random.default_rng(0)
    fake = FakeRgbd(classes, {})
    for split, n in per_class.items():
        for label, name in enumerate(classes):
            for i in range(n):
                rel = f"{split}/{name}/{i:04d}.png"
                if split == "train" and label == 0 and i == 0:
                    rel = f"{split}/{name}/more/{i:04d}.png"
                half = (20, 12) if split == "train" and label == 1 and i == 0 else HALF
                _png(root / rel, pair(label, rng, half))
                sample = rel.removesuffix(".png")
                fake.images[sample] = root / rel
                fake.labels[sample] = label
    stray = root / "train" / classes[0] / "note.jpg"
    stray.write_bytes(bytes(encode_jpeg(torch.zeros(3, 8, 8, dtype=torch.uint8)).numpy()))
    broken = f"test/{classes[1]}/0000.png"
    (root / broken).write_bytes(b"not a png")
    fake.failures[broken] = "undecodable"
    del fake.images[broken.removesuffix(".png")]
    n_train = per_class["train"] * len(classes)
    val = (per_class["train"] - round(per_class["train"] * 0.9)) * len(classes)
    fake.counts = {
        "train": n_train - val,
        "test": per_class["test"] * len(classes) - 1,
        "val": val,
    }
    return fake
