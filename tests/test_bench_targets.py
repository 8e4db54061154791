"""make bench's verdict on the benchmark targets (bench/run.py `targets`)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _run_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_run", BENCH / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_each_target_reads_its_row_and_says_met_or_missed() -> None:
    run = _run_module()
    ratios = [0.95, 0.59, 0.80, 0.88, 0.5]
    rows = [{"section": section, "what": what, "ratio": ratio}
            for (_, section, what, _), ratio in zip(run.TARGETS, ratios, strict=True)]
    rows.append({"section": "decode, 1 image per call", "what": "echo server, c=64",
                 "ratio": None})
    verdicts = run.targets(rows)
    assert [v["ratio"] for v in verdicts] == ratios
    assert [v["met"] for v in verdicts] == [True, False, True, True, False]
    assert [v["needs"] for v in verdicts] == [0.9, 0.6, 0.8, 0.8, 0.8]
    md = run.targets_markdown(verdicts)
    assert "| (a) single-image Decode, c=64, against the echo server | 0.9 | 0.95 | met |" in md
    assert md.count("| missed |") == 2
    # A row the run did not make (renamed, say) is "not measured", not a crash at the end.
    first = run.targets(rows[1:])[0]
    assert first["ratio"] is None and not first["met"]
    assert "| 0.9 | - | not measured |" in run.targets_markdown([first])


def test_interleaved_rounds_alternate_which_server_goes_first(monkeypatch) -> None:
    run = _run_module()
    calls: list[tuple[str, str, float, dict[str, object]]] = []

    def bench(target: str, method: str, duration: float, **kw: object) -> str:
        calls.append((target, method, duration, kw))
        return f"{target}{len(calls)}"

    monkeypatch.setattr(run, "bench", bench)
    a, b = run.interleaved("echo", "server", 3, "decode", 5.0, concurrency=64)
    assert [c[0] for c in calls] == ["echo", "server", "server", "echo", "echo", "server"]
    assert all(c[1:] == ("decode", 5.0, {"concurrency": 64}) for c in calls)
    # Each server's results in the order they were taken.
    assert a == ["echo1", "echo4", "echo5"] and b == ["server2", "server3", "server6"]


def test_a_row_taken_in_turns_lists_its_rounds_and_errors_in_the_markdown() -> None:
    run = _run_module()
    meta = {"date": "d", "machine": "m", "model_version": "v", "command": "make bench",
            "duration_s": 5.0, "event_loop": "uvloop", "ort_threads": 0, "ort_spinning": False,
            "instances": 2}
    row = {"section": "decode, 1 image per call", "what": run.INTERLEAVED_ROW, "value": 950.0,
           "unit": "calls/s", "limit": "echo c=64 in turns", "ratio": 0.95, "p50_ms": None,
           "p99_ms": None, "errors": {},
           "rounds": [{"echo": 1000.0, "server": 900.0}, {"echo": 1000.0, "server": 1050.0}]}
    md = run.markdown(meta, [row])
    assert f"{run.INTERLEAVED_ROW}: rounds, server / echo: 0.90, 1.05." in md
    row["errors"] = {"RESOURCE_EXHAUSTED": 3}
    assert "; errors: RESOURCE_EXHAUSTED 3." in run.markdown(meta, [row])
