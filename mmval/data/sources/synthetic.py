"""Seeded synthetic multimodal data in which chosen modalities dominate.

For class c and modality m a prototype mu[c, m] ~ N(0, I_d) is drawn once; a sample of class y
has x_m = signal[m] * mu[y, m] + noise * eps with eps ~ N(0, I_d). A larger signal makes a
modality easier to learn, so the strongest one dominates joint training: the situation the
balancing methods address. The same parameters always give the same bytes.

`kinds` gives each modality the form of a real image-text set [ours], so that the noisy-modality
protocol of QMF (Gaussian noise on the pixels, blank words in the text) runs without a download:
- `vector` (default): x_m above, float32 [d].
- `image`: a d x d RGB image stored as the image-text sources store theirs (one JPEG frame,
  quality 90, read back as uint8 [1, d, d, 3]). The class prototype is a luminance pattern,
  N(0, 1) on a grid of 4 x 4 square cells (d a multiple of 4); a pixel is
  128 + 64 (signal * pattern + noise * eps), eps ~ N(0, 1) per pixel and channel, rounded and
  clipped to 0-255. The class lives in the luminance and the sample noise in single pixels, so
  QMF's Gaussian corruption (one map of std 10 L shared by the channels) degrades it: at level
  10 the per-pixel noise on the luminance grows from 37 to about 100 grey levels.
- `tokens`: a text of d words over a vocabulary of pseudo-words: `class_words` words of each
  class and `shared_words` words of no class. Each word is, with probability signal, one of the
  sample's class words, else any word of the vocabulary (other classes' words included), so
  signal in [0, 1] sets how informative the text is. Stored as the image-text sources store
  text: the token ids of a word tokenizer fitted on the training split (saved as
  `tokenizer-<name>.json`) and the text itself in the `<name>_text` column.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from mmval.data.extract.text import WordTokenizer, WordTokenizerConfig
from mmval.data.extract.video import encode_jpeg
from mmval.data.manifest import DatasetManifest
from mmval.data.shards import ModalitySpec, SplitSamples, sha256_text
from mmval.data.sources.base import BuiltData

Kind = Literal["vector", "image", "tokens"]
IMAGE_GRID = 4  # an image prototype is IMAGE_GRID x IMAGE_GRID cells
JPEG_QUALITY = 90  # the image-text sources' default
_GREY, _UNIT = 128.0, 64.0  # image background and the grey levels of one unit of signal/noise
_SYLLABLES = ("ba", "de", "fi", "go", "ku", "la", "me", "ni", "po", "ru", "sa", "te", "vi", "wo",
              "xu", "zo")  # fmt: skip
_NEW_FIELDS = ("kinds", "class_words", "shared_words")


class SyntheticParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    modalities: list[str] = Field(default=["strong", "weak"], min_length=1)
    dims: list[int] = Field(
        default=[32, 32],
        description="per modality: feature size (vector), image side in pixels (image), words "
        "per text (tokens)",
    )
    signal: list[float] = Field(
        default=[0.6, 0.2],
        description="per modality: prototype scale (vector, image), share of class words in "
        "[0, 1] (tokens)",
    )
    noise: float = Field(default=1.0, gt=0)
    n_classes: int = Field(default=4, ge=2)
    per_class: dict[str, int] = Field(default={"train": 300, "val": 50, "test": 100})
    seed: int = 0
    kinds: list[Kind] | None = Field(
        default=None, description="per modality: vector, image or tokens (default: all vector)"
    )
    class_words: int = Field(default=8, ge=1, description="tokens: words of each class")
    shared_words: int = Field(default=32, ge=0, description="tokens: words of no class")

    @model_validator(mode="after")
    def _one_entry_per_modality(self) -> SyntheticParams:
        m = len(self.modalities)
        if len(self.dims) != m or len(self.signal) != m:
            raise ValueError(f"dims and signal need one entry per modality ({m})")
        if self.kinds is not None and len(self.kinds) != m:
            raise ValueError(f"kinds needs one entry per modality ({m})")
        if "train" not in self.per_class:
            raise ValueError("per_class needs a 'train' split")
        for name, kind, d, s in zip(
            self.modalities, self.modality_kinds, self.dims, self.signal, strict=True
        ):
            if kind == "image" and (d < IMAGE_GRID or d % IMAGE_GRID):
                raise ValueError(f"image {name}: dims is its side, a multiple of {IMAGE_GRID}")
            if kind == "tokens" and not 0 <= s <= 1:
                raise ValueError(f"tokens {name}: signal is a share of words, in [0, 1]")
        return self

    @property
    def modality_kinds(self) -> list[Kind]:
        return self.kinds or ["vector"] * len(self.modalities)

    @model_serializer(mode="wrap")
    def _omit_unused(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """All-vector parameters dump as before `kinds` existed, so a prep records the same
        settings and writes the same manifest as older versions did."""
        dump = handler(self)
        if all(kind == "vector" for kind in self.modality_kinds):
            for name in _NEW_FIELDS:
                dump.pop(name, None)
        return dump


def pseudo_word(index: int) -> str:
    """A pronounceable word per index, two syllables or more: 0 -> 'baba', 17 -> 'dede'."""
    syllables = []
    while True:
        index, digit = divmod(index, len(_SYLLABLES))
        syllables.append(_SYLLABLES[digit])
        if index == 0 and len(syllables) >= 2:
            return "".join(reversed(syllables))


def _vectors(
    params: SyntheticParams, d: int, signal: float, rng: np.random.Generator
) -> Callable[[np.ndarray], np.ndarray]:
    protos = rng.standard_normal((params.n_classes, d))

    def sample(labels: np.ndarray) -> np.ndarray:
        noise = params.noise * rng.standard_normal((len(labels), d))
        return (signal * protos[labels] + noise).astype(np.float32)

    return sample


def _images(
    params: SyntheticParams, side: int, signal: float, rng: np.random.Generator
) -> Callable[[np.ndarray], list[bytes]]:
    coarse = rng.standard_normal((params.n_classes, IMAGE_GRID, IMAGE_GRID))
    cell = side // IMAGE_GRID
    protos = coarse.repeat(cell, 1).repeat(cell, 2)[..., None]

    def sample(labels: np.ndarray) -> list[bytes]:
        eps = rng.standard_normal((len(labels), side, side, 3))
        pixels = _GREY + _UNIT * (signal * protos[labels] + params.noise * eps)
        return encode_jpeg(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), JPEG_QUALITY)

    return sample


def _texts(
    params: SyntheticParams, length: int, signal: float, rng: np.random.Generator
) -> Callable[[np.ndarray], list[str]]:
    k, shared = params.class_words, params.shared_words
    vocabulary = np.array([pseudo_word(i) for i in range(shared + params.n_classes * k)])

    def sample(labels: np.ndarray) -> list[str]:
        own = rng.random((len(labels), length)) < signal
        class_word = shared + labels[:, None] * k + rng.integers(0, k, (len(labels), length))
        any_word = rng.integers(0, len(vocabulary), (len(labels), length))
        words = vocabulary[np.where(own, class_word, any_word)]
        return [" ".join(row) for row in words]

    return sample


class SyntheticSource:
    name: ClassVar[str] = "synthetic"
    needs_raw: ClassVar[bool] = False
    Params: ClassVar[type[BaseModel]] = SyntheticParams

    def build(
        self, manifest: DatasetManifest, params: SyntheticParams, raw: Path | None
    ) -> BuiltData:
        # one generator drawn in a fixed order (prototypes, then split by split and modality by
        # modality), as before kinds existed: all-vector data keep their bytes
        rng = np.random.default_rng(params.seed)
        layout = list(
            zip(params.modalities, params.modality_kinds, params.dims, params.signal, strict=True)
        )
        vectors, images, texts = {}, {}, {}
        for name, kind, d, signal in layout:
            if kind == "vector":
                vectors[name] = _vectors(params, d, signal, rng)
            elif kind == "image":
                images[name] = _images(params, d, signal, rng)
            else:
                texts[name] = _texts(params, d, signal, rng)
        splits: dict[str, SplitSamples] = {}
        for split, per_class in params.per_class.items():
            labels = np.repeat(np.arange(params.n_classes), per_class)
            ids = [f"{split}-{i:06d}" for i in range(len(labels))]
            samples = SplitSamples(ids, labels, ["generated"] * len(ids), {})
            for name in params.modalities:
                if name in vectors:
                    samples.arrays[name] = vectors[name](labels)
                elif name in images:
                    samples.images[name] = images[name](labels)
                else:
                    samples.texts[name] = texts[name](labels)
            splits[split] = samples
        modalities, files = [], {}
        for name, kind, d, signal in layout:
            if kind == "vector":
                modalities.append(
                    ModalitySpec(
                        name=name, dtype="float32", shape=[d], description=f"signal {signal}"
                    )
                )
            elif kind == "image":
                modalities.append(
                    ModalitySpec(
                        name=name,
                        dtype="uint8",
                        shape=[1, d, d, 3],
                        encoding="jpeg",
                        description=f"image {d}x{d}, signal {signal}",
                    )
                )
            else:
                tokenizer = WordTokenizer.fit(
                    splits["train"].texts[name], WordTokenizerConfig(max_length=d)
                )
                for samples in splits.values():
                    samples.arrays[name] = np.stack(
                        [tokenizer.encode(t) for t in samples.texts[name]]
                    )
                vocab_file = f"tokenizer-{name}.json"
                files[vocab_file] = tokenizer.to_bytes()
                modalities.append(
                    ModalitySpec(
                        name=name,
                        dtype="int32",
                        shape=[d],
                        encoding="tokens",
                        description=f"word token ids, signal {signal}",
                        vocab_size=tokenizer.vocab_size,
                        pad_id=tokenizer.pad_id,
                        vocab_file=vocab_file,
                    )
                )
        extraction = (
            {"files": {n: sha256_text(b.decode("utf-8")) for n, b in files.items()}}
            if files
            else {}
        )
        classes = [f"class{c}" for c in range(params.n_classes)]
        return BuiltData(classes, modalities, extraction, splits, files=files)
