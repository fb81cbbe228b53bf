"""Hugging Face text encoders (`kind: hf`) and MMBT from local folders: a tiny BERT written by
the test itself (nothing is downloaded)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from mmval.cli.main import app
from typer.testing import CliRunner

import tests.image_text_raw as fake_raw
from mmval.data.dataset import ParquetSamples
from mmval.data.prep import prepare
from mmval.data.shards import ModalitySpec
from mmval.errors import UserError
from mmval.models.encoders import build_encoder
from mmval.models.hf import HFEncoderConfig
from mmval.models.mmbt import MMBTConfig, MMBTModel
from mmval.recipe import parse_recipe
from mmval.runner import Trainer

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install 'mmval[hf]')"
)

CLASSES = ["positive", "neutral", "negative"]
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "number", "##s"]
WORDS += [*CLASSES, *map(str, range(10))]
SMALL = ["image.size=[32,32]", "image.short_side=40"]


def write_bert(folder: Path, vocab: list[str] = WORDS) -> Path:
    """A 2-layer BERT with random weights and its vocab.txt, as save_pretrained writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    transformers.BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bert(tmp_path_factory.mktemp("models") / "bert")


def _spec(vocab: int = len(WORDS), length: int = 6) -> ModalitySpec:
    return ModalitySpec(
        name="text", dtype="int32", shape=[length], encoding="tokens", vocab_size=vocab, pad_id=0
    )


def test_pooling_variants_match_the_hf_model(bert: Path) -> None:
    reference = transformers.BertModel.from_pretrained(bert, local_files_only=True).eval()
    ids = torch.tensor([[2, 5, 6, 7, 10, 3], [2, 11, 3, 0, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        out = reference(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
        hidden = out.last_hidden_state
        mean = torch.stack([hidden[0].mean(0), hidden[1, :3].mean(0)])
        expected = {"pooler": out.pooler_output, "cls": hidden[:, 0], "mean": mean}
        assert not torch.allclose(expected["pooler"], expected["cls"])
        for pooling, want in expected.items():
            encoder = build_encoder(_spec(), HFEncoderConfig(path=bert, pooling=pooling)).eval()
            assert encoder.out_dim == 32
            got = encoder(ids.int())
            torch.testing.assert_close(got, want)
    # pooler: tanh(dense(h_CLS)), BERT's pooled output (QMF's text feature)
    dense = reference.pooler.dense
    torch.testing.assert_close(expected["pooler"], torch.tanh(dense(hidden[:, 0])))


def test_default_pooling_is_the_pooler() -> None:
    assert HFEncoderConfig(path=Path("x")).pooling == "pooler"


def _posts(root: Path, per_split: dict[str, int]) -> fake_raw.FakeRaw:
    return fake_raw.jsonl_layout(root, CLASSES, per_split, "data")


def test_prep_stores_the_hf_tokenizer_ids_without_sep(bert: Path, tmp_path: Path) -> None:
    """`sep: false`: [CLS] + WordPieces[:max_length - 1], QMF's BERT input, in the model's ids."""
    fake = _posts(tmp_path / "raw", {"train": 3, "val": 1, "test": 2})
    tokenizer = f"text.tokenizer={{kind: hf, path: {bert}, max_length: 5, sep: false}}"
    data = tmp_path / "data"
    manifest = prepare(
        "mvsa-single", data, raw=tmp_path / "raw", workers=1, overrides=[*SMALL, tokenizer]
    ).manifest
    spec = manifest.modality("text")
    assert (spec.vocab_size, spec.pad_id, spec.shape) == (len(WORDS), 0, [5])
    reference = transformers.BertTokenizer(vocab=str(bert / "vocab.txt"), do_lower_case=True)
    cls_id = reference.convert_tokens_to_ids("[CLS]")
    for split in ("train", "test"):
        samples = ParquetSamples(data, split, ["text"])
        stored = samples.__getitems__(list(range(len(samples)))).inputs["text"]
        for at, sample_id in enumerate(samples.sample_ids):
            pieces = reference.tokenize(fake.texts[sample_id])[:4]
            ids = [cls_id, *reference.convert_tokens_to_ids(pieces)]
            assert stored[at].tolist() == ids + [0] * (5 - len(ids))
    # with the default (sep: true) the tokenizer's own [CLS] ... [SEP]
    default = f"text.tokenizer={{kind: hf, path: {bert}, max_length: 5}}"
    manifest = prepare(
        "mvsa-single", tmp_path / "d2", raw=tmp_path / "raw", workers=1, overrides=[*SMALL, default]
    ).manifest
    row = ParquetSamples(tmp_path / "d2", "test", ["text"])[0].inputs["text"][0].tolist()
    assert row[0] == cls_id and row[-1] == reference.convert_tokens_to_ids("[SEP]")


def _image_text_data(bert: Path, tmp_path: Path, max_length: int = 8) -> Path:
    _posts(tmp_path / "raw", {"train": 12, "val": 3, "test": 3})
    tokenizer = f"text.tokenizer={{kind: hf, path: {bert}, max_length: {max_length}, sep: false}}"
    data = tmp_path / "data"
    prepare("mvsa-single", data, raw=tmp_path / "raw", workers=1, overrides=[*SMALL, tokenizer])
    return data


def _recipe(tmp_path: Path, data: Path, model: dict, method: str = "concat") -> dict:
    return {
        "name": "hf",
        "seeds": [0],
        "data": {"path": str(data)},
        "model": model,
        "method": {"name": method},
        "optim": {"name": "adam", "lr": 0.001},
        "train": {"epochs": 2, "batch_size": 4},
        "output": str(tmp_path / "runs"),
    }


def test_hf_encoder_trains_a_few_steps(bert: Path, tmp_path: Path) -> None:
    data = _image_text_data(bert, tmp_path)
    model = {
        "encoders": {
            "visual": {"kind": "mlp", "hidden": [16], "out_dim": 8},
            "text": {"kind": "hf", "path": str(bert)},
        },
        "fusion": "concat",
    }
    trainer = Trainer(parse_recipe(_recipe(tmp_path, data, model), "test"), 0)
    before = transformers.BertModel.from_pretrained(bert, local_files_only=True).state_dict()
    trainer.run()
    best = torch.load(tmp_path / "runs" / "hf" / "seed0" / "best.pt", weights_only=False)
    state = best["model"] if "model" in best else best["model_state"]
    moved = [
        k for k, v in before.items() if not torch.equal(state[f"encoders.text.model.{k}"].cpu(), v)
    ]
    assert "embeddings.word_embeddings.weight" in moved and len(moved) > len(before) // 2


def test_vocabulary_mismatch_is_refused(bert: Path) -> None:
    with pytest.raises(UserError, match=rf"vocabulary of 30 ids, the model has {len(WORDS)}"):
        build_encoder(_spec(vocab=30), HFEncoderConfig(path=bert))
    with pytest.raises(UserError, match="64 positions"):
        build_encoder(_spec(length=65), HFEncoderConfig(path=bert))


def test_missing_and_wrong_files_exit_2_naming_them(bert: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "vocab.txt").write_text("x\n")
    with pytest.raises(UserError, match=r"no config\.json and no model\.safetensors or "):
        build_encoder(_spec(), HFEncoderConfig(path=empty))
    with pytest.raises(UserError, match="not a folder"):
        build_encoder(_spec(), HFEncoderConfig(path=tmp_path / "nowhere"))
    # weights whose names do not fit: the parameters left uninitialised are named
    from safetensors.torch import load_file, save_file

    renamed = tmp_path / "renamed"
    renamed.mkdir()
    (renamed / "config.json").write_bytes((bert / "config.json").read_bytes())
    state = load_file(bert / "model.safetensors")
    state["pooler.linear.weight"] = state.pop("pooler.dense.weight")
    save_file(state, renamed / "model.safetensors")
    with pytest.raises(UserError, match=r"missing: pooler\.dense\.weight"):
        build_encoder(_spec(), HFEncoderConfig(path=renamed))
    # through the CLI: exit 2, one paragraph naming what the folder lacks
    data = _image_text_data(bert, tmp_path)
    model = {"encoders": {"text": {"kind": "hf", "path": str(empty)}}, "fusion": "concat"}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tmp_path, data, model)))
    result = CliRunner().invoke(app, ["train", "--recipe", str(recipe)])
    assert result.exit_code == 2, result.output
    assert "no config.json" in " ".join(result.output.split())


def test_without_transformers_exit_2_names_the_extra(
    bert: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails
    with pytest.raises(UserError, match=r"pip install 'mmval\[hf\]'"):
        build_encoder(_spec(), HFEncoderConfig(path=bert))


# ---------------------------------------------------------------------------------- MMBT
def _mmbt_specs(length: int = 6) -> list[ModalitySpec]:
    image = ModalitySpec(name="visual", dtype="uint8", shape=[1, 32, 32, 3], encoding="jpeg")
    return [image, _spec(length=length)]


def test_mmbt_forward_and_its_joint_sequence(bert: Path) -> None:
    model = MMBTModel(MMBTConfig(bert=bert, depth=18, embeds=3), _mmbt_specs(), 3).eval()
    images = torch.randint(0, 256, (2, 1, 32, 32, 3), dtype=torch.uint8)
    stored = torch.tensor([[2, 5, 6, 7, 10, 0], [2, 11, 12, 0, 0, 0]], dtype=torch.int32)
    with torch.no_grad():
        out = model({"visual": images, "text": stored})
        assert out.logits.shape == (2, 3) and out.unimodal_logits is None
        img = model.image_embeddings(images)
        assert img.shape == (2, 3, 512)
        text = stored.long()[:, 1:]  # the stored [CLS] is dropped, as QMF's MMBT text has none
        embeds, positions, types, mask = model.joint_inputs(img, text)
        assert embeds.shape == (2, 3 + 2 + 5, 32)
        assert positions[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
        assert types[0].tolist() == [0] * 5 + [1] * 5
        assert mask.tolist() == [[1] * 5 + [1, 1, 1, 1, 0], [1] * 5 + [1, 1, 0, 0, 0]]
        # by hand, with BERT's own embedding tables: the image part [CLS] img [SEP] with
        # positions 0..4 and type 0; the text as BERT embeds it alone, with token type 1
        tables = model.bert.embeddings
        words = tables.word_embeddings.weight
        image_part = torch.cat([words[2].expand(2, 1, 32), model.img_embeddings(img),
                                words[3].expand(2, 1, 32)], 1)  # fmt: skip
        image_part = image_part + tables.position_embeddings.weight[:5]
        image_part = tables.LayerNorm(image_part + tables.token_type_embeddings.weight[0])
        joint = tables(inputs_embeds=embeds, position_ids=positions, token_type_ids=types)
        torch.testing.assert_close(joint[:, :5], image_part)
        alone = tables(input_ids=text, token_type_ids=torch.ones_like(text))
        torch.testing.assert_close(joint[:, 5:], alone)
        # the pooled [CLS] of the image part is classified; padding does not count
        padded = torch.cat([stored, torch.zeros(2, 3, dtype=torch.int32)], 1)
        longer = MMBTModel(MMBTConfig(bert=bert, depth=18), _mmbt_specs(9), 3).eval()
        longer.load_state_dict(model.state_dict())
        torch.testing.assert_close(longer({"visual": images, "text": padded}).logits, out.logits)
        other = model({"visual": 255 - images, "text": stored}).logits
        assert not torch.allclose(other, out.logits)


def test_mmbt_loads_a_torchvision_file(bert: Path, tmp_path: Path) -> None:
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "r18.pth")
    model = MMBTModel(
        MMBTConfig(bert=bert, depth=18, pretrained=tmp_path / "r18.pth"), _mmbt_specs(), 3
    )
    torch.testing.assert_close(model.image[0].weight, net.conv1.weight)
    state["head.weight"] = state.pop("layer1.0.conv1.weight")
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(UserError, match=r"missing: layer1\.0\.conv1\.weight.*unexpected: head"):
        MMBTModel(MMBTConfig(bert=bert, depth=18, pretrained=tmp_path / "bad.pth"),
                  _mmbt_specs(), 3)  # fmt: skip


def test_mmbt_trains_and_refuses_methods_needing_modalities(bert: Path, tmp_path: Path) -> None:
    data = _image_text_data(bert, tmp_path)
    model = {"mmbt": {"bert": str(bert), "depth": 18, "embeds": 2}}
    Trainer(parse_recipe(_recipe(tmp_path, data, model), "test"), 0).run()
    assert (tmp_path / "runs" / "hf" / "seed0" / "best.pt").is_file()
    with pytest.raises(UserError, match="no per-modality features or logits for qmf"):
        parse_recipe(_recipe(tmp_path, data, model, method="qmf"), "test")
    with pytest.raises(UserError, match="two modalities"):
        MMBTModel(MMBTConfig(bert=bert, depth=18), [_spec()], 3)
