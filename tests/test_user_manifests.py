"""User data set manifests: `mmval prep my-data.yaml` with any built-in source, the manifest
schema, and refusals of bad manifests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from mmval.cli.main import app
from typer.testing import CliRunner

from mmval.data.dataset import ParquetSamples
from mmval.data.manifest import DatasetManifest, load_dataset_manifest, manifest_names
from mmval.data.prep import prepare
from mmval.data.shards import load_manifest
from mmval.data.sources import SOURCES
from mmval.errors import UserError
from mmval.recipe import DataConfig
from tests.test_prep_av import fake_raw

runner = CliRunner()
SMALL = ["modalities.0.size=[32,32]", "rows_per_shard=4"]


def _my_crema(path: Path) -> Path:
    """CREMA-D's manifest under another name: a new layout described in YAML alone."""
    entry = yaml.safe_load(
        (Path(__file__).parents[1] / "data_manifests" / "crema-d.yaml").read_text()
    )
    entry["name"] = "my-emotions"
    entry["description"] = "a CREMA-D-like layout described by a user"
    path.write_text(yaml.safe_dump(entry), encoding="utf-8")
    return path


def test_a_manifest_file_prepares_like_the_built_in_one(tmp_path):
    fake_raw(tmp_path / "raw", "crema-d", "crema-d")
    mine = _my_crema(tmp_path / "my-emotions.yaml")
    built_in = prepare("crema-d", tmp_path / "a", raw=tmp_path / "raw", overrides=SMALL).manifest
    result = runner.invoke(
        app,
        ["prep", str(mine), "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "b")]
        + [arg for s in SMALL for arg in ("--set", s)],
    )
    assert result.exit_code == 0, result.output
    user = load_dataset_manifest(str(mine))[0]
    prepared = load_manifest(tmp_path / "b")
    assert prepared.dataset == user.name == "my-emotions"
    assert prepared.classes == built_in.classes
    names = [m.name for m in built_in.modalities]
    for split in built_in.splits:
        a = ParquetSamples(tmp_path / "a", split, names)
        b = ParquetSamples(tmp_path / "b", split, names)
        assert a.sample_ids == b.sample_ids
        rows = list(range(len(a)))
        for name in names:
            assert np.array_equal(
                a.__getitems__(rows).inputs[name], b.__getitems__(rows).inputs[name]
            )
    config = DataConfig(dataset=str(mine), root=tmp_path / "root")
    assert config.directory() == tmp_path / "root" / "my-emotions"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"source": "nowhere"}, "source 'nowhere' is not one of mmval's sources"),
        ({"splits": {"strategy": "random"}}, "splits"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_manifests_exit_2_naming_the_field(tmp_path, change, message):
    path = _my_crema(tmp_path / "bad.yaml")
    entry = yaml.safe_load(path.read_text()) | change
    path.write_text(yaml.safe_dump(entry))
    result = runner.invoke(
        app, ["prep", str(path), "--raw", str(tmp_path), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "o").exists()


def test_missing_or_unreadable_manifest_files(tmp_path):
    with pytest.raises(UserError, match="no data set manifest file"):
        load_dataset_manifest(str(tmp_path / "absent.yaml"))
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    with pytest.raises(UserError, match="is not YAML"):
        load_dataset_manifest(str(tmp_path / "broken.yaml"))
    with pytest.raises(UserError, match="or a manifest file"):
        load_dataset_manifest("no-such-set")


def test_schema_lists_every_source_and_checks_params_per_source():
    result = runner.invoke(app, ["prep", "--schema"])
    assert result.exit_code == 0, result.output
    schema = json.loads(result.stdout)
    manifest = schema["$defs"][schema["$ref"].split("/")[-1]]
    assert set(manifest["properties"]) == set(DatasetManifest.model_fields)
    assert manifest["properties"]["source"]["enum"] == sorted(SOURCES)
    conditions = {c["if"]["properties"]["source"]["const"]: c["then"] for c in schema["allOf"]}
    assert set(conditions) == set(SOURCES)
    for name, then in conditions.items():
        target = then["properties"]["params"]["$ref"].split("/")[-1]
        assert set(schema["$defs"][target]["properties"]) == set(SOURCES[name].Params.model_fields)
    for name in manifest_names():  # every built-in manifest is an instance of it
        entry = load_dataset_manifest(name)[0]
        assert entry.source in manifest["properties"]["source"]["enum"]
