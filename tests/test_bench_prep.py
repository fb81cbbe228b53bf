"""bench/prep.py runs end to end on tiny clips (`--quick`: mmval prep, the ffmpeg reference, the
decode limit and the memory passes) and reports every figure, without touching bench/results."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "prep.py"
KEYS = {
    "mmval_clips_per_s",
    "reference_clips_per_s",
    "speedup_vs_reference",
    "decode_limit_clips_per_s",
    "fraction_of_decode_limit",
    "mmval_cpu_ms_per_clip",
    "reference_cpu_ms_per_clip",
    "decode_limit_cpu_ms_per_clip",
    "cpu_fraction_of_decode_limit",
    "mmval_peak_mib_per_worker",
    "reference_peak_mib_per_worker",
    "mmval_parent_peak_mib",
    "reference_parent_peak_mib",
    "mmval_peak_mib_total",
    "reference_peak_mib_total",
    "reference_ffmpeg_peak_rss_mib",
}


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="the reference needs ffmpeg")
@pytest.mark.skipif(sys.platform != "linux", reason="memory is read from Linux's /proc")
def test_prep_bench_quick_reports_every_figure(tmp_path: Path) -> None:
    results = BENCH.parent / "results" / "prep.json"
    before = results.read_bytes() if results.is_file() else None
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--workers", "2"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result.keys() >= KEYS
    assert result["clips"] == 4 and result["workers"] == 2
    assert all(result[k] > 0 for k in KEYS)
    assert (results.read_bytes() if results.is_file() else None) == before
