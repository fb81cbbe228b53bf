"""bench/loader.py runs end to end on tiny Kinetics-Sounds-layout data (`--quick`): the keys of
its JSON, not its speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "loader.py"


def test_loader_quick_run_reports_its_keys(tmp_path):
    published = BENCH.parent / "results" / "loader.json"
    before = published.read_bytes()
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--device", "cpu"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("loader_samples_per_s", "trainer_samples_per_s", "plain_loop_samples_per_s"):
        assert set(result[key]) == {"workers0", "workers2"}, key
    assert set(result["workers2_over_workers0"]) == {"loader", "trainer"}
    assert all(0 <= share <= 1 for share in result["data_wait_share_plain_loop"].values())
    assert published.read_bytes() == before  # --quick writes nothing
