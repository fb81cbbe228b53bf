"""Small fake raw folders in the real layouts of the image-text data sets.

Each post's image is a flat class colour with noise and its text names the class, so both
modalities carry the label. The writers return what a correct prep must produce.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torchvision.io import encode_jpeg, encode_png

SIZE = (48, 64)  # not square: exercises the resize


@dataclass
class FakeRaw:
    classes: list[str]
    counts: dict[str, int]  # samples per split a correct prep writes
    images: dict[str, Path] = field(default_factory=dict)  # sample id -> image file
    texts: dict[str, str] = field(default_factory=dict)  # sample id -> cleaned text
    failures: dict[str, str] = field(default_factory=dict)  # source -> part of the reason


def colour(label: int) -> np.ndarray:
    return np.array([(60 + 90 * label) % 256, 200 - 70 * label % 200, 40 + 50 * label], float)


def write_image(path: Path, label: int, rng: np.random.Generator, png: bool = False) -> None:
    pixels = colour(label) + rng.normal(0, 6, (*SIZE, 3))
    chw = torch.from_numpy(np.clip(pixels, 0, 255).astype(np.uint8).transpose(2, 0, 1).copy())
    path.parent.mkdir(parents=True, exist_ok=True)
    data = encode_png(chw) if png else encode_jpeg(chw, quality=95)
    path.write_bytes(bytes(data.numpy()))


def post_text(name: str, i: int) -> str:
    return f"a photo of {name.replace('_', ' ')} number {i}"


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def food101(root: Path, classes: list[str], per_class: dict[str, int]) -> FakeRaw:
    """texts/{split}_titles.csv + images/{split}/<label>/<label>_<i>.jpg (names repeat across
    splits, as in UPMC); texts carry RT, a URL and hashtags that the cleaning removes."""
    rng = np.random.default_rng(0)
    fake = FakeRaw(classes, {})
    (root / "texts").mkdir(parents=True)
    for split, n in per_class.items():
        lines = ["Image_path,text,label"]
        for label, name in enumerate(classes):
            for i in range(n):
                image = f"{name}_{i}.jpg"
                write_image(root / "images" / split / name / image, label, rng)
                text = post_text(name, i)
                lines.append(f'{image},"RT #{text} http://x.co/{i}, more",{name}')
                sample = f"images/{split}/{name}/{name}_{i}"
                fake.images[sample] = root / "images" / split / name / image
                fake.texts[sample] = text
        (root / "texts" / f"{split}_titles.csv").write_text("\n".join(lines) + "\n")
    broken = root / "images" / "test" / classes[0] / f"{classes[0]}_0.jpg"
    broken.write_bytes(b"not a jpeg")
    empty = root / "images" / "test" / classes[1] / f"{classes[1]}_0.jpg"
    empty.write_bytes(b"")
    for path, reason in ((broken, "undecodable"), (empty, "empty")):
        rel = str(path.relative_to(root))
        fake.failures[rel] = reason
        del fake.images[str(Path(rel).with_suffix(""))]
    n_train = per_class["train"] * len(classes)
    val = (per_class["train"] - round(per_class["train"] * 0.9)) * len(classes)
    fake.counts = {"train": n_train - val, "val": val, "test": len(fake.images) - n_train}
    return fake


def jsonl_layout(
    root: Path, classes: list[str], per_class: dict[str, int], image_dir: str
) -> FakeRaw:
    """QMF lists train/dev/test.jsonl with images under `image_dir` (PNG bytes in one .jpg, as
    some MVSA files are)."""
    rng = np.random.default_rng(1)
    fake = FakeRaw(classes, {"train": 0, "val": 0, "test": 0})
    number = 0
    for split, file in (("train", "train.jsonl"), ("val", "dev.jsonl"), ("test", "test.jsonl")):
        rows = []
        for label, name in enumerate(classes):
            for i in range(per_class[split]):
                number += 1
                post = str(number)
                image = f"{image_dir}/{post}.jpg"
                write_image(root / image, label, rng, png=number == 1)
                rows.append({"id": post, "label": name, "text": post_text(name, i), "img": image})
                fake.images[post], fake.texts[post] = root / image, post_text(name, i)
                fake.counts[split] += 1
        _jsonl(root / file, rows)
    missing = fake.images.pop("2")
    missing.unlink()
    fake.failures[str(missing.relative_to(root))] = "not found"
    fake.counts["train"] -= 1
    return fake


def mvsa_multiple(root: Path, per_class: int) -> FakeRaw:
    """labelResultAll.txt with three annotators, data/<id>.txt and data/<id>.jpg; two posts have
    no text majority or inconsistent labels and must be dropped."""
    classes = ["positive", "neutral", "negative"]
    rng = np.random.default_rng(2)
    fake = FakeRaw(classes, {})
    lines = ["ID\ttext,image\ttext,image\ttext,image"]
    number = 0
    for label, name in enumerate(classes):
        for i in range(per_class):
            number += 1
            post = str(number)
            other = "neutral" if name != "neutral" else "positive"
            lines.append(f"{post}\t{name},{name}\t{name},{other}\t{other},{name}")
            write_image(root / "data" / f"{post}.jpg", label, rng)
            (root / "data" / f"{post}.txt").write_bytes(post_text(name, i).encode("latin-1"))
            fake.images[post], fake.texts[post] = root / "data" / f"{post}.jpg", post_text(name, i)
    lines.append(f"{number + 1}\tpositive,positive\tneutral,positive\tnegative,positive")
    lines.append(f"{number + 2}\tpositive,negative\tpositive,negative\tpositive,negative")
    fake.failures = {str(number + 1): "no majority", str(number + 2): "inconsistent"}
    (root / "labelResultAll.txt").write_text("\n".join(lines) + "\n")
    n = per_class
    split = {"train": round(0.8 * n), "val": round(0.9 * n) - round(0.8 * n)}
    split["test"] = n - split["train"] - split["val"]
    fake.counts = {name: count * len(classes) for name, count in split.items()}
    return fake


def hfm(root: Path, per_class: dict[str, int]) -> FakeRaw:
    """text/{train,valid2,test2}.txt Python list literals; dataset_image/<id>.jpg; one post
    that says 'sarcasm' must be dropped."""
    classes = ["0", "1"]
    rng = np.random.default_rng(3)
    fake = FakeRaw(classes, {})
    (root / "text").mkdir(parents=True)
    number = 10**17
    for split, file in (("train", "train.txt"), ("val", "valid2.txt"), ("test", "test2.txt")):
        lines = []
        for label in (0, 1):
            for i in range(per_class[split]):
                number += 1
                post = str(number)
                text = post_text("mocking" if label else "sincere", i) + " <user> emoji_15"
                row = [post, text, label] if split == "train" else [post, text, 1 - label, label]
                lines.append(repr(row))
                write_image(root / "dataset_image" / f"{post}.jpg", label, rng)
                fake.images[post], fake.texts[post] = root / "dataset_image" / f"{post}.jpg", text
        fake.counts[split] = len(lines)
        if split == "train":
            lines.append(repr([str(number + 1), "what a joke this is", 1]))
            fake.failures[str(number + 1)] = "names the label"
        (root / "text" / file).write_text("\n".join(lines) + "\n")
    return fake
