"""`mmval prep` on fake raw folders laid out like the real image-text data sets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_image

import tests.image_text_raw as fake_raw
from mmval.data.dataset import ParquetSamples
from mmval.data.extract.text import (
    HFTokenizerConfig,
    TextCleaning,
    WordTokenizer,
    WordTokenizerConfig,
    build_tokenizer,
    clean_text,
    load_saved_tokenizer,
)
from mmval.data.manifest import load_dataset_manifest
from mmval.data.prep import prepare
from mmval.errors import UserError
from mmval.recipe import parse_recipe
from mmval.runner import Trainer

SMALL = ["image.size=[32,32]", "image.short_side=40"]


def _fake(dataset: str, root: Path) -> fake_raw.FakeRaw:
    classes = load_dataset_manifest(dataset)[0].classes[:3]
    if dataset == "food101":
        return fake_raw.food101(root, classes, {"train": 10, "test": 3})
    if dataset == "food101-qmf":
        return fake_raw.jsonl_layout(root, classes, {"train": 6, "val": 2, "test": 2}, "images")
    if dataset == "mvsa-single":
        return fake_raw.jsonl_layout(root, classes, {"train": 6, "val": 2, "test": 2}, "data")
    if dataset == "mvsa-multiple":
        return fake_raw.mvsa_multiple(root, per_class=10)
    return fake_raw.hfm(root, {"train": 6, "val": 2, "test": 2})


def _reference_image(path: Path, resize: str) -> np.ndarray:
    """The stored image computed independently: decode, then torchvision's own transforms."""
    from torchvision.transforms import v2

    image = decode_image(str(path), ImageReadMode.RGB).float()
    if resize == "center-crop":
        image = v2.CenterCrop(32)(v2.Resize(40, antialias=True)(image))
    else:
        image = F.interpolate(image[None], size=(32, 32), mode="bilinear", antialias=True)[0]
    return image.permute(1, 2, 0).numpy()


@pytest.mark.parametrize(
    "dataset", ["food101", "food101-qmf", "mvsa-single", "mvsa-multiple", "hfm"]
)
def test_prep_writes_every_split(dataset: str, tmp_path: Path) -> None:
    fake = _fake(dataset, tmp_path / "raw")
    out = tmp_path / "data"
    result = prepare(dataset, out, raw=tmp_path / "raw", workers=1, overrides=SMALL)
    manifest = result.manifest
    assert {s: info.samples for s, info in manifest.splits.items()} == fake.counts
    image_spec, text_spec = manifest.modalities
    assert (image_spec.encoding, image_spec.shape) == ("jpeg", [1, 32, 32, 3])
    assert (text_spec.encoding, text_spec.dtype) == ("tokens", "int32")
    assert text_spec.vocab_file is not None and (out / text_spec.vocab_file).is_file()

    errors = pq.read_table(out / "errors.parquet").to_pandas()
    assert len(errors) == len(fake.failures)
    for source, reason in fake.failures.items():
        assert reason in errors.set_index("source").loc[source, "reason"]

    tokenizer = load_saved_tokenizer(out / text_spec.vocab_file)
    resize = load_dataset_manifest(dataset)[0].params["image"]["resize"]
    for split in manifest.splits:
        samples = ParquetSamples(out, split, ["visual", "text"])
        batch = samples.__getitems__(list(range(len(samples))))
        assert batch.inputs["visual"].shape == (len(samples), 1, 32, 32, 3)
        assert batch.inputs["text"].shape == (len(samples), text_spec.shape[0])
        for at, sample_id in enumerate(samples.sample_ids):
            name = manifest.classes[int(batch.label[at])]
            assert name.replace("_", " ") in fake.texts[sample_id] or dataset == "hfm"
            ids = tokenizer.encode(fake.texts[sample_id])
            stored = batch.inputs["text"][at].numpy()
            assert (stored[: len(ids)] == ids).all() and (stored[len(ids) :] == 0).all()
            reference = _reference_image(fake.images[sample_id], resize)
            frame = batch.inputs["visual"][at, 0].numpy().astype(float)
            assert np.abs(frame - reference).mean() < 4.0  # JPEG q90 of the same pixels


def test_texts_are_cleaned_and_kept(tmp_path: Path) -> None:
    fake = fake_raw.food101(tmp_path / "raw", ["apple_pie", "baklava"], {"train": 10, "test": 3})
    out = tmp_path / "data"
    prepare("food101", out, raw=tmp_path / "raw", workers=1, overrides=SMALL)
    table = pq.read_table(out / "train" / "part-00000.parquet", columns=["sample_id", "text_text"])
    for sample_id, text in zip(*table.to_pydict().values(), strict=True):
        assert text == fake.texts[sample_id]  # RT, "#" and the URL (to the line end) are gone


def test_vocabulary_comes_from_train_only(tmp_path: Path) -> None:
    config = WordTokenizerConfig(max_length=5)
    tokenizer = build_tokenizer(config, ["the cat sat", "the dog"])
    assert isinstance(tokenizer, WordTokenizer)
    assert tokenizer.tokens == ["[PAD]", "[UNK]", "the", "cat", "dog", "sat"]
    assert tokenizer.encode("The zebra sat on the mat today").tolist() == [2, 1, 5, 1, 2]
    path = tmp_path / "tok.json"
    path.write_bytes(tokenizer.to_bytes())
    assert load_saved_tokenizer(path).encode("cat dog").tolist() == [3, 4]


def test_cleaning_rules() -> None:
    rules = TextCleaning(strip_retweet=True, strip_urls=True, strip_hash=True)
    assert clean_text("RT  #best   pie  http://t.co/x tail", rules) == "best pie"
    assert clean_text("RT  #best", TextCleaning()) == "RT #best"


def _word_level_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<unk>": 1, "a": 2, "photo": 3, "of": 4}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))


def test_hf_tokenizer_from_local_files(tmp_path: Path) -> None:
    _word_level_tokenizer(tmp_path / "tokenizer.json")
    for where in (tmp_path / "tokenizer.json", tmp_path):
        hf = build_tokenizer(HFTokenizerConfig(path=where, max_length=3), [])
        assert hf.encode("a photo of apple pie").tolist() == [2, 3, 4]
        assert (hf.pad_id, hf.vocab_size) == (0, 5)
    bert = tmp_path / "bert"
    bert.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "pie"]
    (bert / "vocab.txt").write_text("\n".join(words) + "\n")
    wordpiece = build_tokenizer(HFTokenizerConfig(path=bert, max_length=8), [])
    assert wordpiece.encode("A photo of PIE").tolist() == [2, 5, 6, 7, 8, 3]
    with pytest.raises(UserError, match="never downloads"):
        build_tokenizer(HFTokenizerConfig(path=tmp_path / "nowhere"), [])


def test_prep_with_a_local_hf_tokenizer(tmp_path: Path) -> None:
    fake_raw.jsonl_layout(tmp_path / "raw", ["positive", "neutral", "negative"],
                          {"train": 3, "val": 1, "test": 1}, "data")  # fmt: skip
    _word_level_tokenizer(tmp_path / "tokenizer.json")
    override = f"text.tokenizer={{kind: hf, path: {tmp_path / 'tokenizer.json'}, max_length: 6}}"
    out = tmp_path / "data"
    manifest = prepare(
        "mvsa-single", out, raw=tmp_path / "raw", workers=1, overrides=[*SMALL, override]
    ).manifest
    spec = manifest.modality("text")
    assert (spec.vocab_size, spec.pad_id, spec.shape) == (5, 0, [6])
    saved = json.loads((out / spec.vocab_file).read_text())
    assert saved["model"]["type"] == "WordLevel"
    ids = ParquetSamples(out, "test", ["text"])[0].inputs["text"][0].tolist()
    assert ids[:3] == [2, 3, 4]  # "a photo of ..."


def test_missing_annotations_name_what_was_expected(tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "readme.txt").write_text("hi")
    with pytest.raises(UserError, match=r"no texts/train_titles.csv .*readme.txt"):
        prepare("food101", tmp_path / "data", raw=tmp_path / "raw")


def test_unknown_label_is_a_user_error(tmp_path: Path) -> None:
    fake_raw.jsonl_layout(tmp_path / "raw", ["positive", "happy", "negative"],
                          {"train": 2, "val": 1, "test": 1}, "data")  # fmt: skip
    with pytest.raises(UserError, match="happy"):
        prepare("mvsa-single", tmp_path / "data", raw=tmp_path / "raw")


@pytest.mark.parametrize("text_encoder", ["embedding_bag", "transformer"])
def test_image_text_concat_learns(text_encoder: str, tmp_path: Path) -> None:
    """Text alone separates the classes here: the text encoders must learn it."""
    fake_raw.jsonl_layout(tmp_path / "raw", ["positive", "neutral", "negative"],
                          {"train": 30, "val": 6, "test": 6}, "data")  # fmt: skip
    data = tmp_path / "data"
    prepare("mvsa-single", data, raw=tmp_path / "raw", workers=1, overrides=SMALL)
    recipe = parse_recipe(
        {
            "name": "it",
            "seeds": [0],
            "data": {"path": str(data)},
            "model": {
                "encoders": {
                    "visual": {"kind": "mlp", "hidden": [32], "out_dim": 16},
                    "text": {"kind": text_encoder},
                },
                "fusion": "concat",
            },
            "method": {"name": "concat"},
            "optim": {"name": "adam", "lr": 0.001},
            "train": {"epochs": 8, "batch_size": 16},
            "output": str(tmp_path / "runs"),
        },
        "test",
    )
    summary = Trainer(recipe, 0).run().summary
    assert summary["test_acc"] > 0.8  # chance is 1/3
    metrics = pd.read_parquet(tmp_path / "runs" / "it" / "seed0" / "metrics.parquet")
    assert metrics["train_loss"].iloc[-1] < metrics["train_loss"].iloc[0]


def test_text_encoders_ignore_padding() -> None:
    from mmval.data.shards import ModalitySpec
    from mmval.models.encoders import (
        EmbeddingBagEncoderConfig,
        TransformerEncoderConfig,
        build_encoder,
    )

    spec = ModalitySpec(name="t", dtype="int32", shape=[6], encoding="tokens", vocab_size=9)
    short = torch.tensor([[3, 4, 0, 0, 0, 0]])
    for config in (EmbeddingBagEncoderConfig(), TransformerEncoderConfig(dropout=0.0)):
        encoder = build_encoder(spec, config).eval()
        with torch.no_grad():
            alone = encoder(short)
            empty = encoder(torch.zeros(1, 6, dtype=torch.long))
            # a different pad embedding must not change the result
            if hasattr(encoder, "embed"):
                encoder.embed.weight[0] += 1.0
            else:
                encoder.bag.weight[0] += 1.0
            assert torch.allclose(encoder(short), alone, atol=1e-5)
        assert torch.isfinite(empty).all()
