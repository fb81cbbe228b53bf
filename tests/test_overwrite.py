"""--overwrite deletes only what mmval wrote, and mmval writes only into its own folders (issue 19:
`mmval prep --overwrite` deleted every `*/part-*.parquet` one level down and every part folder;
`mmval train --overwrite` deleted a foreign folder, and without the flag appended to its
train.log)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mmval.cli.main import app
from typer.testing import CliRunner

from mmval.data.prep import prepare
from mmval.data.shards import check_data_dir
from mmval.errors import UserError
from mmval.recipe import load_recipe
from mmval.runner import Trainer

runner = CliRunner()
SMALL = ["modalities=[a,b]", "dims=[4,4]", "per_class={train: 6, val: 2, test: 2}"]


def foreign(folder: Path, names: list[str]) -> dict[Path, bytes]:
    """Write the user's own files below `folder`; return their contents to compare with."""
    files = {}
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"the user's {name}".encode())
        files[path] = path.read_bytes()
    return files


def survived(files: dict[Path, bytes]) -> bool:
    return all(path.is_file() and path.read_bytes() == data for path, data in files.items())


def test_prep_overwrite_keeps_the_users_files_in_a_data_folder(tmp_path):
    out = tmp_path / "data"
    prepare("synthetic", out, overrides=SMALL)
    kept = foreign(out, ["notes.txt", "other/part-00000.parquet", "train/mine.parquet"])
    result = prepare("synthetic", out, overrides=[*SMALL, "seed=3"], overwrite=True)
    assert result.wrote and survived(kept)
    assert check_data_dir(out, verify_checksums=True).extraction["settings"]["params"]["seed"] == 3


def test_prep_overwrite_refuses_a_part_folder_that_holds_no_mmval_part(tmp_path):
    out = tmp_path / "data"
    prepare("synthetic", out, overrides=SMALL)
    kept = foreign(out, ["part-00000-of-00002/readme.txt", "part-00001-of-00002/x/part-1.parquet"])
    with pytest.raises(UserError, match="part-00000-of-00002") as refused:
        prepare("synthetic", out, overrides=SMALL, overwrite=True)
    assert "hold no mmval data" in str(refused.value)
    assert survived(kept) and (out / "manifest.json").is_file()


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("manifest", [False, True])
def test_prep_refuses_a_folder_that_is_not_a_data_folder(tmp_path, overwrite, manifest):
    out = tmp_path / "mine"
    names = ["notes.txt", "a/part-00000.parquet", *(["manifest.json"] if manifest else [])]
    kept = foreign(out, names)
    sets = [a for s in SMALL for a in ("--set", s)]
    result = runner.invoke(
        app, ["prep", "synthetic", "--out", str(out), *sets, *(["--overwrite"] * overwrite)]
    )
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "not an mmval data folder" in message and "--overwrite" not in message
    assert survived(kept) and sorted(p.name for p in out.iterdir()) == sorted(
        {name.split("/")[0] for name in names}
    )


def test_prep_into_an_empty_folder_and_a_part_overwrite_keep_foreign_files(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert prepare("synthetic", out, overrides=SMALL).wrote
    part = tmp_path / "parts" / "part-00000-of-00001"
    raw = tmp_path / "raw"
    from mmval.data.pipeline import PartSpec
    from mmval.data.synthetic_av import SyntheticAVParams, write_synthetic_raw

    params = SyntheticAVParams(
        layout="kinetics-sounds", classes=["0", "1"], clips_per_class=2, seconds=2.0
    )
    write_synthetic_raw(raw, params)
    sets = [
        "modalities.0.size=[32,32]",
        "modalities.0.pick=1",
        "modalities.1.target_frames=64",
        "modalities.1.num_mel_bins=32",
    ]
    spec = PartSpec(0, 1)
    prepare("kinetics-sounds", part.parent, raw=raw, workers=1, overrides=sets, part=spec)
    kept = foreign(part, ["notes.txt", "other/part-00000.parquet"])
    listed = json.loads((part / "manifest.json").read_text())["splits"]["train"]["shards"]
    prepare(
        "kinetics-sounds",
        part.parent,
        raw=raw,
        workers=1,
        overrides=sets,
        part=spec,
        overwrite=True,
    )
    assert survived(kept) and all((part / s["path"]).is_file() for s in listed)


def test_train_refuses_a_folder_that_is_not_a_run_folder(recipe_file, tmp_path):
    path = recipe_file(train__epochs=1)
    run = tmp_path / "runs/tiny/seed0"
    kept = foreign(run, ["train.log", "notes.txt", "model.pt"])
    for extra in ([], ["--overwrite"], ["--resume"]):
        result = runner.invoke(app, ["train", "--recipe", str(path), *extra])
        assert result.exit_code == 2, (extra, result.output)
        message = " ".join(result.output.split())
        assert "not an mmval run folder" in message and "--overwrite" not in message
        assert survived(kept) and sorted(p.name for p in run.iterdir()) == [
            "model.pt",
            "notes.txt",
            "train.log",
        ]


def test_train_overwrite_deletes_only_the_run_files(recipe_file, tmp_path):
    path = recipe_file(train__epochs=2)
    Trainer(load_recipe(path), 0).run()
    run = tmp_path / "runs/tiny/seed0"
    kept = foreign(run, ["notes.txt", "evaluate/mine.csv", "tb/readme.md", "sub/last.pt"])
    (run / "contrib_epoch9.parquet").write_bytes(b"an old run's contributions")
    again = load_recipe(path, ["train.epochs=1"])
    result = Trainer(again, 0, overwrite=True).run()
    assert not result.skipped and survived(kept)
    assert not (run / "contrib_epoch9.parquet").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["recipe"]["train"]["epochs"] == 1
    assert len((run / "train.log").read_text().splitlines()) == 1
