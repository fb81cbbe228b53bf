"""Test-time corruptions (`mmval value --corrupt MODALITY=KIND:LEVEL`): QMF's definitions
re-implemented independently on fixed tensors and texts, level 0 as the identity, the same draws
for the same (seed, repeat, sample), and the tables of every `mmval value` method under them."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from mmval.cli.main import app

import tests.image_text_raw as fake_raw
from mmval.data.corrupt import Corruption, blank_words, corrupt_inputs, draw_seed
from mmval.data.dataset import ParquetSamples
from mmval.data.extract.text import load_saved_tokenizer
from mmval.data.prep import prepare
from mmval.data.shards import ModalitySpec
from mmval.errors import UserError
from mmval.recipe import parse_recipe
from mmval.report.figures import find_value_tables
from mmval.report.runs import find_runs
from mmval.runner import Trainer
from mmval.valuation.config import ValuationConfig
from mmval.valuation.run import value_checkpoint, write_valuation
from mmval.valuation.subsets import subsets_checkpoint, write_subsets
from tests.test_subsets import checkpoint  # noqa: F401 (the fixture)
from tests.test_valuation_cli import invoke, runner

FRAMES = ModalitySpec(name="image", dtype="uint8", shape=[1, 32, 32, 3], encoding="jpeg")
VECTOR = ModalitySpec(name="vec", dtype="float32", shape=[64])
SPECS = {"image": FRAMES, "vec": VECTOR}


def _batch(n: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "image": torch.randint(0, 256, (n, 1, 32, 32, 3), generator=g, dtype=torch.uint8),
        "vec": torch.randn(n, 64, generator=g),
    }


def _apply(text: str, inputs: dict[str, torch.Tensor], seed: int = 0, repeat: int = 0):
    positions = torch.arange(len(inputs["vec"]))
    return corrupt_inputs(
        inputs, positions, [Corruption.parse(text)], SPECS, seed=seed, repeat=repeat
    )


@pytest.mark.parametrize("kind", ["gaussian", "salt-pepper", "mask"])
def test_level_zero_changes_nothing(kind):
    inputs = _batch()
    for modality in ("image", "vec"):
        out = _apply(f"{modality}={kind}:0", inputs)
        assert all(torch.equal(out[m], inputs[m]) for m in inputs)


def test_the_same_seed_gives_the_same_input_whatever_the_batch():
    inputs = _batch()
    whole = _apply("image=gaussian:10", inputs)["image"]
    assert torch.equal(whole, _apply("image=gaussian:10", inputs)["image"])
    half = corrupt_inputs(
        {m: x[32:] for m, x in inputs.items()},
        torch.arange(32, 64),
        [Corruption.parse("image=gaussian:10")],
        SPECS,
        seed=0,
        repeat=0,
    )["image"]
    assert torch.equal(half, whole[32:])
    assert not torch.equal(whole, _apply("image=gaussian:10", inputs, repeat=1)["image"])
    assert not torch.equal(whole, _apply("image=gaussian:10", inputs, seed=1)["image"])


def test_gaussian_is_qmfs_on_pixels():
    """QMF `AddGaussianNoise(variance=10 L)` under `RandomApply(p=0.5)`: N(0, 10 L) noise, one
    map [H, W, 1] for every channel, clipped and truncated to uint8 (both ends clipped here)."""
    level, inputs = 5.0, _batch()
    out = _apply(f"image=gaussian:{level:g}", inputs)["image"].numpy()
    for i, image in enumerate(inputs["image"].numpy()):
        g = torch.Generator().manual_seed(draw_seed(0, 0, i, 0))
        if float(torch.rand((), generator=g)) >= 0.5:
            assert np.array_equal(out[i], image)
            continue
        noise = torch.randn((1, 32, 32, 1), generator=g, dtype=torch.float64).numpy()
        expected = np.clip(image.astype(np.float64) + 10 * level * noise, 0, 255).astype(np.uint8)
        assert np.array_equal(out[i], expected)
    changed = (out != inputs["image"].numpy()).any(axis=(1, 2, 3, 4))
    assert 0.3 < changed.mean() < 0.7  # p = 0.5 per sample


def test_salt_pepper_is_qmfs_on_pixels():
    """`RandomApply(p=0.5)` of `AddSaltPepperNoise(density=0.1, p=L/100)`: 5 % pepper and 5 %
    salt at the same positions in every channel."""
    inputs = {m: x.repeat(8, *[1] * (x.dim() - 1)) for m, x in _batch().items()}
    out = _apply("image=salt-pepper:100", inputs)["image"]
    changed = (out != inputs["image"]).flatten(1).any(1)
    assert 0.35 < changed.float().mean() < 0.65  # 0.5 x 100/100
    hit = out[changed]
    salt = (hit == 255).all(-1).float().mean()
    pepper = (hit == 0).all(-1).float().mean()
    assert 0.04 < float(salt) < 0.07 and 0.04 < float(pepper) < 0.07
    rare = _apply("image=salt-pepper:10", inputs)["image"]
    assert (rare != inputs["image"]).flatten(1).any(1).float().mean() < 0.15  # 0.5 x 10/100


def test_salt_pepper_equals_qmfs_code_on_the_same_draws():
    """QMF's `AddSaltPepperNoise.__call__` written out with numpy, fed our generator's draws:
    `random.uniform(0, 1) < p`, then `np.random.choice((0, 1, 2), size=(h, w, 1), p=[d/2, d/2,
    1-d])` (a choice is the first index whose cumulative p exceeds the uniform), repeated over
    the channels, 0 -> pepper, 1 -> salt."""
    level, inputs = 60.0, _batch()
    out = _apply(f"image=salt-pepper:{level:g}", inputs)["image"].numpy()
    cumulative = np.cumsum([0.05, 0.05, 0.9])
    for i, image in enumerate(inputs["image"].numpy()):
        g = torch.Generator().manual_seed(draw_seed(0, 0, i, 0))
        applied = float(torch.rand((), generator=g)) < 0.5  # RandomApply(p=0.5)
        if not applied or float(torch.rand((), generator=g)) >= level / 100:
            assert np.array_equal(out[i], image)
            continue
        uniform = torch.rand((1, 32, 32, 1), generator=g).numpy()
        mask = np.repeat(np.searchsorted(cumulative, uniform, side="right"), 3, axis=-1)
        expected = image.copy()
        expected[mask == 0] = 0
        expected[mask == 1] = 255
        assert np.array_equal(out[i], expected)


def test_mask_covers_the_level_share_of_the_area_or_time():
    inputs = _batch()
    out = _apply("image=mask:25", inputs)["image"]
    zeroed = (out == 0).all(-1) & (inputs["image"] != 0).any(-1)
    assert ((out != inputs["image"]).any(-1) <= (out == 0).all(-1)).all()
    assert int(zeroed[0].sum()) <= 16 * 16 and int((out[0] == 0).all(-1).sum()) >= 16 * 16
    vec = _apply("vec=mask:50", inputs)["vec"]
    assert ((vec == 0).sum(1) >= 32).all()


def test_corruption_specs_and_refusals():
    assert str(Corruption.parse("image=gaussian:5")) == "image=gaussian:5"
    for bad in ("image", "image=blur:5", "image=mask:150"):
        with pytest.raises(UserError):
            Corruption.parse(bad)
    tokens = ModalitySpec(name="text", dtype="int32", shape=[8], encoding="tokens")
    with pytest.raises(UserError, match="text"):
        corrupt_inputs(
            {"text": torch.zeros(2, 8, dtype=torch.int32)},
            torch.arange(2),
            [Corruption.parse("text=gaussian:5")],
            {"text": tokens},
            seed=0,
            repeat=0,
        )


def test_the_subsets_table_under_corruption(checkpoint):  # noqa: F811
    clean = subsets_checkpoint(checkpoint).table
    level0 = subsets_checkpoint(checkpoint, corruptions=[Corruption.parse("a=gaussian:0")])
    pd.testing.assert_frame_equal(clean, level0.table)
    noisy = subsets_checkpoint(
        checkpoint, corruptions=[Corruption.parse("a=gaussian:10")], repeats=3, seed=4
    )
    assert sorted(noisy.table["repeat"].unique()) == [0, 1, 2]
    assert noisy.metadata["mmval.corruptions"] == '["a=gaussian:10"]'
    assert noisy.metadata["mmval.repeats"] == "3" and noisy.metadata["mmval.seed"] == "4"
    untouched = noisy.table[noisy.table["subset"] == "b+c"]
    for _, part in untouched.groupby("repeat"):  # a is not in the subset: nothing changes
        assert part["pred"].tolist() == clean[clean["subset"] == "b+c"]["pred"].tolist()
    unknown = invoke(checkpoint, "--method", "subsets", "--corrupt", "z=gaussian:5")
    assert unknown.exit_code == 2


# ---- blank: QMF's word blanking of a text modality, encoded again with the saved tokenizer ----

CLASSES = ["positive", "neutral", "negative"]


def _prep_text(root, name: str, overrides: list[str]):
    fake_raw.jsonl_layout(root / f"raw-{name}", CLASSES, {"train": 3, "val": 1, "test": 20}, "data")
    out = root / name
    prepare("mvsa-single", out, raw=root / f"raw-{name}", workers=1, overrides=overrides)
    return ParquetSamples(out, "test", ["visual", "text"])


@pytest.fixture(scope="module")
def posts(tmp_path_factory):
    """60 test posts "a photo of <class> number <i>", text in a word vocabulary without '_'."""
    return _prep_text(tmp_path_factory.mktemp("blank"), "word", ["image.size=[8,8]"])


def _blank(dataset, level: float, positions=None, seed: int = 0, repeat: int = 0, **kw):
    positions = torch.arange(len(dataset)) if positions is None else torch.as_tensor(positions)
    batch = dataset.__getitems__(positions.tolist())
    specs = {s.name: s for s in dataset.specs} | kw.pop("specs", {})
    corrupted = corrupt_inputs(
        batch.inputs,
        batch.index,
        [Corruption.parse(f"text=blank:{level:g}")],
        specs,
        seed=seed,
        repeat=repeat,
        dataset=dataset,
        **kw,
    )
    return batch.inputs["text"], corrupted["text"]


def qmf_blank(text: str, noise_level: float, rng) -> str:
    """QMF `JsonlDataset.__getitem__` (test mode, noise_level > 0), written out again: `rng`
    stands for `np.random`."""
    if rng.choice([0, 1], p=[0.5, 0.5]):
        wordlist = text.split(" ")
        for i in range(len(wordlist)):
            replace_p = 0.1 * noise_level
            if rng.choice([0, 1], p=[1 - replace_p, replace_p]):
                wordlist[i] = "_"
        text = " ".join(wordlist)
    return text


class Replay:
    """`np.random.choice(a, p=p)` as numpy computes it (the normalised cumulative p searched
    for one uniform, side right), the uniform taken from `uniform`."""

    def __init__(self, uniform) -> None:
        self.uniform = uniform

    def choice(self, a, p):
        cdf = np.cumsum(p)
        cdf /= cdf[-1]
        return a[int(np.searchsorted(cdf, self.uniform(1)[0], side="right"))]


@pytest.mark.parametrize("level", [1, 3, 5, 7, 10])
def test_blank_is_qmfs_loop_on_the_same_draws(level):
    """Our comparison of uniforms against QMF's np.random.choice, each fed the same stream (and
    `Replay`, which the next test uses, against numpy's own choice)."""
    text = "a  photo of the best apple pie , ever !"  # the double space makes an empty word
    blanked_any = 0
    for seed in range(200):
        expected = qmf_blank(text, level, np.random.RandomState(seed))
        assert qmf_blank(text, level, Replay(np.random.RandomState(seed).random_sample)) == expected
        ours = blank_words(text, level, np.random.RandomState(seed).random_sample)
        assert (ours if ours is not None else text) == expected
        blanked_any += ours is not None
    assert 60 < blanked_any < 140  # p = 0.5 per text


def test_blank_level_zero_changes_nothing(posts):
    stored, corrupted = _blank(posts, 0)
    assert torch.equal(stored, corrupted)


def test_blank_draws_per_seed_repeat_and_sample_whatever_the_batch(posts):
    _, whole = _blank(posts, 5)
    _, part = _blank(posts, 5, positions=[7, 3, 40, 41])
    assert torch.equal(part, whole[[7, 3, 40, 41]])
    assert torch.equal(whole, _blank(posts, 5)[1])
    assert not torch.equal(whole, _blank(posts, 5, repeat=1)[1])
    assert not torch.equal(whole, _blank(posts, 5, seed=1)[1])


def test_blank_encodes_the_blanked_text_again(posts):
    """Per sample: QMF's blanking on the uniforms of its (seed, repeat, sample, corruption)
    generator, encoded by the saved tokenizer, cut and padded to the stored length."""
    spec = posts.specs[1]
    tokenizer = load_saved_tokenizer(posts.root / spec.vocab_file)
    texts = posts.texts("text", range(len(posts)))
    stored, corrupted = _blank(posts, 4, seed=3, repeat=2)
    for i, text in enumerate(texts):
        g = torch.Generator().manual_seed(draw_seed(3, 2, i, 0))
        replay = Replay(lambda n, g=g: torch.rand(n, generator=g, dtype=torch.float64).numpy())
        expected_text = qmf_blank(text, 4, replay)
        ids = tokenizer.encode(expected_text)[: spec.shape[0]]
        expected = np.full(spec.shape, spec.pad_id)
        expected[: len(ids)] = ids
        assert corrupted[i].tolist() == expected.tolist(), text
        if expected_text == text:
            assert torch.equal(corrupted[i], stored[i])


def test_blank_at_level_ten_makes_every_word_unk_in_about_half_the_samples(posts):
    texts = posts.texts("text", range(len(posts)))
    noised = 0
    for seed in range(4):
        stored, corrupted = _blank(posts, 10, seed=seed)
        for i, text in enumerate(texts):
            if torch.equal(corrupted[i], stored[i]):
                continue
            noised += 1
            words = len(text.split(" "))
            assert (corrupted[i, :words] == 1).all()  # [UNK]: '_' is not in the vocabulary
            assert (corrupted[i, words:] == 0).all()  # [PAD]
    assert 0.4 < noised / (4 * len(texts)) < 0.6


def test_blank_with_wordpiece_gives_the_underscore_token(tmp_path):
    """BERT's tokenizer has '_' in its vocabulary: blanked words become '_', not [UNK]."""
    bert = tmp_path / "bert-vocab"  # not the prep's --out (a foreign folder is refused)
    bert.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "_", "a", "photo", "of", "number"]
    (bert / "vocab.txt").write_text("\n".join([*words, *CLASSES, *map(str, range(30))]) + "\n")
    tokenizer = f"text.tokenizer={{kind: hf, path: {bert}, max_length: 10}}"
    data = _prep_text(tmp_path, "bert", ["image.size=[8,8]", tokenizer])
    stored, corrupted = _blank(data, 10)
    changed = (corrupted != stored).any(1)
    assert changed.any()
    for row in corrupted[changed]:  # [CLS] _ _ _ _ _ _ [SEP] [PAD] [PAD]
        assert row.tolist() == [2, *[5] * 6, 3, 0, 0]


def test_blank_refusals(posts):
    with pytest.raises(UserError, match="at most 10"):
        Corruption.parse("text=blank:11")
    image = posts.__getitems__([0, 1]).inputs
    for text in ("visual=blank:5", "visual=blank:0"):
        with pytest.raises(UserError, match="blanks words"):
            corrupt_inputs(
                image,
                torch.arange(2),
                [Corruption.parse(text)],
                {s.name: s for s in posts.specs},
                seed=0,
                repeat=0,
                dataset=posts,
            )
    with pytest.raises(UserError, match="corrupt text with blank"):
        corrupt_inputs(
            image,
            torch.arange(2),
            [Corruption.parse("text=gaussian:5")],
            {s.name: s for s in posts.specs},
            seed=0,
            repeat=0,
        )
    unnamed = posts.specs[1].model_copy(update={"vocab_file": None})
    with pytest.raises(UserError, match="names no tokenizer"):
        _blank(posts, 5, specs={"text": unnamed})
    gone = posts.specs[1].model_copy(update={"vocab_file": "tokenizer-gone.json"})
    with pytest.raises(UserError, match=r"has no tokenizer-gone\.json"):
        _blank(posts, 5, specs={"text": gone})
    with pytest.raises(UserError, match="no column 'visual_text'"):
        posts.texts("visual", [0])


# ---- the contribution tables (shapley, shapley-mc, cmob) under corruptions ----


def test_shapley_under_corruption(checkpoint, tmp_path):  # noqa: F811
    clean = value_checkpoint(checkpoint).table
    level0 = value_checkpoint(checkpoint, corruptions=[Corruption.parse("a=gaussian:0")])
    assert level0.table.columns[0] == "repeat" and set(level0.table["repeat"]) == {0}
    pd.testing.assert_frame_equal(level0.table.drop(columns="repeat"), clean)

    noise = [Corruption.parse("a=gaussian:10")]
    config = ValuationConfig(benefit="prob")
    noisy = value_checkpoint(checkpoint, config=config, corruptions=noise, repeats=3, seed=4)
    assert noisy.metadata["mmval.corruptions"] == '["a=gaussian:10"]'
    assert (noisy.metadata["mmval.seed"], noisy.metadata["mmval.repeats"]) == ("4", "3")
    table = noisy.table
    assert table.columns[0] == "repeat" and len(table) == 3 * len(clean)
    parts = [p.drop(columns="repeat").reset_index(drop=True) for _, p in table.groupby("repeat")]
    assert not parts[0]["contribution"].equals(parts[1]["contribution"])
    again = value_checkpoint(checkpoint, config=config, corruptions=noise, repeats=3, seed=4)
    pd.testing.assert_frame_equal(again.table, table)
    # the same draws as the subsets table: v(full set) is its full-set p_true, repeat by repeat
    subsets = subsets_checkpoint(checkpoint, corruptions=noise, repeats=3, seed=4).table
    full = subsets[subsets["subset"] == "a+b+c"].set_index(["repeat", "sample_id"])["p_true"]
    v_full = table.drop_duplicates(["repeat", "sample_id"]).set_index(["repeat", "sample_id"])
    assert v_full["v_full"].to_numpy() == pytest.approx(full.loc[v_full.index].to_numpy())

    write_valuation(noisy, tmp_path / "wide.parquet", wide=True)
    wide = pd.read_parquet(tmp_path / "wide.parquet")
    assert list(wide.columns[:2]) == ["repeat", "sample_id"] and len(wide) == len(table) // 3
    by_pivot = table.pivot(index=["repeat", "sample_id"], columns="modality", values="contribution")
    assert wide[["a", "b", "c"]].to_numpy() == pytest.approx(by_pivot[["a", "b", "c"]].to_numpy())


def test_value_command_with_corruptions(checkpoint, tmp_path):  # noqa: F811
    out = tmp_path / "mc.parquet"
    args = ["--method", "shapley-mc", "--permutations", "4", "--seed", "3", "--out", out]
    result = invoke(checkpoint, *args, "--corrupt", "a=gaussian:10", "--repeats", "2")
    assert result.exit_code == 0, result.output
    meta = {k.decode(): v.decode() for k, v in pq.read_schema(out).metadata.items()}
    assert (meta["mmval.seed"], meta["mmval.repeats"], meta["mmval.permutations"]) == (
        "3",
        "2",
        "4",
    )
    table = pd.read_parquet(out)
    assert list(table.columns[:2]) == ["repeat", "sample_id"]
    assert sorted(table["repeat"].unique()) == [0, 1]
    clean = tmp_path / "clean.parquet"
    assert invoke(checkpoint, "--out", clean).exit_code == 0
    assert "repeat" not in pd.read_parquet(clean).columns
    cmob = invoke(
        checkpoint, "--method", "cmob", "--summary", "--corrupt", "b=mask:50", "--seed", "1"
    )
    assert cmob.exit_code == 0, cmob.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--corrupt", "a=blur:5"], "MODALITY=KIND:LEVEL"),
        (["--corrupt", "a=gaussian"], "MODALITY=KIND:LEVEL"),
        (["--corrupt", "z=gaussian:5"], "the model does not have"),
        (["--corrupt", "a=blank:5"], "blanks words"),
        (["--repeats", "2"], "pass --corrupt"),
        (["--seed", "2"], "shapley-mc only"),
        (["--method", "dcor", "--corrupt", "a=gaussian:5"], "--method dcor"),
    ],
)
def test_bad_corruptions_exit_2(checkpoint, args, message):  # noqa: F811
    result = invoke(checkpoint, "--summary", *args)
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output


def test_report_reads_tables_with_repeats(checkpoint, tmp_path):  # noqa: F811
    """A table valued under corruptions is drawn averaged over its repeats; a subsets table
    beside it is not a contribution table and is left to the robustness tables."""
    runs = tmp_path / "runs"
    shutil.copytree(checkpoint.parents[2], runs)
    noisy = value_checkpoint(
        runs / "abc" / "seed0" / "best.pt",
        corruptions=[Corruption.parse("a=gaussian:10")],
        repeats=2,
    )
    write_valuation(noisy, runs / "abc" / "seed0" / "noisy.parquet")
    write_valuation(noisy, runs / "noisy-wide.parquet", wide=True)
    write_subsets(subsets_checkpoint(checkpoint), runs / "subsets.parquet")  # no contributions
    tables = find_value_tables(find_runs(runs))
    assert len(tables) == 2
    mean = noisy.table.groupby(["sample_id", "modality"])["contribution"].mean()
    for found in tables:
        got = found.table.set_index(["sample_id", "modality"])["contribution"]
        assert len(got) == len(mean) and got.to_numpy() == pytest.approx(mean[got.index].to_numpy())
    figures = tmp_path / "figures"
    result = runner.invoke(app, ["report", str(runs), "--figures", str(figures)])
    assert result.exit_code == 0, result.output
    assert any(figures.glob("contribution-*.png"))


def test_blank_through_the_value_command(posts, tmp_path):
    """An image-text model valued with its text blanked: every method that takes --corrupt
    reads the stored text of the checkpoint's split."""
    raw = {
        "name": "it",
        "seeds": [0],
        "data": {"path": str(posts.root)},
        "model": {
            "encoders": {
                "visual": {"kind": "mlp", "hidden": [8], "out_dim": 4},
                "text": {"kind": "embedding_bag"},
            },
        },
        "train": {"epochs": 1, "batch_size": 16},
        "output": str(tmp_path / "runs"),
    }
    Trainer(parse_recipe(raw, "it"), 0).run()
    best = tmp_path / "runs" / "it" / "seed0" / "best.pt"
    blank = [Corruption.parse("text=blank:10")]
    config = ValuationConfig(benefit="prob")
    clean = value_checkpoint(best, config=config).table
    noisy = value_checkpoint(best, config=config, corruptions=blank, repeats=2, batch_size=7)
    text = noisy.table[noisy.table["modality"] == "text"]
    first = text[text["repeat"] == 0]["contribution"].to_numpy()
    assert not np.allclose(first, clean[clean["modality"] == "text"]["contribution"].to_numpy())
    assert not np.allclose(first, text[text["repeat"] == 1]["contribution"].to_numpy())
    out = tmp_path / "subsets.parquet"
    result = invoke(best, "--method", "subsets", "--corrupt", "text=blank:10", "--out", out)
    assert result.exit_code == 0, result.output
    full = pd.read_parquet(out).query("subset == 'visual+text'").set_index("sample_id")
    v_full = noisy.table[noisy.table["repeat"] == 0].drop_duplicates("sample_id")
    assert v_full["v_full"].to_numpy() == pytest.approx(
        full.loc[v_full["sample_id"], "p_true"].to_numpy()
    )
