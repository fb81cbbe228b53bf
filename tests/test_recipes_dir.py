"""The shipped recipes (recipes/*.yaml), checked without their data: each one validates as
`mmval recipe validate` does (schema, then the method's and the model's cross-checks), also
against the modalities of the data set it names; every method has its uci-mfeat and
synthetic-av recipes; and the balancing methods have CREMA-D and Kinetics-Sounds recipes in the
published setting (SGD with momentum 0.9, ResNet-18 encoders). The bases in recipes/base/ are
no recipes of their own: each must be a base of some recipe."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from mmval.compose import compose_recipe
from mmval.data.manifest import load_dataset_manifest
from mmval.methods import METHODS
from mmval.recipe import Recipe, StepSchedule, load_recipe

RECIPES = Path(__file__).parents[1] / "recipes"
# sweep-*.yaml are sweeps (methods:, grid:), expanded and validated in test_sweep.py, search-*.yaml
# searches (search:), validated in test_search.py; the bases
# (recipes/base/) are checked through the recipes that name them
FILES = sorted(p for p in RECIPES.glob("*.yaml") if not p.stem.startswith(("sweep-", "search-")))
BASES = sorted((RECIPES / "base").glob("*.yaml"))


@pytest.fixture(autouse=True)
def weights_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    """The recipes of pretrained encoders name their weights through MMVAL_WEIGHTS."""
    monkeypatch.setenv("MMVAL_WEIGHTS", "/models")


# The baselines of the balancing literature, each with CREMA-D / Kinetics-Sounds recipes in its
# published setting; every method needs its uci-mfeat and synthetic-av recipes (over METHODS).
PAPER_METHODS = (
    "concat",
    "unimodal",
    "ogm_ge",
    "agm",
    "pmr",
    "mmcosine",
    "opm",
    "cml",
    "mmpareto",
    "relearning",
    "tmc",
    "qmf",
    "mla",
    "late_fusion",
    "gblending",
    "linear_probe",
    "ume",
    "umt",
    "mbsd",
    "lfm",
    "amco",
    "reconboost",
    "greedy",
)
PAPER_DATA = ("crema-d", "kinetics-sounds")
# the paper recipes whose official code trains with another optimizer than SGD
OWN_OPTIMIZER = {("opm", "kinetics-sounds"): "adamw"}  # BML_TPAMI2024 code/main.py


def header_commands(path: Path) -> str:
    """The recipe's comment lines, without '#', shell line continuations joined."""
    lines = path.read_text().splitlines()
    comments = [line.lstrip("#").strip() for line in lines if line.startswith("#")]
    return "\n".join(comments).replace("\\\n", " ")


def bases_of(path: Path) -> list[Path]:
    """The base files a recipe composes, its bases' bases included."""
    names = yaml.safe_load(path.read_text()).get("base", [])
    direct = [(path.parent / n).resolve() for n in ([names] if isinstance(names, str) else names)]
    return [p for base in direct for p in (base, *bases_of(base))]


def prepared_by(path: Path) -> dict[str, str]:
    """data directory -> data set, from the `mmval prep <dataset> ... --out <dir>` commands that
    the headers of the recipe and its bases show."""
    found = {}
    headers = "\n".join(header_commands(p) for p in (path, *bases_of(path)))
    for match in re.finditer(r"mmval prep (\S+)([^\n]*)", headers):
        out = re.search(r"(?:^|\s)--out\s+(\S+)", match.group(2))
        if out:
            found[out.group(1)] = match.group(1)
    return found


def data_set_of(path: Path) -> str:
    """The built-in data set a recipe trains on: data.dataset, or the data set whose prep
    command in the headers of the recipe or its bases writes data.path."""
    data = compose_recipe(path)["data"]
    if data.get("dataset"):
        return str(data["dataset"])
    outputs = prepared_by(path)
    assert str(data["path"]) in outputs, (
        f"{path.name}: no header of it or its bases shows `mmval prep <dataset> ... --out "
        f"{data['path']}`"
    )
    return outputs[str(data["path"])]


def manifest_modalities(name: str) -> list[str] | None:
    """The modality names a data manifest declares, where it lists them (None otherwise)."""
    manifest, _ = load_dataset_manifest(name)
    if manifest.modalities:
        return [m.name for m in manifest.modalities]
    entries = manifest.params.get("modalities")
    if not isinstance(entries, list):
        return None
    return [e if isinstance(e, str) else str(e["name"]) for e in entries]


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_recipe_validates(path: Path):
    recipe = load_recipe(path)
    modalities = manifest_modalities(data_set_of(path))
    if recipe.data.modalities is None and modalities is not None:
        # as the run sees it: the method's cross-checks against the data's modalities
        load_recipe(path, [f"data.modalities=[{', '.join(modalities)}]"])


@pytest.mark.parametrize("base", BASES, ids=[p.stem for p in BASES])
def test_every_base_is_used(base: Path):
    users = [p.name for p in RECIPES.glob("*.yaml") if base.resolve() in bases_of(p)]
    assert users, f"no recipe names recipes/base/{base.name}"
    assert isinstance(compose_recipe(base), dict)


def test_recipe_names_are_distinct():
    """Runs go to runs/<name>: two recipes with one name would share run folders."""
    names = [load_recipe(path).name for path in FILES]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("data", ["uci-mfeat", "synthetic-av"])
def test_every_method_has_small_recipes(method: str, data: str):
    if "classification" not in METHODS[method].Config.tasks:
        pytest.skip(f"{method} trains no classification task: its recipes use its task's data")
    path = RECIPES / f"{method}-{data}.yaml"
    assert path.is_file(), f"missing recipes/{path.name}"
    assert load_recipe(path).method.name == method


def paper_recipe(method: str, data: str) -> tuple[Path, Recipe]:
    path = RECIPES / f"{method}-{data}.yaml"
    assert path.is_file(), f"missing recipes/{path.name}"
    return path, load_recipe(path)


@pytest.mark.parametrize("method", PAPER_METHODS)
@pytest.mark.parametrize("data", PAPER_DATA)
def test_paper_recipes_use_the_published_setting(method: str, data: str):
    path, recipe = paper_recipe(method, data)
    assert recipe.method.name == method
    assert data_set_of(path) == data
    if (method, data) in OWN_OPTIMIZER:
        assert recipe.optim.name == OWN_OPTIMIZER[method, data]
    else:
        assert recipe.optim.name == "sgd" and recipe.optim.momentum == 0.9
    encoders = [recipe.model.encoder, *recipe.model.encoders.values()]
    assert all(e.kind == "resnet18" and e.pretrained is None for e in encoders)
    assert recipe.data.augment is not None, "training frames are augmented as the reference"
    assert f"mmval train --recipe recipes/{path.name}" in header_commands(path)


def test_paper_recipes_follow_each_official_code():
    """Spot checks of settings that differ from OGM-GE's, each against its official script."""
    for data in PAPER_DATA:
        for method, epochs in (("mmpareto", 50), ("relearning", 90)):  # MMPareto.py, ours.sh
            recipe = paper_recipe(method, data)[1]
            assert (recipe.optim.lr, recipe.optim.scheduler.name) == (0.002, "none")
            assert (recipe.train.batch_size, recipe.train.epochs) == (64, epochs)
    cosine = paper_recipe("mmcosine", "crema-d")[1]  # main_CD.py
    assert (cosine.train.batch_size, cosine.train.epochs) == (32, 200)
    assert cosine.model.fusion.name == "cosine"
    assert cosine.optim.scheduler == StepSchedule(step_size=100)
    assert paper_recipe("pmr", "crema-d")[1].train.epochs == 130  # bash.sh
    assert paper_recipe("ogm_ge", "crema-d")[1].method.alpha == 0.8  # README tip
    for data in PAPER_DATA:  # MLA's main.py QMF run: 0.1 * crl_loss
        assert paper_recipe("qmf", data)[1].method.rank_weight == 0.1
    adam = RECIPES / "pmr-adam-crema-d.yaml"  # PMR bash.sh: concat runs, --optimizer Adam
    pmr = load_recipe(adam)
    assert (pmr.optim.name, pmr.optim.lr, pmr.optim.weight_decay) == ("adam", 1e-3, 0.0)
    assert pmr.optim.scheduler.name == "none" and pmr.train.epochs == 130
    assert data_set_of(adam) == "crema-d" and "modalities.0.pick=3" in header_commands(adam)
    opm = paper_recipe("opm", "kinetics-sounds")[1]  # BML_TPAMI2024 code/main.py, config.py
    assert (opm.optim.lr, opm.optim.weight_decay) == (5e-5, 0.01)
    assert opm.optim.scheduler == StepSchedule(step_size=40)
    assert (opm.train.batch_size, opm.train.epochs) == (32, 100)
