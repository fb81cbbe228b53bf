"""bench/startup.py runs end to end on a 10-run tree (`--quick`) and reports every command's
time, module count and heavy imports (the keys, not the speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "startup.py"
RESULT = BENCH.parent / "results" / "startup.json"


def _written() -> int | None:
    return RESULT.stat().st_mtime_ns if RESULT.exists() else None


def test_startup_bench_reports_every_command(tmp_path):
    before = _written()
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result) == {"machine", "repeats", "commands"}
    commands = result["commands"]
    assert set(commands) == {"import_torch", "help", "recipe_validate", "report_10"}
    for measured in commands.values():
        assert {"seconds", "modules", "over_import_torch", "imports_torch"} <= set(measured)
    assert commands["import_torch"]["imports_torch"]
    assert commands["import_torch"]["over_import_torch"] == 1
    assert _written() == before  # --quick writes no results
