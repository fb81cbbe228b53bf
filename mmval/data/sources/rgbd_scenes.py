"""RGB-D scene recognition (NYU Depth V2, SUN RGB-D) in the layout of QMF's
RGBD-scene-recognition code (QingyangZhang/QMF @ fe6c4c6ef7cb23f0a89594ee413d485f1854268b,
data/aligned_conc_dataset.py; the same file in hanmenghan/TMC @
08d0ca4c4461b6de1cf73514d8c621598bc2b504, `ETMC TPAMI/data/aligned_conc_dataset.py`).

Raw layout: `<split>/<class>/**/*.png`, one PNG per sample holding the RGB image on its left half
and the (colourised) depth image on its right half. Classes are the sorted sub-folder names, as
`find_classes` gives them; a sample is every `.png` below a class folder, as torchvision's
`make_dataset(dir, class_to_idx, 'png')` walks it.

Per image, as `AlignedConcDataset.__getitem__` then the evaluation transforms of
train_QMF_nyud2.py / train_QMF_sun.py: convert to RGB; split at `int(w / 2)` (the right half
keeps an odd column); when a half is wider than `fine_size` (FINE_SIZE 224), resize it bicubically
to `load_size` x `load_size` (LOAD_SIZE 256); then `Resize((FINE_SIZE, FINE_SIZE))` (bilinear).
Each half is stored as a one-frame JPEG (`rgb`, `depth`), the form of the image-text sets.

Training augmentation is the loader's (`data.augment` of a recipe): QMF's RandomCrop(224) of the
256 x 256 image is the same field of view and pixel scale as a square crop of area
(224/256)^2 of the stored 224 x 224 image resized back to 224 (`crop_scale` 0.765625,
`crop_ratio` 1), plus the horizontal flip; see docs/data.md for what differs.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from mmval.data.extract import ExtractionError
from mmval.data.extract.image import decode_rgb
from mmval.data.extract.video import encode_jpeg
from mmval.data.manifest import DatasetManifest
from mmval.data.pipeline import ClipTask, PrepPlan
from mmval.data.shards import ROWS_PER_SHARD, ModalitySpec, SampleRecord
from mmval.data.sources.base import stratified_fractions
from mmval.data.sources.image_text import CarveSpec
from mmval.errors import UserError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RgbdRaw(_Strict):
    splits: dict[str, str] = Field(
        description="split -> folder (relative to the raw folder) of <class>/*.png images"
    )
    extension: str = Field(
        default=".png", description="file name ending of a sample (make_dataset's 'png')"
    )
    carve: dict[str, CarveSpec] = Field(
        default_factory=dict, description="splits taken stratified from another split"
    )


class RgbdParams(_Strict):
    rgb: str = Field(default="rgb", description="modality name of the left half")
    depth: str = Field(default="depth", description="modality name of the right half")
    load_size: int = Field(default=256, ge=1, description="LOAD_SIZE: bicubic square resize")
    fine_size: int = Field(
        default=224, ge=1, description="FINE_SIZE: the stored square size (evaluation Resize)"
    )
    jpeg_quality: int = Field(default=90, ge=1, le=100)
    rows_per_shard: int = Field(default=ROWS_PER_SHARD, ge=1)


def _resize(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode=mode, antialias=True).clamp(0, 255)


def split_pair(path: Path, params: RgbdParams) -> tuple[np.ndarray, np.ndarray]:
    """The stored RGB and depth images [S, S, 3] uint8 of one side-by-side PNG."""
    image = decode_rgb(path)
    width = image.shape[-1]
    half = int(width / 2)
    if half < 1:
        raise ExtractionError(f"image {width} pixels wide: no RGB and depth halves")
    out = []
    for part in (image[..., :half], image[..., half:]):
        x = part.unsqueeze(0).float()
        if half > params.fine_size:
            # PIL rounds each resize to uint8
            x = _resize(x, params.load_size, "bicubic").round()
        x = _resize(x, params.fine_size, "bilinear")
        out.append(x[0].round().to(torch.uint8).permute(1, 2, 0).numpy())
    return out[0], out[1]


def extract_pair(params: RgbdParams, task: ClipTask) -> SampleRecord:
    rgb, depth = split_pair(Path(task.files["image"]), params)
    return SampleRecord(
        task.sample_id,
        task.label,
        task.source,
        values={
            params.rgb: encode_jpeg(rgb[None], params.jpeg_quality),
            params.depth: encode_jpeg(depth[None], params.jpeg_quality),
        },
        times={params.rgb: [0.0], params.depth: [0.0]},
    )


def _modality(name: str, what: str, params: RgbdParams) -> ModalitySpec:
    s = params.fine_size
    return ModalitySpec(
        name=name,
        dtype="uint8",
        shape=[1, s, s, 3],
        encoding="jpeg",
        description=f"{what} half of the side-by-side image, resized to {s}x{s}",
    )


def _list_split(
    raw: Path, folder: str, extension: str, classes: list[str]
) -> tuple[list[tuple[str, int]], list[str]]:
    """(raw-relative path, label) of every image of a split folder, and its class folders."""
    root = raw / folder
    if not root.is_dir():
        found = ", ".join(sorted(p.name for p in raw.iterdir())[:12]) or "nothing"
        raise UserError(f"the raw folder {raw} has no {folder}/ folder (found: {found}).")
    found_classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    index = {name: i for i, name in enumerate(classes)}
    unknown = [c for c in found_classes if c not in index]
    if unknown:
        raise UserError(
            f"{root} has class folders {unknown[:5]} that are not among the manifest's classes "
            f"{classes}; a data set with other class names needs its own manifest (copy it, "
            "edit `classes`, and prep the copy)."
        )
    items = []
    for name in found_classes:
        for base, _, files in sorted(os.walk(root / name, followlinks=True)):
            for file in sorted(files):
                if file.lower().endswith(extension):
                    items.append((str((Path(base) / file).relative_to(raw)), index[name]))
    return items, found_classes


class RgbdScenesSource:
    Params: ClassVar[type[BaseModel]] = RgbdParams
    name: ClassVar[str] = "rgbd_scenes"
    needs_raw: ClassVar[bool] = True

    def plan(
        self,
        manifest: DatasetManifest,
        params: RgbdParams,
        raw: Path,
        *,
        limit: int | None = None,
        only_splits: list[str] | None = None,
    ) -> PrepPlan:
        """One task per image of each split folder; the carved splits cut from theirs by class
        (stratified, seeded, on the sorted paths)."""
        layout = RgbdRaw.model_validate(manifest.raw)
        classes = list(manifest.classes)
        if params.rgb == params.depth:
            raise UserError("rgb and depth must be different modality names.")
        splits: dict[str, list[tuple[str, int]]] = {}
        for split, folder in layout.splits.items():
            splits[split], found = _list_split(raw, folder, layout.extension, classes)
            if split == "train" and found != classes:
                missing = [c for c in classes if c not in found]
                raise UserError(
                    f"{raw / folder} has no class folder {missing[:5]}: the labels are the "
                    f"indices of the sorted class folders, which must be the manifest's {classes}."
                )
        for name, carve in layout.carve.items():
            if carve.carve_from not in splits:
                raise UserError(f"carve: {name} is cut from an unknown split {carve.carve_from!r}.")
            labels = dict(splits[carve.carve_from])
            parts = stratified_fractions(
                list(labels),
                list(labels.values()),
                {"kept": 1 - carve.fraction, name: carve.fraction},
                carve.seed,
            )
            splits[carve.carve_from] = [(p, labels[p]) for p in parts["kept"]]
            splits[name] = [(p, labels[p]) for p in parts[name]]
        if only_splits is not None:
            unknown = sorted(set(only_splits) - set(splits))
            if unknown:
                raise UserError(
                    f"--splits: {manifest.name} has no split(s) {unknown}; it has {sorted(splits)}."
                )
            splits = {s: items for s, items in splits.items() if s in only_splits}
        tasks = {
            split: [
                ClipTask(str(Path(rel).with_suffix("")), label, rel, {"image": str(raw / rel)})
                for rel, label in sorted(items)[:limit]
            ]
            for split, items in splits.items()
        }
        if not any(tasks.values()):
            raise UserError(
                f"no {layout.extension} image was found in the split folders "
                f"{sorted(layout.splits.values())} of {raw}."
            )
        return PrepPlan(
            classes=classes,
            modalities=[
                _modality(params.rgb, "RGB (left)", params),
                _modality(params.depth, "depth (right)", params),
            ],
            extraction={},
            splits=tasks,
            extractor=functools.partial(extract_pair, params),
            rows_per_shard=params.rows_per_shard,
        )
