"""bench/gpu.py (`make bench-gpu`) stays in working order between the sessions that have a GPU:
a short run on the CPU provider, which takes every step but the CUDA-only variants."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"


@pytest.mark.e2e
def test_the_gpu_bench_runs_every_step_on_the_cpu(model_dir: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--provider", "cpu", "--model-dir", str(model_dir),
         "--duration", "0.2", "--sizes", "1,16", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "gpu.json").read_text())
    rows = {(r["section"], r["what"]): r for r in result["rows"]}
    for n in (1, 16):
        for what in ("CPU, session.run", "CPU, plain", "CPU, IO binding"):
            assert rows[(f"decoder in process, N={n}", what)]["value"] > 0
    for variant in ("plain", "IO binding"):  # CUDA graphs: CUDA only
        served = [rows[("decode, 1 image per call", f"{variant}, c={c}")] for c in (1, 16, 64)]
        served += [rows[(f"SampleStream {dt}", variant)] for dt in ("float32", "uint8")]
        served += [rows[("LogLikelihood K=1000", f"{variant}, c={c}")] for c in (1, 4)]
        for r in served:
            assert r["value"] > 0 and r["ratio"] > 0 and r["errors"] == {}, r
    assert not any("CUDA graphs" in what for _, what in rows)
    assert result["meta"]["machine"].startswith("the CPU only (--provider cpu)")
    assert "| decode, 1 image per call | IO binding, c=64 |" in (tmp_path / "gpu.md").read_text()
