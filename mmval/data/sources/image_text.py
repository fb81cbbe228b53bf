"""Image-text data sets (Food-101, MVSA-Single/-Multiple, HFM twitter sarcasm).

Planning reads the annotation files (and, for MVSA, one text file per post), cleans the texts,
builds the tokenizer on the training split only and tokenizes everything; the worker processes
then only decode and resize the images. Each sample stores one image (a one-frame `jpeg`
modality) and the token ids with the cleaned text (`tokens`).
"""

from __future__ import annotations

import ast
import csv
import functools
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from mmval.data.extract.image import Resize, read_image
from mmval.data.extract.text import (
    TextCleaning,
    TokenizerConfig,
    WordTokenizerConfig,
    build_tokenizer,
    clean_text,
)
from mmval.data.extract.video import encode_jpeg
from mmval.data.manifest import DatasetManifest
from mmval.data.pipeline import ClipTask, PrepPlan
from mmval.data.shards import ROWS_PER_SHARD, ModalitySpec, SampleRecord, sha256_text
from mmval.data.sources.base import stratified_fractions
from mmval.errors import UserError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ----------------------------------------------------------------------------- raw layout
class JsonlAnnotations(_Strict):
    """QMF/MMBT lists: one JSON object per line with id, label, text and image path."""

    format: Literal["jsonl"] = "jsonl"
    files: dict[str, str] = Field(description="split -> jsonl file, relative to the raw folder")
    id: str = "id"
    label: str = "label"
    text: str = "text"
    image: str = Field(default="img", description="field holding the image path (raw-relative)")


class CsvAnnotations(_Strict):
    """UPMC Food-101 as BalanceBenchmark reads it: texts/<split>_titles.csv (image file, text,
    label) and images/<split>/<label>/<image file>."""

    format: Literal["csv"] = "csv"
    files: dict[str, str]
    header: bool = True
    columns: dict[Literal["image", "text", "label"], int] = Field(
        default={"image": 0, "text": 1, "label": 2}
    )
    image: str = Field(
        default="images/{split}/{label}/{image}",
        description="image path pattern; {split} is the key of the list it came from",
    )


class MvsaAnnotations(_Strict):
    """MVSA: labelResultAll.txt (ID, then one `text,image` sentiment pair per annotator, tab
    separated), data/<ID>.txt and data/<ID>.jpg. One annotator (MVSA-Single) or three
    (MVSA-Multiple, majority vote per modality, no majority -> dropped)."""

    format: Literal["mvsa"] = "mvsa"
    file: str = "labelResultAll.txt"
    text: str = "data/{id}.txt"
    image: str = "data/{id}.jpg"


class HfmAnnotations(_Strict):
    """HFM twitter sarcasm (Cai et al. 2019): text/train.txt, valid2.txt, test2.txt, one Python
    list literal per line `[id, text, ..., label]` (the last element is the label);
    images dataset_image/<id>.jpg. Posts containing a leak word are dropped as in the authors'
    loader (codes/loadData.py)."""

    format: Literal["hfm"] = "hfm"
    files: dict[str, str]
    image: str = "dataset_image/{id}.jpg"
    exclude_words: list[str] = Field(
        default=[
            "sarcasm", "sarcastic", "reposting", "<url>", "joke", "humour", "humor",
            "jokes", "irony", "ironic", "exgag",
        ]
    )  # fmt: skip


Annotations = Annotated[
    JsonlAnnotations | CsvAnnotations | MvsaAnnotations | HfmAnnotations,
    Field(discriminator="format"),
]


class CarveSpec(_Strict):
    carve_from: str
    fraction: float = Field(gt=0, lt=1)
    seed: int = 0


class ImageTextRaw(_Strict):
    annotations: Annotations
    carve: dict[str, CarveSpec] = Field(
        default_factory=dict, description="splits taken stratified from another split"
    )
    split_fractions: dict[str, float] | None = Field(
        default=None, description="for annotations without splits (MVSA): stratified shares"
    )
    split_seed: int = 0


# ------------------------------------------------------------------------ extraction params
class ImageParams(_Strict):
    name: str = "visual"
    size: tuple[int, int] = (224, 224)
    resize: Resize = "squash"
    short_side: int = Field(default=256, description="center-crop: short side before the crop")
    jpeg_quality: int = Field(default=90, ge=1, le=100)


class TextParams(_Strict):
    name: str = "text"
    cleaning: TextCleaning = Field(default_factory=TextCleaning)
    tokenizer: TokenizerConfig = Field(default_factory=WordTokenizerConfig)


class ImageTextParams(_Strict):
    image: ImageParams = Field(default_factory=ImageParams)
    text: TextParams = Field(default_factory=TextParams)
    rows_per_shard: int = Field(default=ROWS_PER_SHARD, ge=1)


# ---------------------------------------------------------------------------- reading
@dataclass
class Post:
    sample_id: str
    label: str
    text: str
    image: str  # relative to the raw folder
    split: str  # "" when the annotations have no splits (MVSA)


def _open(root: Path, rel: str) -> str:
    path = root / rel
    if not path.is_file():
        found = ", ".join(sorted(p.name for p in root.iterdir())[:12]) or "nothing"
        raise UserError(f"the raw folder {root} has no {rel} (found at its top level: {found}).")
    return _decode(path.read_bytes())


def _decode(data: bytes) -> str:
    """Tweets were saved in mixed encodings: UTF-8 (BOM or not) when valid, else Latin-1."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _jsonl(root: Path, spec: JsonlAnnotations) -> list[Post]:
    posts = []
    for split, rel in spec.files.items():
        for number, line in enumerate(_open(root, rel).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                posts.append(
                    Post(
                        str(row[spec.id]),
                        str(row[spec.label]),
                        str(row[spec.text]),
                        str(row[spec.image]),
                        split,
                    )
                )
            except (json.JSONDecodeError, KeyError) as exc:
                raise UserError(f"{rel} line {number} is not a valid record: {exc}") from None
    return posts


def _csv(root: Path, spec: CsvAnnotations) -> list[Post]:
    posts = []
    cols = spec.columns
    for split, rel in spec.files.items():
        rows = list(csv.reader(_open(root, rel).splitlines()))[1 if spec.header else 0 :]
        for row in rows:
            if not row:
                continue
            image, label = row[cols["image"]].strip(), row[cols["label"]].strip()
            path = spec.image.format(split=split, label=label, image=image)
            posts.append(
                Post(str(Path(path).with_suffix("")), label, row[cols["text"]], path, split)
            )
    return posts


def mvsa_label(text_label: str, image_label: str) -> str | None:
    """The usual MVSA rule (Xu and Mao 2017): equal labels stand, a neutral side gives way to
    the other, positive against negative is inconsistent (None)."""
    if text_label == image_label:
        return text_label
    if text_label == "neutral":
        return image_label
    if image_label == "neutral":
        return text_label
    return None


def _majority(labels: list[str]) -> str | None:
    (label, count), *_ = Counter(labels).most_common(1)
    return label if count * 2 > len(labels) else None


def _mvsa(root: Path, spec: MvsaAnnotations) -> tuple[list[Post], list[tuple[str, str]]]:
    posts, dropped = [], []
    lines = _open(root, spec.file).splitlines()
    for line in lines[1:]:
        fields = line.split("\t")
        if len(fields) < 2:
            continue
        post_id = fields[0].strip()
        pairs = [f.strip().split(",") for f in fields[1:] if f.strip()]
        text_label = _majority([p[0] for p in pairs])
        image_label = _majority([p[1] for p in pairs])
        if text_label is None or image_label is None:
            dropped.append((post_id, "annotators disagree: no majority label"))
            continue
        label = mvsa_label(text_label, image_label)
        if label is None:
            dropped.append(
                (post_id, f"inconsistent labels: text {text_label}, image {image_label}")
            )
            continue
        text_path = root / spec.text.format(id=post_id)
        if not text_path.is_file():
            dropped.append((spec.text.format(id=post_id), "text file not found"))
            continue
        text = _decode(text_path.read_bytes())
        posts.append(Post(post_id, label, text, spec.image.format(id=post_id), ""))
    return posts, dropped


def _hfm(root: Path, spec: HfmAnnotations) -> tuple[list[Post], list[tuple[str, str]]]:
    posts, dropped = [], []
    leaks = set(spec.exclude_words)
    for split, rel in spec.files.items():
        for number, line in enumerate(_open(root, rel).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = ast.literal_eval(line)  # literals only: never evaluates code
            except (ValueError, SyntaxError):
                raise UserError(f"{rel} line {number} is not a Python list literal.") from None
            post_id, text, label = str(row[0]), str(row[1]), str(row[-1])
            leak = leaks.intersection(text.split())
            if leak:
                dropped.append((post_id, f"text names the label ({sorted(leak)[0]})"))
                continue
            posts.append(Post(post_id, label, text, spec.image.format(id=post_id), split))
    return posts, dropped


# ------------------------------------------------------------------------------ source
def image_modality(params: ImageParams) -> ModalitySpec:
    """How an image is stored: one JPEG frame of the resized image."""
    h, w = params.size
    return ModalitySpec(
        name=params.name,
        dtype="uint8",
        shape=[1, h, w, 3],
        encoding="jpeg",
        description=f"image, {params.resize} to {h}x{w}",
    )


def image_frames(params: ImageParams, path: Path) -> list[bytes]:
    """The stored form of one image file: decoded, resized, one JPEG frame."""
    image = read_image(path, params.size, params.resize, params.short_side)
    return encode_jpeg(image[None], params.jpeg_quality)


def extract_post(params: ImageTextParams, task: ClipTask) -> SampleRecord:
    frames = image_frames(params.image, Path(task.files["image"]))
    text = params.text.name
    return SampleRecord(
        task.sample_id,
        task.label,
        task.source,
        values={params.image.name: frames, text: task.inline["ids"]},
        times={params.image.name: [0.0]},
        texts={text: task.inline["text"]},
    )


def plan_posts(
    name: str,
    classes: list[str],
    splits: dict[str, list[Post]],
    params: ImageTextParams,
    raw: Path,
    dropped: list[tuple[str, str]],
    limit: int | None,
    only_splits: list[str] | None,
) -> PrepPlan:
    """The plan of posts already split: the tokenizer fitted on the cleaned training texts, every
    text tokenized now, one task per post whose image exists (the others go to `dropped`)."""
    class_index = {c: i for i, c in enumerate(classes)}
    train = splits.get("train")
    if not train:
        raise UserError(f"{name}: the training split is empty; nothing to fit on.")
    cleaning = params.text.cleaning
    tokenizer = build_tokenizer(
        params.text.tokenizer, [clean_text(p.text, cleaning) for p in train]
    )
    if only_splits is not None:
        missing = sorted(set(only_splits) - set(splits))
        if missing:
            raise UserError(f"--splits: {name} has no split(s) {missing}; it has {sorted(splits)}.")
        splits = {split: items for split, items in splits.items() if split in only_splits}
    tasks: dict[str, list[ClipTask]] = {}
    for split, items in splits.items():
        tasks[split] = []
        for post in sorted(items, key=lambda p: p.sample_id)[:limit]:
            image = raw / post.image
            if not image.is_file():
                dropped.append((post.image, "image file not found"))
                continue
            text = clean_text(post.text, cleaning)
            inline = {"text": text, "ids": tokenizer.encode(text)}
            tasks[split].append(
                ClipTask(
                    post.sample_id,
                    class_index[post.label],
                    post.image,
                    {"image": str(image)},
                    inline=inline,
                )
            )
    if not any(tasks.values()):
        raise UserError(
            f"none of the images named in the annotations of {name} was found under "
            f"{raw} (expected files like {train[0].image})."
        )
    vocab_file = f"tokenizer-{params.text.name}.json"
    vocab = tokenizer.to_bytes()
    modalities = [
        image_modality(params.image),
        ModalitySpec(
            name=params.text.name,
            dtype="int32",
            shape=[params.text.tokenizer.max_length],
            encoding="tokens",
            description=f"{params.text.tokenizer.kind} token ids",
            vocab_size=tokenizer.vocab_size,
            pad_id=tokenizer.pad_id,
            vocab_file=vocab_file,
        ),
    ]
    return PrepPlan(
        classes=classes,
        modalities=modalities,
        extraction={"files": {vocab_file: sha256_text(vocab.decode("utf-8"))}},
        splits=tasks,
        extractor=functools.partial(extract_post, params),
        rows_per_shard=params.rows_per_shard,
        errors=dropped,
        files={vocab_file: vocab},
    )


class ImageTextSource:
    Params: ClassVar[type[BaseModel]] = ImageTextParams
    name: ClassVar[str] = "image_text"
    needs_raw: ClassVar[bool] = True

    def plan(
        self,
        manifest: DatasetManifest,
        params: ImageTextParams,
        raw: Path,
        *,
        limit: int | None = None,
        only_splits: list[str] | None = None,
    ) -> PrepPlan:
        """One task per post of the annotations (JSONL, CSV, MVSA or HFM layout); posts left out
        (duplicates, unreadable) are kept with their reason for the errors table."""
        layout = ImageTextRaw.model_validate(manifest.raw)
        spec = layout.annotations
        dropped: list[tuple[str, str]] = []
        if isinstance(spec, JsonlAnnotations):
            posts = _jsonl(raw, spec)
        elif isinstance(spec, CsvAnnotations):
            posts = _csv(raw, spec)
        elif isinstance(spec, MvsaAnnotations):
            posts, dropped = _mvsa(raw, spec)
        else:
            posts, dropped = _hfm(raw, spec)
        class_index = {name: i for i, name in enumerate(manifest.classes)}
        unknown = sorted({p.label for p in posts} - set(class_index))
        if unknown:
            raise UserError(
                f"labels {unknown[:5]} in the annotations of {manifest.name} are not among the "
                f"manifest's classes {manifest.classes[:5]}..."
            )
        posts = self._unique(posts, dropped)
        splits = self._split(posts, layout, class_index)
        train = splits.get("train")
        if not train:
            raise UserError(f"{manifest.name}: the training split is empty; nothing to fit on.")
        return plan_posts(
            manifest.name, list(manifest.classes), splits, params, raw, dropped, limit, only_splits
        )

    @staticmethod
    def _unique(posts: list[Post], dropped: list[tuple[str, str]]) -> list[Post]:
        seen: dict[str, str] = {}
        kept = []
        for post in posts:
            if post.sample_id in seen:
                dropped.append((post.sample_id, f"duplicate id (first in {seen[post.sample_id]})"))
                continue
            seen[post.sample_id] = post.split or "the annotations"
            kept.append(post)
        return kept

    @staticmethod
    def _split(
        posts: list[Post], layout: ImageTextRaw, class_index: dict[str, int]
    ) -> dict[str, list[Post]]:
        by_id = {p.sample_id: p for p in posts}
        if layout.split_fractions is not None:
            parts = stratified_fractions(
                [p.sample_id for p in posts],
                [class_index[p.label] for p in posts],
                layout.split_fractions,
                layout.split_seed,
            )
            return {name: [by_id[k] for k in keys] for name, keys in parts.items()}
        splits: dict[str, list[Post]] = {}
        for post in posts:
            splits.setdefault(post.split, []).append(post)
        for name, carve in layout.carve.items():
            source = splits.get(carve.carve_from, [])
            parts = stratified_fractions(
                [p.sample_id for p in source],
                [class_index[p.label] for p in source],
                {"kept": 1 - carve.fraction, name: carve.fraction},
                carve.seed,
            )
            splits[carve.carve_from] = [by_id[k] for k in parts["kept"]]
            splits[name] = [by_id[k] for k in parts[name]]
        return splits
