"""deploy/prometheus/alerts.yml: valid rules, read by the Prometheus config that Compose runs,
and each alert firing on its case and quiet otherwise, by promtool's rule unit tests
(tests/prometheus/alerts.test.yml: made-up series, Prometheus's own engine, no server)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from prometheus_harness import PROMETHEUS_CONFIG, REPO_ROOT, need_module, need_tool

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
