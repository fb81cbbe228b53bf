"""bench/loader_scale.py runs end to end on tiny CREMA-D-layout data (`--quick`): the keys of its
JSON, not its speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "loader_scale.py"


def test_loader_scale_quick_run_reports_its_keys(tmp_path):
    published = BENCH.parent / "results" / "loader_scale.json"
    before = published.read_bytes() if published.exists() else None
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result["loader_samples_per_s"]) == {"workers0", "workers1", "workers2"}
    assert set(result["loader_samples_per_s_per_worker"]) == {"workers1", "workers2"}
    assert result["step_source"].startswith("published: https://")
    assert result["step_derivation"]["resnet50_over_concat_macs"] > 0
    assert isinstance(result["workers_needed"], int) and result["workers_needed"] >= 1
    assert set(result["macs"]["by_encoder"]) == {"visual", "audio"}
    assert result["macs"]["input_shapes"] == {"visual": [1, 224, 224, 3], "audio": [257, 188]}
    assert result["profile_one_worker"]["own_cpu_time_share"]
    assert isinstance(result["workers_needed_at_cpu_rate"], int)
    assert (published.read_bytes() if published.exists() else None) == before  # --quick writes none
