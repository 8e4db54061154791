"""Helpers for the monitoring tests: a real Prometheus server on loopback, the queries of
the Grafana dashboard, and a short mixed load that gives every panel data.

The Prometheus binary is Debian's (`apt-get install prometheus`; .ci/run installs it). Where
it is missing, tests skip with the reason, except in CI (env CI set), where they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import math
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vae_client import AsyncVaeClient, VaeError
from vae_core.ports import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
DEPLOY = REPO_ROOT / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "vae-serving.json"
SERVER_JOB = "vae-server"  # the scrape job of deploy/prometheus/prometheus.yml
REJECT_REASONS = ("invalid", "queue_full", "deadline", "cancelled", "unauthenticated",
                  "shutting_down", "model_version")


# Where each program a test needs comes from (scripts/system-packages.sh installs the first).
TOOL_SOURCES = {"prometheus": "apt-get install prometheus; make test and .ci/run do it",
                "promtool": "apt-get install prometheus; make test and .ci/run do it",
                "kubectl": "kubectl with its built-in kustomize, as the machine image has it, "
                           "or Debian's kubernetes-client"}


def need_tool(name: str) -> str:
    """The path of a program the test needs: skip without it, but fail in CI."""
    path = shutil.which(name)
    if path is None:
        why = f"{name} is not installed ({TOOL_SOURCES.get(name, 'install it')})"
        if os.environ.get("CI"):
            pytest.fail(f"{why}, and CI must run this test")
        pytest.skip(why)
    return path


def need_module(name: str) -> Any:
    """Import a test-only dependency (the dev extra): skip without it, but fail in CI."""
    try:
        return importlib.import_module(name)
    except ImportError:
        why = f"python module {name!r} is not installed (pip install -e '.[dev]')"
        if os.environ.get("CI"):
            pytest.fail(f"{why}, and CI must run this test")
        pytest.skip(why)


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return reply.read().decode()


# -- the dashboard -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    ref_id: str
    expr: str

    @property
    def gpu(self) -> bool:
        return "vae_gpu_" in self.expr

    @property
    def workers(self) -> bool:
        """Series that only a server run with --workers has."""
        return "vae_worker" in self.expr


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


# Grafana's rate window: the larger of 4 scrape intervals (the datasource's timeInterval, 15 s)
# and the step plus one scrape interval. The tests' queries are instant, over a few minutes
# of data: 1 minute, what Grafana gives a range of up to about an hour.
RATE_INTERVAL = "$__rate_interval"
RATE_INTERVAL_HERE = "1m"


def dashboard_queries(path: Path = DASHBOARD) -> list[PanelQuery]:
    """The dashboard's PromQL, with $__rate_interval as Grafana sets it for a short range."""
    dash = json.loads(path.read_text())
    out = []
    for panel in iter_panels(dash["panels"]):
        for target in panel.get("targets", []):
            if target.get("expr"):
                out.append(PanelQuery(panel.get("title", ""), target.get("refId", ""),
                                      target["expr"].replace(RATE_INTERVAL, RATE_INTERVAL_HERE)))
    return out


# -- Prometheus --------------------------------------------------------------------------------


def scrape_config(metrics_port: int, interval: str = "1s") -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with its server job pointed at 127.0.0.1:PORT,
    scraping every `interval`: the same job name (the dashboard selects on it) and relabelling."""
    yaml = need_module("yaml")
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config.setdefault("global", {})
    config["global"]["scrape_interval"] = interval
    config["global"]["evaluation_interval"] = interval
    jobs = [j for j in config["scrape_configs"] if j["job_name"] == SERVER_JOB]
    assert jobs, f"{PROMETHEUS_CONFIG} has no job {SERVER_JOB!r}"
    job = dict(jobs[0])
    for key in [k for k in job if k.endswith("_sd_configs")]:  # DNS names of the compose network
        del job[key]
    job.pop("relabel_configs", None)  # they read the DNS discovery's labels
    job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"],
                              "labels": {"service": "vae-server"}}]
    job["scrape_interval"] = interval
    config["scrape_configs"] = [job]
    config.pop("rule_files", None)
    config.pop("alerting", None)
    return config


class Prometheus:
    """`prometheus` on 127.0.0.1 with a config and a TSDB in `workdir`."""

    def __init__(self, binary: str, config: dict[str, Any], workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "prometheus.yml"
        # JSON is YAML: no YAML writer needed.
        self.config_path.write_text(json.dumps(config, indent=2))
        self.log_path = workdir / "prometheus.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={self.config_path}",
             f"--web.listen-address=127.0.0.1:{self.port}",
             f"--storage.tsdb.path={workdir / 'data'}",
             "--storage.tsdb.retention.time=1h", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n"
                                   f"{self.log_path.read_text()}")
            with contextlib.suppress(OSError):
                http_get(f"{self.url}/-/ready", timeout=1.0)
                return
            time.sleep(0.1)
        raise TimeoutError(f"prometheus not ready after {timeout} s:\n{self.log_path.read_text()}")

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            body = json.loads(http_get(url))
        except urllib.error.HTTPError as err:  # 400 for a bad query: say which and why
            raise AssertionError(f"{path} {params}: {err.read().decode()}") from None
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query: the result vector (a list of {metric, value})."""
        data = self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def targets_up(self) -> bool:
        active = self.api("targets")["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)

    def wait_targets_up(self, timeout: float = 15.0) -> None:
        """Ready, and every target scraped successfully."""
        self.wait_ready()
        deadline = time.monotonic() + timeout
        while not self.targets_up():
            assert time.monotonic() < deadline, f"target not up: {self.api('targets')}"
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def has_finite_value(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(r["value"][1])) for r in result)


# -- the load ----------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What the load did: calls by outcome (status code names)."""

    outcomes: dict[str, int] = field(default_factory=dict)
    anomalies: int = 0

    def count(self, what: str) -> None:
        self.outcomes[what] = self.outcomes.get(what, 0) + 1


def rejected_counts(metrics_url: str) -> dict[str, float]:
    """vae_rejected_total by reason, read straight from the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    counts = {}
    for family in text_string_to_metric_families(http_get(metrics_url)):
        if family.name == "vae_rejected":
            for s in family.samples:
                if s.name == "vae_rejected_total":
                    counts[s.labels["reason"]] = s.value
    return counts


def gauge(metrics_url: str, name: str, **labels: str) -> float:
    """A sample of the server's /metrics: the first whose labels include `labels`, or 0."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(http_get(metrics_url)):
        for s in family.samples:
            if s.name == name and labels.items() <= s.labels.items():
                return s.value
    return 0.0


async def _expect_error(report: LoadReport, call: Any) -> None:
    try:
        await call
    except VaeError as err:
        report.count(err.code.name)
    else:
        report.count("OK")


async def cancelled_behind_a_long_run(c: AsyncVaeClient, metrics_url: str, report: LoadReport,
                                      big: np.ndarray, k_samples: int) -> None:
    """Start a long LogLikelihood call; once its rows are in the decoder's queue, a shorter
    one beside it, which its caller cancels once the server holds it (a call cancelled before
    the server has read it is never seen there). A small Decode would not do: it runs beside
    the long call at once, often before its cancellation."""
    long_run = asyncio.ensure_future(
        _expect_error(report, c.log_likelihood(big, k=k_samples, seed=7)))
    for _ in range(1000):  # until the run's rows are in the decoder's queue
        if long_run.done() or await asyncio.to_thread(gauge, metrics_url, "vae_queue_depth",
                                                      model="decoder") > 0:
            break
    queued = asyncio.ensure_future(c.log_likelihood(big[:32], k=k_samples, seed=8))
    for _ in range(1000):  # until the server handles both calls
        if queued.done() or await asyncio.to_thread(gauge, metrics_url,
                                                    "vae_in_flight_calls") >= 2:
            break
    queued.cancel()
    try:
        await queued
        report.count("OK")
    except asyncio.CancelledError:
        report.count("CANCELLED")
    except VaeError as err:
        report.count(err.code.name)
    await long_run


async def _mixed_load(target: str, metrics_url: str, seconds: float) -> LoadReport:
    """Decode, Encode, Sample, SampleStream, LogLikelihood (digits-like and noise images),
    GetModelInfo; invalid requests; a full queue; expired deadlines and cancelled calls."""
    report = LoadReport()
    rng = np.random.default_rng(0)
    # No retries: the load shows each outcome as the server gave it (a retried refusal of the
    # full queue would end OK).
    async with AsyncVaeClient(target, timeout=30, retries=0) as c:
        info = await c.info()
        k = info.latent_dim
        max_queue = info.batching.max_queue_images
        report.count("OK")

        async def ok(call: Any) -> Any:
            result = await call
            report.count("OK")
            return result

        # Traffic of every method, several calls at once so that batches form.
        end = time.monotonic() + seconds
        round_ = 0
        while round_ < 2 or time.monotonic() < end:
            round_ += 1
            z = rng.standard_normal((32, k), dtype=np.float32)
            digits = await ok(c.sample(64, seed=round_))
            noise = rng.random((8, 784), dtype=np.float32)
            calls = [ok(c.decode(z[i : i + 4])) for i in range(0, 32, 4)]
            calls += [ok(c.encode(digits[i : i + 8])) for i in range(0, 64, 8)]
            calls += [ok(c.sample(16, seed=round_ * 100 + i, dtype="uint8")) for i in range(4)]
            calls += [ok(c.log_likelihood(digits[:8], k=20, seed=round_)),
                      ok(c.log_likelihood(noise, k=20, seed=round_))]
            results = await asyncio.gather(*calls)
            report.anomalies += int(sum(r.anomaly.sum() for r in results[-2:]))
            chunks = [ch async for ch in c.sample_stream(2000, seed=round_, chunk_size=500)]
            assert sum(len(images) for _, images in chunks) == 2000
            report.count("OK")

        # Invalid requests: each is INVALID_ARGUMENT.
        await _expect_error(report, c.sample(0))
        await _expect_error(report, c.decode(np.zeros((2, k + 1), np.float32)))
        await _expect_error(report, c.log_likelihood(np.zeros((1, 784), np.float32), k=0))

        # A full queue: calls of more than half the queue's images each, at once; all but the
        # first find it full while the first is drained.
        per_image = 64
        big = rng.random((max_queue // (2 * per_image) + 1, 784), dtype=np.float32)

        async def attempt(reason: str, go: Any, tries: int, required: bool = True) -> None:
            for _ in range(tries):  # retried in case a burst drained before the next call came
                await go()
                if (await asyncio.to_thread(rejected_counts, metrics_url)).get(reason, 0) > 0:
                    return
            if required:
                raise AssertionError(
                    f"no vae_rejected_total{{reason={reason!r}}} after {tries} tries; the "
                    f"callers saw {report.outcomes}, the server counted "
                    f"{await asyncio.to_thread(rejected_counts, metrics_url)}")

        async def burst() -> None:
            await asyncio.gather(*(_expect_error(report, c.log_likelihood(big, k=per_image,
                                                                          seed=i))
                                   for i in range(6)))

        await attempt("queue_full", burst, 20)

        # A call queued behind a long scoring run that its caller gives up on.
        await attempt("cancelled", lambda: cancelled_behind_a_long_run(
            c, metrics_url, report, big, per_image), 20)
        # A deadline that passes while the server holds the call: a stream whose caller, once
        # it has its first chunk, pauses past its deadline. Its later chunks wait for the
        # caller (flow control, then the queue's room), so its handler is still running, on a
        # fast machine or a slow one. (A call queued behind a long run, as above, does not
        # do: how long that run lasts after the call arrives depends on the machine's speed,
        # and a deadline shorter than the call's trip is expired by the client alone.)
        await attempt("deadline", lambda: paused_past_deadline(c, report, 1.0), 3)
    return report


async def paused_past_deadline(c: AsyncVaeClient, report: LoadReport, timeout: float) -> None:
    """A SampleStream of more chunks than the queue holds, whose caller stops reading after
    its first chunk until `timeout` has passed."""
    try:
        async for _ in c.sample_stream(64 * 1024, seed=11, chunk_size=1024, dtype="uint8",
                                       timeout=timeout):
            await asyncio.sleep(2 * timeout)
    except VaeError as err:
        report.count(err.code.name)
    else:
        report.count("OK")


def mixed_load(target: str, metrics_url: str, seconds: float = 3.0) -> LoadReport:
    return asyncio.run(_mixed_load(target, metrics_url, seconds))

