"""Every benchmark still runs (`--quick`: tiny sizes, nothing written to bench/results) and
still prints the figures its results file and the README quote: the bench scripts import the
library's internals, so a refactor can break one silently. Speed is never asserted here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"

# bench -> keys its last-line JSON must have (the ones the README's performance table quotes)
EXPECTED = {
    "valuation": [
        f"{what}_over_eval_M{m}"
        for m in (2, 4, 6)
        for what in ("engine", "naive", "subsets", "subsets_games", "subsets_games_confidences")
    ],
    "methods": ["concat_epoch_s", "ogm_ge_over_concat", "machine"],
    "cooperation": ["modality_over_sample_valuation", "sample_valuation_over_concat_epoch"],
    "cmob_weak": ["results", "machine"],
    "loader": [
        f"{figure}.workers{w}"
        for figure in ("loader_samples_per_s", "trainer_samples_per_s", "data_wait_share_engine")
        for w in (0, 2)
    ],
    "loader_scale": [
        *(f"loader_samples_per_s.workers{w}" for w in (0, 1, 2)),
        "loader_samples_per_s_per_worker.workers2",
        "step_samples_per_s",
        "step_source",
        "workers_needed",
        "workers_needed_at_cpu_rate",
    ],
    "prep": [
        f"{who}_{figure}"
        for who in ("mmval", "reference")
        for figure in ("clips_per_s", "cpu_ms_per_clip", "peak_mib_per_worker", "parent_peak_mib")
    ]
    + ["decode_limit_clips_per_s", "fraction_of_decode_limit", "cpu_fraction_of_decode_limit"],
    "startup": [  # --quick: the 10-run report only
        f"commands.{command}.{key}"
        for command in ("import_torch", "help", "recipe_validate", "report_10")
        for key in ("seconds", "modules", "over_import_torch", "imports_torch")
    ],
}


def _has(figures: dict, dotted: str) -> bool:
    for key in dotted.split("."):
        if not isinstance(figures, dict) or key not in figures:
            return False
        figures = figures[key]
    return True


# bench -> why it cannot run on this machine (absent: it can)
CANNOT: dict[str, str] = {}
if shutil.which("ffmpeg") is None or sys.platform != "linux":
    CANNOT["prep"] = "the reference pipeline needs ffmpeg; memory is read from Linux's /proc"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bench_runs_and_prints_its_figures(name, tmp_path):
    if name in CANNOT:
        pytest.skip(CANNOT[name])
    results = sorted((BENCH / "results").glob("*.json"))
    before = {p: p.read_bytes() for p in results}
    done = subprocess.run(
        [sys.executable, str(BENCH / f"{name}.py"), "--quick"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["bench"] == name
    assert [key for key in EXPECTED[name] if not _has(figures, key)] == []
    assert {p: p.read_bytes() for p in results} == before  # --quick publishes nothing
