"""bench/soak.py (`make soak`) stays in working order: a run of a few seconds on the small
model, and its verdict on made-up failures."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType

import pytest

from vae_proto import vae_pb2

SOAK = Path(__file__).resolve().parents[1] / "bench" / "soak.py"


def _soak_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_soak", SOAK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


@pytest.mark.e2e
def test_a_short_soak_passes_and_writes_its_summary(model_dir: Path, tmp_path: Path) -> None:
    # Growth is not judged here: a few seconds are all warm-up for the allocator.
    proc = subprocess.run(
        [sys.executable, str(SOAK), "--model-dir", str(model_dir), "--minutes", "0.08",
         "--warmup", "1", "--concurrency", "4", "--rss-every", "0.5", "--report-every", "2",
         "--max-rss-growth", "1000", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "soak.json").read_text())
    assert summary["passed"] and not summary["failures"], summary["failures"]
    methods = {"Decode", "Encode", "Sample", "SampleStream", "LogLikelihood", "GetModelInfo"}
    assert set(summary["calls"]) == methods
    assert summary["ok"] == summary["calls"]  # every call answered OK
    assert sum(summary["calls"].values()) > 50
    assert summary["errors_by_code"] == {} and summary["internal"] == 0
    assert summary["lost"] == summary["duplicated"] == summary["hung"] == 0
    assert not any(summary["wrong"].values())
    rss = summary["rss_mb"]
    assert len(rss["samples"]) >= 3 and rss["after_warmup"] > 0 and rss["end"] > 0
    assert isinstance(rss["growth_pct"], float)
    assert summary["server_exit_status"] == 0
    # The run's times are its start and its end (both once said when the summary was written).
    started = datetime.fromisoformat(summary["started_at"])
    ended = datetime.fromisoformat(summary["ended_at"])
    assert (ended - started).total_seconds() >= 1 + 0.08 * 60 - 1
    md = (tmp_path / "soak.md").read_text()
    assert "**PASSED**" in md and "| SampleStream |" in md
    assert (tmp_path / "soak-server.log").is_file()


def _summary_args() -> argparse.Namespace:
    """The command line summarize reads, as soak.py's defaults give it."""
    return argparse.Namespace(minutes=1.0, concurrency=1, seed=0, target=None, model_dir="m",
                              max_rss_growth=5.0)


def test_the_verdict_names_each_failure() -> None:
    soak = _soak_module()
    t = soak.Tally()
    for method in ("Decode", "SampleStream"):
        t.started[method] += 3
        t.ended[method] += 3
    t.started["Encode"] += 1  # a call that never ended
    t.errors["Decode"]["INTERNAL"] += 1
    t.errors["Decode"]["DEADLINE_EXCEEDED"] += 1
    t.wrong["Sample"] += 2
    t.lost_chunks += 1
    t.duplicated_chunks += 1
    args = _summary_args()
    samples = [(0.0, 100.0), (1.0, 100.0), (2.0, 100.0), (3.0, 106.0), (4.0, 106.0),
               (5.0, 106.0)]
    r = soak.summarize(t, samples, 105.0, 6.0, 1.0, vae_pb2.ModelInfo(), args,
                       datetime.now(timezone.utc))
    text = "; ".join(r["failures"])
    assert not r["passed"]
    assert r["lost"] == 2 and "2 lost" in text  # the unended call and the missing images
    assert "1 duplicated" in text and "2 wrong" in text and "1 INTERNAL" in text
    assert "DEADLINE_EXCEEDED" in text
    assert r["rss_mb"]["growth_pct"] == 6.0 and "RSS grew by 6.0 %" in text
    assert "**FAILED**" in soak.markdown(r)


def test_replies_the_client_cannot_read_fail_the_soak() -> None:
    """Before: a reply that raised in the client (counted as error "client ValueError", say)
    was neither a status the verdict looked at nor a wrong reply, and the soak passed."""
    soak = _soak_module()
    t = soak.Tally()
    t.started["Decode"] += 2
    t.ended["Decode"] += 2
    t.errors["Decode"]["client ValueError"] += 1
    args = _summary_args()
    r = soak.summarize(t, [(0.0, 100.0)] * 6, 100.0, 6.0, 1.0, vae_pb2.ModelInfo(), args,
                       datetime.now(timezone.utc))
    assert not r["passed"]
    assert "1 replies the client could not read (client ValueError 1)" in "; ".join(r["failures"])
