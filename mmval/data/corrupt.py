"""Corruptions of one modality's raw input (`mmval value --corrupt MODALITY=KIND:LEVEL`): the
noisy-modality protocol of QMF, which C3R and CMoB follow.

Definitions follow QMF's official evaluation (QingyangZhang/QMF at fe6c4c6ef7cb23f0a89594ee413d
485f1854268b, `text-image-classification/src/data/helpers.py` `get_GaussianNoisetransforms`,
`get_SaltNoisetransforms`, and `src/data/dataset.py` `AddGaussianNoise`, `AddSaltPepperNoise`):
- `gaussian` at level L: with probability 0.5 per sample (`RandomApply(p=0.5)`), add noise of
  std 10 L on the 0-255 pixel scale, one map per image shared by its colour channels, then clip
  to [0, 255] and truncate to integers. Deviations: QMF reseeds `np.random.seed(0)` in every
  call, so every noised image gets the same map; here each (seed, repeat, sample) draws its own.
  QMF clips only above 255 and lets `astype(uint8)` wrap negative values around; here both ends
  are clipped. Frames of one clip get one map each. Inputs not on the pixel scale (spectrograms,
  feature vectors) get noise of std 0.1 L times the sample's own std [ours: QMF noises images
  only], so level 10 adds noise as large as the signal.
- `salt-pepper` at level L: with probability 0.5 x L / 100 per sample (`RandomApply(p=0.5)` of
  `AddSaltPepperNoise(density=0.1, p=L/100)`), 5 % of the pixels become 0 and 5 % 255, the same
  positions in every channel; non-pixel inputs take their own minimum and maximum [ours].
- `blank` at level L (text tokens; QMF `JsonlDataset.__getitem__` in `src/data/dataset.py`, test
  mode with `noise_level` L > 0): with probability 0.5 per sample, the text is split on ' ',
  each word independently becomes '_' with probability 0.1 L, and the re-joined text is
  tokenized again, so '_' is what the tokenizer makes of it ([UNK] for a word vocabulary, the
  '_' token for BERT's WordPiece). Both choices are `np.random.choice([0, 1], p=...)`, which picks
  1 when its uniform draw reaches the first entry of the normalised cumulative p; here the same
  comparison runs on uniforms of our generator. The text is the cleaned text stored beside the
  ids (QMF blanks its raw text, which its tokenizer then cleans), encoded again with the
  tokenizer the data directory keeps, truncated and padded as the loader does. A sample the
  coin leaves clean keeps its stored ids. L > 10 would make the probability exceed 1 (refused).
- `mask` at level L [ours, after C3R's 30 % area mask]: one rectangle covering L % of the area
  (images: of each frame's H x W; other inputs: of the leading axis, time for spectrograms) at a
  random place, set to 0.
Level 0 leaves the input untouched. Every draw comes from a generator seeded by (seed, repeat,
the sample's position in its split, the corruption's index), so a corrupted input is the same
whatever the batch size. The same corruptions augment training batches (the recipe's
`data.corrupt`, `training_corruptor`), with the epoch in place of the repeat.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np

from mmval.data.extract.text import HFTokenizer, WordTokenizer, load_saved_tokenizer
from mmval.data.shards import ModalitySpec
from mmval.errors import UserError
from mmval.lazy import lazy_module

if TYPE_CHECKING:
    import torch

    from mmval.data.dataset import CorruptBatch, ParquetSamples
else:
    torch = lazy_module("torch")

Kind = Literal["gaussian", "salt-pepper", "mask", "blank"]
KINDS: tuple[Kind, ...] = get_args(Kind)
TEXT_KINDS: tuple[Kind, ...] = ("blank",)  # on token ids; the others on numeric inputs
_SPEC = re.compile(r"^(?P<modality>[^=]+)=(?P<kind>[a-z-]+):(?P<level>[0-9.]+)$")


@dataclass(frozen=True)
class Corruption:
    modality: str
    kind: Kind
    level: float

    @classmethod
    def parse(cls, text: str) -> Corruption:
        """`image=gaussian:5`."""
        match = _SPEC.match(text.strip())
        if match is None or match["kind"] not in KINDS:
            raise UserError(
                f"--corrupt {text!r}: write MODALITY=KIND:LEVEL with KIND one of "
                f"{', '.join(KINDS)} (e.g. image=gaussian:5)."
            )
        level = float(match["level"])
        if match["kind"] == "mask" and level > 100:
            raise UserError(f"--corrupt {text!r}: a mask covers at most 100 % of the input.")
        if match["kind"] == "blank" and level > 10:
            raise UserError(
                f"--corrupt {text!r}: blank replaces each word with probability 0.1 x LEVEL, so "
                "LEVEL is at most 10."
            )
        return cls(match["modality"], match["kind"], level)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"{self.modality}={self.kind}:{self.level:g}"


def _is_pixels(x: torch.Tensor, spec: ModalitySpec) -> bool:
    """Frames and images on the 0-255 scale, channels last."""
    return spec.encoding == "jpeg" or (x.dtype == torch.uint8 and x.dim() >= 3)


def _gaussian(x: torch.Tensor, level: float, pixels: bool, g: torch.Generator) -> torch.Tensor:
    if torch.rand((), generator=g) >= 0.5:
        return x
    if pixels:
        noise = torch.randn((*x.shape[:-1], 1), generator=g, dtype=torch.float64) * 10 * level
        return (x.double() + noise).clamp(0, 255).to(x.dtype)  # truncation, as astype
    std = x.double().std() if x.numel() > 1 else torch.zeros((), dtype=torch.float64)
    noise = torch.randn(x.shape, generator=g, dtype=torch.float64) * 0.1 * level * std
    return (x.double() + noise).to(x.dtype)


def _salt_pepper(x: torch.Tensor, level: float, pixels: bool, g: torch.Generator) -> torch.Tensor:
    if torch.rand((), generator=g) >= 0.5 or torch.rand((), generator=g) >= level / 100:
        return x
    shape = (*x.shape[:-1], 1) if pixels else x.shape
    draw = torch.rand(shape, generator=g).expand(x.shape)
    low, high = (0, 255) if pixels else (x.min(), x.max())
    out = x.clone()
    out[draw < 0.05] = low
    out[(draw >= 0.05) & (draw < 0.1)] = high
    return out


def _mask(x: torch.Tensor, level: float, pixels: bool, g: torch.Generator) -> torch.Tensor:
    out = x.clone()
    share = level / 100
    if pixels:  # [..., H, W, C]: one rectangle of each frame's area
        h, w = x.shape[-3], x.shape[-2]
        mh, mw = round(h * math.sqrt(share)), round(w * math.sqrt(share))
        top = int(torch.randint(0, h - mh + 1, (), generator=g))
        left = int(torch.randint(0, w - mw + 1, (), generator=g))
        out[..., top : top + mh, left : left + mw, :] = 0
        return out
    length = x.shape[0]
    span = round(length * share)
    start = int(torch.randint(0, length - span + 1, (), generator=g))
    out[start : start + span] = 0
    return out


def _qmf_threshold(p: float) -> float:
    """The uniform draw from which `np.random.choice([0, 1], p=[1 - p, p])` picks 1: the first
    entry of its cumulative p, normalised as numpy does."""
    cdf = np.cumsum([1 - p, p])
    return float(cdf[0] / cdf[-1])


def blank_words(text: str, level: float, uniform: Callable[[int], np.ndarray]) -> str | None:
    """QMF's word blanking of one text, drawing `uniform(n)` (n uniforms in [0, 1)) where QMF
    calls `np.random.choice`: the blanked text, or None when the coin leaves it clean."""
    if uniform(1)[0] < _qmf_threshold(0.5):
        return None
    words = text.split(" ")
    threshold = _qmf_threshold(0.1 * level)
    draws = uniform(len(words))
    return " ".join("_" if u >= threshold else w for w, u in zip(words, draws, strict=True))


@functools.lru_cache(maxsize=8)
def _saved_tokenizer(path: Path, stamp: int) -> WordTokenizer | HFTokenizer:
    """Loaded once per file version (`stamp`: its mtime), not once per batch."""
    return load_saved_tokenizer(path)


def _blank_tokens(
    x: torch.Tensor,
    positions: list[int],
    corruption: Corruption,
    spec: ModalitySpec,
    dataset: ParquetSamples | None,
    generator: Callable[[int], torch.Generator],
) -> torch.Tensor:
    """Blank the stored text of each sample and encode it again, truncated to the spec's
    length and padded with its pad id as `ParquetSamples.__getitems__` pads stored ids."""
    if dataset is None:
        raise UserError(f"--corrupt {corruption}: blank reads the stored text of the data set.")
    if spec.vocab_file is None or not (dataset.root / spec.vocab_file).is_file():
        where = "names no tokenizer" if spec.vocab_file is None else f"has no {spec.vocab_file}"
        raise UserError(
            f"--corrupt {corruption}: blank encodes the blanked text with the tokenizer the data "
            f"was prepared with, and the manifest of {dataset.root} {where} for "
            f"{spec.name!r}; prepare the data again with this mmval version."
        )
    path = dataset.root / spec.vocab_file
    tokenizer = _saved_tokenizer(path, path.stat().st_mtime_ns)
    texts = dataset.texts(spec.name, positions)
    out = x.cpu().clone()
    for at, (text, position) in enumerate(zip(texts, positions, strict=True)):
        g = generator(position)
        blanked = blank_words(
            text,
            corruption.level,
            lambda n, g=g: torch.rand(n, generator=g, dtype=torch.float64).numpy(),
        )
        if blanked is None:
            continue
        ids = torch.from_numpy(tokenizer.encode(blanked)[: spec.shape[0]].astype(np.int64))
        out[at, : len(ids)] = ids.to(out.dtype)
        out[at, len(ids) :] = spec.pad_id
    return out.to(x.device)


def draw_seed(*keys: int) -> int:
    """A generator seed per (seed, repeat, sample, corruption), independent across keys."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> 1)


_APPLY = {"gaussian": _gaussian, "salt-pepper": _salt_pepper, "mask": _mask}


def corrupt_inputs(
    inputs: dict[str, torch.Tensor],
    positions: torch.Tensor,
    corruptions: list[Corruption],
    specs: dict[str, ModalitySpec],
    *,
    seed: int,
    repeat: int,
    dataset: ParquetSamples | None = None,
) -> dict[str, torch.Tensor]:
    """The batch's inputs with each corruption applied to its modality, sample by sample.
    `blank` reads the stored text of `positions` from `dataset`, the split the batch is from."""
    out = dict(inputs)
    for index, corruption in enumerate(corruptions):
        x = out[corruption.modality]
        spec = specs[corruption.modality]
        _check_input(corruption, spec, x)
        if corruption.level == 0:
            continue

        def generator(position: int, index: int = index) -> torch.Generator:
            return torch.Generator().manual_seed(draw_seed(seed, repeat, position, index))

        if corruption.kind == "blank":
            out[corruption.modality] = _blank_tokens(
                x, positions.tolist(), corruption, spec, dataset, generator
            )
            continue
        pixels = _is_pixels(x[0], spec)
        samples = [
            _APPLY[corruption.kind](row, corruption.level, pixels, generator(position))
            for row, position in zip(x.cpu(), positions.tolist(), strict=True)
        ]
        out[corruption.modality] = torch.stack(samples).to(x.device)
    return out


def _check_input(corruption: Corruption, spec: ModalitySpec, x: torch.Tensor) -> None:
    """`blank` edits text, the other kinds numbers: refuse a kind on the other sort of input."""
    if corruption.kind in TEXT_KINDS:
        if spec.encoding != "tokens":
            raise UserError(
                f"--corrupt {corruption}: {corruption.kind} blanks words of a text (token ids); "
                f"{corruption.modality} holds {spec.encoding} {x.dtype}. Use gaussian, "
                "salt-pepper or mask."
            )
        return
    if spec.encoding == "tokens" or not (x.is_floating_point() or x.dtype == torch.uint8):
        raise UserError(
            f"--corrupt {corruption}: {corruption.kind} needs an image, spectrogram or "
            f"vector input; {corruption.modality} holds {spec.encoding} {x.dtype}"
            + (" (corrupt text with blank)." if spec.encoding == "tokens" else ".")
        )


def check_corruptions(
    corruptions: list[Corruption], modalities: list[str], field: str = "--corrupt"
) -> None:
    unknown = sorted({c.modality for c in corruptions} - set(modalities))
    if unknown:
        raise UserError(
            f"{field} names {', '.join(unknown)}, which the model does not have "
            f"({', '.join(modalities)})."
        )


Corrupt = Callable[[dict[str, "torch.Tensor"], "torch.Tensor"], dict[str, "torch.Tensor"]]


def corruptor(
    corruptions: Sequence[Corruption], dataset: ParquetSamples, *, seed: int, repeat: int
) -> Corrupt:
    """`corrupt_inputs` for batches of `dataset` (inputs, positions) in one repeat."""
    return functools.partial(
        corrupt_inputs,
        corruptions=list(corruptions),
        specs={s.name: s for s in dataset.specs},
        seed=seed,
        repeat=repeat,
        dataset=dataset,
    )


def training_corruptor(corruptions: Sequence[Corruption], seed: int) -> CorruptBatch:
    """The recipe's `data.corrupt` as augmentation of the training batches: drawn anew per
    (run seed, epoch, sample), so every epoch sees other noise and a resumed run the same."""
    return functools.partial(_corrupt_training_batch, corruptions=list(corruptions), seed=seed)


def _corrupt_training_batch(
    inputs: dict[str, torch.Tensor],
    positions: torch.Tensor,
    epoch: int,
    dataset: ParquetSamples,
    *,
    corruptions: list[Corruption],
    seed: int,
) -> dict[str, torch.Tensor]:
    specs = {s.name: s for s in dataset.specs}
    return corrupt_inputs(
        inputs, positions, corruptions, specs, seed=seed, repeat=epoch, dataset=dataset
    )


def corruption_metadata(
    corruptions: Sequence[Corruption], seed: int, repeats: int
) -> dict[str, str]:
    """What a table computed under corruptions records: the corruptions, their seed and the
    number of independent draws (its `repeat` column)."""
    return {
        "mmval.corruptions": json.dumps([str(c) for c in corruptions]),
        "mmval.seed": str(seed),
        "mmval.repeats": str(repeats),
    }
