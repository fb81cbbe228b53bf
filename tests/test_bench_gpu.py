"""bench/gpu.py, the one-command GPU check, runs end to end on the CPU (`--quick`), so that it
is ready for the day a GPU is lent (slow: about a minute and a half on 2 cores)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu(tmp_path):
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
    assert result["device"] == "cpu"
    assert result["precision"]["fp32"]["fell"] and result["precision"]["bf16_channels_last"]["fell"]
    assert result["ogm_ge_bf16"]["coefficients_logged"]
    assert 0 <= result["data_wait_share"] <= 1
    assert result["distributed"]["finished"] and result["distributed"]["backend"] == "gloo"
    assert result["valuation"]["samples"] > 0
