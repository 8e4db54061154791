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


def test_a_target_whose_load_or_limit_had_failed_calls_is_invalid() -> None:
    """Before: errors reached only bench.json, and the verdict ignored them: an echo server
    that failed half its calls read low as a limit, and the server's ratio to it high."""
    run = _run_module()
    rows = [{"section": section, "what": what, "ratio": 0.95, "errors": {}, "limit_errors": {}}
            for _, section, what, _ in run.TARGETS]
    rows[0]["limit_errors"] = {"UNAVAILABLE": 12}
    rows[1]["errors"] = {"RESOURCE_EXHAUSTED": 3}
    verdicts = run.targets(rows)
    assert [v["met"] for v in verdicts] == [False, False, True, True, True]
    assert [v["invalid"] for v in verdicts] == [True, True, False, False, False]
    assert run.targets_markdown(verdicts).count("| 0.95 | invalid: calls failed |") == 2


def test_a_row_prints_its_errors_and_its_limits_and_no_percentiles_of_a_few_calls(capsys):
    """A stream load's calls are whole streams, a few per measurement: before, the "p99" of
    three was printed (their maximum), and a row's failed calls were not printed at all."""
    from vae_client.bench import BenchResult

    run = _run_module()

    def result(calls: int, errors: dict[str, int]) -> BenchResult:
        return BenchResult("stream", "closed", 1, None, 1024, 5.0, calls, calls * 1024,
                           calls / 5.0, calls * 1024 / 5.0,
                           {"p50": 2000.0, "p90": 2100.0, "p99": 2190.0, "max": 2200.0,
                            "mean": 2000.0}, errors)

    rows: list[dict] = []
    run.add_row(rows, "s", "few", 600.0, "images/s", 1000.0, "x", result(3, {}))
    run.add_row(rows, "s", "many", 600.0, "images/s", 1000.0, "x",
                result(run.MIN_LATENCY_CALLS, {"UNAVAILABLE": 2}),
                limit_errors={"CANCELLED": 1})
    few, many = capsys.readouterr().out.splitlines()
    assert rows[0]["p50_ms"] is None and rows[0]["p99_ms"] is None and "p99" not in few
    assert rows[1]["p99_ms"] == 2190.0 and "p99 2190.00 ms" in many
    assert many.endswith("errors: UNAVAILABLE 2; limit's errors: CANCELLED 1"), many
    md = run.markdown({"date": "d", "machine": "m", "model_version": "v", "command": "c",
                       "duration_s": 5.0, "event_loop": "uvloop", "ort_threads": 0,
                       "ort_spinning": False, "instances": 2}, rows)
    assert "| errors: UNAVAILABLE 2; limit's errors: CANCELLED 1 |" in md


def test_rounds_taken_in_turns_give_the_median_of_their_ratios() -> None:
    """Before: the ratio of the two sides' medians, which can pair one round's figure with
    another round's: here 1000 / 1000 = 1.00 where every round read 0.90 or less."""
    run = _run_module()
    ratio, ratios = run.median_ratio([1000.0, 1200.0, 800.0], [900.0, 1000.0, 700.0])
    assert ratios == [0.9, 1000.0 / 1200.0, 700.0 / 800.0]
    assert ratio == 700.0 / 800.0
    # A round whose every echo call failed has no ratio, nor has the median: before the
    # review, a ZeroDivisionError ended the run with nothing written.
    assert run.median_ratio([1000.0, 0.0], [900.0, 950.0]) == (None, [0.9, None])
    verdict = run.targets([{"section": run.TARGETS[0][1], "what": run.TARGETS[0][2],
                            "ratio": None, "errors": {}, "limit_errors": {"UNAVAILABLE": 9}}])
    assert "| - | invalid: calls failed |" in run.targets_markdown(verdict[:1])


def test_a_server_that_exits_is_reported_with_its_output_not_waited_for() -> None:
    """Before: readiness was a connection, so a server that exited at once (a bad
    --model-dir) cost a minute and then a bare TimeoutError naming only its address."""
    import time

    import pytest

    run = _run_module()
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"exited with status 3 before serving:\nno model"):
        run.Process([sys.executable, "-c", "import sys; print('no model'); sys.exit(3)"])
    assert time.monotonic() - t0 < 30
