"""`mmval prep synthetic` with image and token modalities (`kinds`), and the default unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mmval.data.corrupt import Corruption, corrupt_inputs
from mmval.data.dataset import ParquetSamples
from mmval.data.extract.text import WordTokenizer, WordTokenizerConfig, load_saved_tokenizer
from mmval.data.prep import prepare
from mmval.data.shards import SplitSamples, decode_tensor_column, sha256_file
from mmval.data.sources.synthetic import pseudo_word
from mmval.errors import UserError
from mmval.recipe import parse_recipe
from mmval.runner import Trainer

SMALL = "per_class={train: 12, val: 4, test: 8}"
IMAGE_TEXT = ["modalities=[image,text]", "kinds=[image,tokens]", "dims=[16,12]"]


def _files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()
    }


def _old_generator(seed: int, dims, signal, noise, n_classes, per_class):
    """The vector-only generator as it was before kinds existed, for the bytes it must keep."""
    rng = np.random.default_rng(seed)
    prototypes = [rng.standard_normal((n_classes, d)) for d in dims]
    out = {}
    for split, count in per_class.items():
        labels = np.repeat(np.arange(n_classes), count)
        out[split] = [
            (s * p[labels] + noise * rng.standard_normal((len(labels), p.shape[1]))).astype(
                np.float32
            )
            for s, p in zip(signal, prototypes, strict=True)
        ]
    return out


def test_default_output_is_unchanged(tmp_path: Path) -> None:
    default = prepare("synthetic", tmp_path / "default").manifest
    explicit = prepare("synthetic", tmp_path / "explicit", overrides=["kinds=[vector,vector]"])
    assert _files(tmp_path / "default") == _files(tmp_path / "explicit")
    assert explicit.manifest == default
    params = default.extraction["settings"]["params"]
    assert set(params) == {
        "modalities",
        "dims",
        "signal",
        "noise",
        "n_classes",
        "per_class",
        "seed",
    }
    assert "files" not in default.extraction and not list((tmp_path / "default").glob("tok*"))
    reference = _old_generator(0, [32, 32], [0.6, 0.2], 1.0, 4, params["per_class"])
    for split, info in default.splits.items():
        ids, arrays = [], {"strong": [], "weak": []}
        for shard in info.shards:
            table = pq.read_table(tmp_path / "default" / shard.path)
            ids += table.column("sample_id").to_pylist()
            for spec in default.modalities:
                arrays[spec.name].append(decode_tensor_column(table.column(spec.name), spec))
        order = np.argsort(ids)
        for spec, expected in zip(default.modalities, reference[split], strict=True):
            stored = np.concatenate(arrays[spec.name])[order]
            assert stored.dtype == np.float32 and np.array_equal(stored, expected)


def test_image_and_tokens_kinds(tmp_path: Path) -> None:
    out = tmp_path / "it"
    manifest = prepare("synthetic", out, overrides=[*IMAGE_TEXT, SMALL]).manifest
    image, text = manifest.modalities
    assert (image.encoding, image.dtype, image.shape) == ("jpeg", "uint8", [1, 16, 16, 3])
    assert (text.encoding, text.dtype, text.shape, text.pad_id) == ("tokens", "int32", [12], 0)
    assert text.vocab_file == "tokenizer-text.json"
    assert manifest.extraction["files"] == {text.vocab_file: sha256_file(out / text.vocab_file)}
    assert manifest.extraction["settings"]["params"]["kinds"] == ["image", "tokens"]

    tokenizer = load_saved_tokenizer(out / text.vocab_file)
    assert tokenizer.vocab_size == text.vocab_size
    train_texts = []
    for split, info in manifest.splits.items():
        table = pa.concat_tables([pq.read_table(out / s.path) for s in info.shards])
        assert set(table.column_names) >= {"image", "image_t", "text", "text_text"}
        texts = table.column("text_text").to_pylist()
        train_texts += texts if split == "train" else []
        for words, ids in zip(texts, table.column("text").to_pylist(), strict=True):
            assert len(words.split()) == 12 and ids == tokenizer.encode(words).tolist()
        samples = ParquetSamples(out, split, ["image", "text"])
        batch = samples.__getitems__(list(range(len(samples))))
        assert batch.inputs["image"].dtype == torch.uint8
        assert batch.inputs["image"].shape == (len(samples), 1, 16, 16, 3)
        assert batch.inputs["text"].shape == (len(samples), 12)
    fitted = WordTokenizer.fit(train_texts, WordTokenizerConfig(max_length=12))
    assert fitted.tokens == tokenizer.tokens  # fitted on the training split only

    again = tmp_path / "again"
    prepare("synthetic", again, overrides=[*IMAGE_TEXT, SMALL])
    assert _files(out) == _files(again)
    other = tmp_path / "other"
    prepare("synthetic", other, overrides=[*IMAGE_TEXT, SMALL, "seed=1"])
    assert _files(out)["train/part-00000.parquet"] != _files(other)["train/part-00000.parquet"]


def _split_arrays(root: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    samples = ParquetSamples(root, split, ["image"])
    batch = samples.__getitems__(list(range(len(samples))))
    table = pq.read_table(root / split, columns=["sample_id", "text_text"])
    ids, words = table.column("sample_id").to_pylist(), table.column("text_text").to_pylist()
    texts = dict(zip(ids, words, strict=True))
    return (
        batch.inputs["image"].double().numpy(),
        batch.label.numpy(),
        [texts[i] for i in samples.sample_ids],
    )


def test_the_class_is_in_the_pixels_and_the_words(tmp_path: Path) -> None:
    out = tmp_path / "strong"
    prepare(
        "synthetic",
        out,
        overrides=[*IMAGE_TEXT, "signal=[0.5,0.5]", "per_class={train: 40, test: 40}"],
    )
    train_x, train_y, _ = _split_arrays(out, "train")
    test_x, test_y, test_texts = _split_arrays(out, "test")
    means = np.stack([train_x[train_y == c].mean(0) for c in range(4)])
    distance = ((test_x[:, None] - means[None]) ** 2).sum(axis=(2, 3, 4, 5))
    assert (distance.argmin(1) == test_y).mean() > 0.9  # chance is 0.25
    assert 100 < test_x.mean() < 156  # mid-grey background

    owned = {pseudo_word(32 + c * 8 + k): c for c in range(4) for k in range(8)}
    votes = np.zeros((len(test_texts), 4))
    for row, words in enumerate(test_texts):
        for word in words.split():
            if word in owned:
                votes[row, owned[word]] += 1
    assert (votes.argmax(1) == test_y).mean() > 0.9

    weak = tmp_path / "weak"
    prepare("synthetic", weak, overrides=[*IMAGE_TEXT, "signal=[0,0]", "per_class={train: 40}"])
    x, y, texts = _split_arrays(weak, "train")
    assert abs(x[y == 0].mean() - x[y == 1].mean()) < 2  # signal 0: no class in the pixels
    counts = [sum(w in owned and owned[w] == 0 for w in t.split()) for t in texts]
    assert np.mean(np.array(counts)[y == 0]) < 12 * 0.25  # own words only by chance (1/8)


def test_gaussian_noise_reaches_the_pixels(tmp_path: Path) -> None:
    out = tmp_path / "it"
    manifest = prepare("synthetic", out, overrides=[*IMAGE_TEXT, SMALL]).manifest
    samples = ParquetSamples(out, "test", ["image", "text"])
    batch = samples.__getitems__(list(range(len(samples))))
    specs = {s.name: s for s in manifest.modalities}
    noised = corrupt_inputs(
        batch.inputs, batch.index, [Corruption("image", "gaussian", 10)], specs, seed=0, repeat=0
    )
    changed = (noised["image"] != batch.inputs["image"]).flatten(1).any(1)
    assert noised["image"].dtype == torch.uint8 and 0 < int(changed.sum()) < len(changed)
    assert torch.equal(noised["text"], batch.inputs["text"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["kinds=[image]"], "kinds needs one entry per modality"),
        (["kinds=[image,vector]", "dims=[10,8]"], "multiple of 4"),
        (["kinds=[tokens,vector]", "signal=[1.5,0.2]"], "share of words"),
        (["kinds=[audio,vector]"], "kinds"),
    ],
)
def test_bad_kinds_are_user_errors(overrides: list[str], message: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=message):
        prepare("synthetic", tmp_path / "bad", overrides=overrides)


def test_pseudo_words_are_distinct() -> None:
    words = [pseudo_word(i) for i in range(600)]
    assert len(set(words)) == 600 and all(w.isalpha() and len(w) >= 4 for w in words)


def test_split_samples_without_media_keep_their_records() -> None:
    samples = SplitSamples(["a"], np.array([1]), ["s"], {"x": np.zeros((1, 2), np.float32)})
    (record,) = samples.records([0])
    assert record.texts == {} and record.times == {} and list(record.values) == ["x"]


def test_a_model_trains_on_image_and_tokens(tmp_path: Path) -> None:
    data = tmp_path / "data"
    prepare("synthetic", data, overrides=[*IMAGE_TEXT, SMALL])
    recipe = parse_recipe(
        {
            "name": "it",
            "seeds": [0],
            "data": {"path": str(data)},
            "model": {
                "encoders": {
                    "image": {"kind": "resnet18"},
                    "text": {"kind": "embedding_bag", "dim": 16, "out_dim": 16},
                },
                "fusion": "concat",
            },
            "method": {"name": "concat"},
            "optim": {"name": "adam", "lr": 0.001},
            "train": {"epochs": 1, "batch_size": 16},
            "output": str(tmp_path / "runs"),
        },
        "test",
    )
    summary = Trainer(recipe, 0).run().summary
    assert 0 <= summary["test_acc"] <= 1
    assert (tmp_path / "runs" / "it" / "seed0" / "best.pt").is_file()
