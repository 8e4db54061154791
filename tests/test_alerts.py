"""deploy/prometheus/alerts.yml: valid rules, read by the Prometheus config that Compose runs,
and each alert firing on its case and quiet otherwise, by promtool's rule unit tests
(tests/prometheus/alerts.test.yml: made-up series, Prometheus's own engine, no server)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from prometheus_client import CollectorRegistry

from prometheus_harness import DASHBOARD, PROMETHEUS_CONFIG, REPO_ROOT, need_module, need_tool
from vae_proto import vae_pb2
from vae_server.metrics import Metrics

ALERTS = REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = Path(__file__).parent / "prometheus" / "alerts.test.yml"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([need_tool("promtool"), *args], capture_output=True, text=True,
                          timeout=60)


def test_the_alert_rules_are_valid_and_the_config_reads_them():
    proc = promtool("check", "rules", str(ALERTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    yaml = need_module("yaml")
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert [PROMETHEUS_CONFIG.parent / f for f in config["rule_files"]] == [ALERTS]
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in mounts


def test_every_alert_fires_on_its_case_and_stays_quiet_otherwise():
    rules = need_module("yaml").safe_load(ALERTS.read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    tested = {t["alertname"] for case in need_module("yaml").safe_load(
        ALERT_TESTS.read_text())["tests"] for t in case["alert_rule_test"]}
    assert names == tested, f"alerts without a test: {names - tested}"
    proc = promtool("test", "rules", str(ALERT_TESTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_grpc_code_the_alerts_and_dashboard_name_is_one_the_server_counts():
    """A matcher on a grpc_code the server never uses matches nothing, silently: an alert on
    server faults that never fires. The values are go-grpc-prometheus's ("Unavailable")."""
    m = Metrics(CollectorRegistry(), gpu=False)
    m.initialize_grpc(vae_pb2.DESCRIPTOR.services_by_name["VaeService"])
    served = {s.labels["grpc_code"] for f in m.registry.collect() for s in f.samples
              if s.name == "grpc_server_handled_total"}
    named: dict[str, set[str]] = {}
    for path in (ALERTS, ALERT_TESTS, DASHBOARD, REPO_ROOT / "README.md"):
        for values in re.findall(r'grpc_code\s*(?:=~|!~|!=|=)\s*\\?"([^"\\]*)', path.read_text()):
            named.setdefault(path.name, set()).update(values.split("|"))
    assert len(named) == 4 and "Internal" in named["alerts.yml"], named
    unknown = {name: codes - served for name, codes in named.items() if codes - served}
    assert not unknown, unknown
