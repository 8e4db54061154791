"""What the dashboard's panels show across several servers: their PromQL evaluated on series
made up for the case by promtool's rule unit tests (`promtool test rules`: Prometheus's own
engine, no server), with $__rate_interval as Grafana sets it for a short range."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from prometheus_harness import DASHBOARD, dashboard_queries, iter_panels, need_module, need_tool

SCRAPE = "15s"


def expr(panel: str, ref_id: str) -> str:
    found = [q.expr for q in dashboard_queries() if (q.panel, q.ref_id) == (panel, ref_id)]
    assert len(found) == 1, (panel, ref_id, found)
    return found[0]


def promtool_test(tmp_path: Path, series: dict[str, str], cases: list[dict[str, Any]]) -> None:
    """Evaluate each case's expression at its time on `series` (selector -> promtool's
    values notation, one value per scrape) and compare with its samples."""
    yaml = need_module("yaml")
    spec = {"rule_files": [], "evaluation_interval": SCRAPE, "tests": [{
        "interval": SCRAPE,
        "input_series": [{"series": s, "values": v} for s, v in series.items()],
        "promql_expr_test": [{"expr": c["expr"], "eval_time": c["at"],
                              "exp_samples": [{"labels": labels, "value": value}
                                              for labels, value in c["samples"]]}
                             for c in cases]}]}
    path = tmp_path / "panels.test.yml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    proc = subprocess.run([need_tool("promtool"), "test", "rules", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def panel(title: str) -> dict[str, Any]:
    dash = json.loads(DASHBOARD.read_text())
    (found,) = [p for p in iter_panels(dash["panels"]) if p.get("title") == title]
    return found


def threshold_colour(p: dict[str, Any], value: float) -> str:
    steps = p["fieldConfig"]["defaults"]["thresholds"]["steps"]
    colour = steps[0]["color"]
    for step in steps[1:]:
        if value >= step["value"]:
            colour = step["color"]
    return colour


def test_queue_depth_now_and_peak_are_both_of_the_fullest_server(tmp_path):
    # Each server has its own queue and --max-queue-images. "now" summed the servers while
    # "peak" took the fullest: two servers at 300 each read now 600 against a peak of 300,
    # and a sum over the servers is compared with no limit.
    q = 'vae_queue_depth{job="vae-server", instance="%s", model="decoder"}'
    unsent = 'vae_stream_unsent_images{job="vae-server", instance="%s"}'
    promtool_test(tmp_path, {
        q % "a:8000": "300 300 300 300 300 300",
        q % "b:8000": "300 300 900 300 300 300",
        unsent % "a:8000": "0 0 100 0 0 0",
        unsent % "b:8000": "0 0 100 0 0 0",
    }, [
        {"expr": expr("Queue depth", "A"), "at": "75s", "samples": [('{model="decoder"}', 300)]},
        {"expr": expr("Queue depth", "B"), "at": "75s", "samples": [('{model="decoder"}', 900)]},
        {"expr": expr("Queue depth", "A"), "at": "30s", "samples": [('{model="decoder"}', 900)]},
        {"expr": expr("Queue depth", "C"), "at": "30s", "samples": [("{}", 100)]},
    ])


def test_workers_ready_is_red_while_any_server_is_short_of_workers(tmp_path):
    # A --workers server with a worker down reports NOT_SERVING. The stat summed the ready
    # workers of every server, green from 1: "3 ready / 4 configured" showed green.
    w = 'vae_workers{job="vae-server", instance="%s", state="%s"}'
    promtool_test(tmp_path, {
        w % ("a:8000", "ready"): "2 1 2",
        w % ("a:8000", "configured"): "2 2 2",
        w % ("b:8000", "ready"): "2 2 2",
        w % ("b:8000", "configured"): "2 2 2",
    }, [
        {"expr": expr("Workers ready", "A"), "at": "15s", "samples": [("{}", 0.5)]},
        {"expr": expr("Workers ready", "A"), "at": "30s", "samples": [("{}", 1)]},
        {"expr": expr("Workers ready", "B"), "at": "15s", "samples": [("{}", 4)]},
    ])
    stat = panel("Workers ready")
    assert threshold_colour(stat, 0.5) == "red"
    assert threshold_colour(stat, 1.0) == "green"


def test_calls_received_and_not_taken_are_per_server_and_never_negative(tmp_path):
    # One server's event loop falls behind (30 more calls received than taken every 15 s)
    # while another works off a backlog (taking more than it receives): summed, the second
    # would hide the first; shown as it is, a loop catching up reads as negative rejections.
    received = 'vae_grpc_received_calls_total{job="vae-server", instance="%s"}'
    started = ('grpc_server_started_total{job="vae-server", instance="%s", '
               'grpc_service="vae.v1.VaeService", grpc_method="Sample", grpc_type="unary"}')
    promtool_test(tmp_path, {
        received % "behind:8000": "0+130x8",
        started % "behind:8000": "0+100x8",
        received % "catching-up:8000": "0+100x8",
        started % "catching-up:8000": "0+130x8",
    }, [{"expr": f'round({expr("Rejections by reason", "B")}, 0.5)', "at": "2m",
         "samples": [('{instance="behind:8000"}', 2),
                     ('{instance="catching-up:8000"}', 0)]}])
