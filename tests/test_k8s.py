"""The Kubernetes manifests (deploy/k8s): they render with kubectl's kustomize, validate
strictly against every Kubernetes version from 1.29 to the newest kubernetes-validate knows,
agree with themselves and with the server (ports, probes, labels, the drain), and the
autoscaler's query returns a per-pod value from a real Prometheus scraping real servers."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import pyproject_project

from prometheus_harness import Prometheus, need_module, need_tool
from serving import served_process
from vae_client import VaeClient
from vae_core.ports import free_port
from vae_server.config import load_settings, unknown_variables
from vae_server.server import FINISH_SECONDS, LIVENESS

REPO_ROOT = Path(__file__).resolve().parents[1]
K8S = REPO_ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
OLDEST = (1, 29)


def render(overlay: str) -> list[dict[str, Any]]:
    yaml = need_module("yaml")
    kubectl = need_tool("kubectl")
    out = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def docs(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(request.param)


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind
             and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in found])
    return found[0]


def versions() -> list[str]:
    kv = need_module("kubernetes_validate")
    major, minor = (int(v) for v in kv.latest_version().split(".")[:2])
    assert (major, minor) >= OLDEST
    return [f"{major}.{m}.0" for m in range(OLDEST[1], minor + 1)]


def test_the_manifests_validate_strictly_for_every_version(docs):
    kv = need_module("kubernetes_validate")
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
            "ConfigMap"} <= kinds
    for version in versions():
        for d in docs:
            kv.validate(d, version, strict=True)  # raises on any error


def test_a_typo_fails_validation(docs):
    """The check can fail: an unknown field under strict validation."""
    kv = need_module("kubernetes_validate")
    bad = dict(one(docs, "Deployment"))
    bad["spec"] = {**bad["spec"], "replica": 3}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, versions()[-1], strict=True)


def test_selectors_labels_ports_and_probes_agree(docs):
    deployment = one(docs, "Deployment", "vae-serving")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    for service in (one(docs, "Service", "vae-serving"),
                    one(docs, "Service", "vae-serving-headless")):
        assert service["spec"]["selector"].items() <= labels.items()
    assert one(docs, "Service", "vae-serving-headless")["spec"]["clusterIP"] == "None"
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # A pod that is not ready serves nothing: it must not block node drains.
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"

    (server,) = pod["spec"]["containers"]
    env = {e["name"]: e["value"] for e in server["env"]}
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"grpc": int(env["VAE_PORT"]), "metrics": int(env["VAE_METRICS_PORT"])}
    for service in docs:
        if service["kind"] == "Service":
            # Only gRPC: the metrics port has no authentication, and Prometheus scrapes pods.
            assert [port["targetPort"] for port in service["spec"]["ports"]] == ["grpc"]
    # The probes ask the gRPC port, readiness and start-up the overall health (""), liveness
    # the service that stays SERVING through the drain.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == ports["grpc"], probe
    assert server["readinessProbe"]["grpc"]["service"] == ""
    assert server["startupProbe"]["grpc"]["service"] == ""
    assert server["livenessProbe"]["grpc"]["service"] == LIVENESS
    # A busy pod answers health late (the check waits behind the calls in gRPC): readiness
    # allows seconds and two misses, not Kubernetes' default 1 s and one miss, which would
    # take every pod of a burst out of the Services together.
    readiness = server["readinessProbe"]
    assert readiness.get("timeoutSeconds", 1) >= 2 and readiness["failureThreshold"] >= 2
    # Prometheus finds the metrics port by the pod's annotations.
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    # Every VAE_ variable is a setting the server takes, with a valid value, and Kubernetes
    # adds none of its own (VAE_SERVING_SERVICE_HOST, for the Service vae-serving).
    assert pod["spec"]["enableServiceLinks"] is False
    variables = {k: v for k, v in env.items() if k.startswith("VAE_")}
    assert unknown_variables(variables) == []
    load_settings([], env=variables)


def test_the_grace_period_covers_the_whole_drain(docs):
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    env = {e["name"]: e["value"] for e in server["env"]}
    command = server["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    drain = (float(command[1]) + float(env["VAE_DRAIN_DELAY_S"]) + float(env["VAE_GRACE_SECONDS"])
             + FINISH_SECONDS)
    assert pod["terminationGracePeriodSeconds"] >= drain + 5, drain  # 5 s to spare


def test_the_pods_run_non_root_read_only_with_limits_and_a_versioned_model(docs):
    spec = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    for container in spec["containers"] + spec["initContainers"]:
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
        assert {"cpu", "memory"} <= container["resources"]["limits"].keys()
    (model,) = spec["initContainers"]
    # The model comes from an image tagged with a model version, never trained in the pod.
    assert re.fullmatch(r"vae-serving-model:[0-9a-f]{16}", model["image"]), model["image"]
    # ... and that version is the default model's, whose figures EVAL.md gives (the tag was
    # left at a model two defaults old once).
    default = json.loads((REPO_ROOT / "docs" / "eval" / "eval-k1000.json").read_text())
    assert model["image"] == f"vae-serving-model:{default['model_version']}"
    assert "vae-export" not in " ".join(model["command"])
    (server,) = spec["containers"]
    mounts = {m["mountPath"]: m for m in server["volumeMounts"]}
    env = {e["name"]: e["value"] for e in server["env"]}
    assert mounts[env["VAE_MODEL_DIR"]]["readOnly"] is True
    # The init container copies the model into the volume the server reads it from.
    (into,) = model["volumeMounts"]
    assert into["name"] == mounts[env["VAE_MODEL_DIR"]]["name"]
    assert model["command"][-1].rstrip("/") == into["mountPath"].rstrip("/")
    # On a read-only root, the server's one writable place: ONNX Runtime loads the models
    # through a temporary file ("No usable temporary directory found" without it).
    assert mounts["/tmp"].get("readOnly") is not True
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    # The user the images create (runAsNonRoot refuses to start uid 0).
    for dockerfile in ("server.Dockerfile", "server-gpu.Dockerfile"):
        text = (REPO_ROOT / "deploy" / "docker" / dockerfile).read_text()
        assert re.search(r"useradd .*--uid 10001\b", text), dockerfile
    assert spec["securityContext"]["runAsUser"] == 10001


def test_probes_give_a_start_and_a_stall_their_time(docs):
    """Kubernetes restarts a pod whose liveness fails, and one not started within the
    start-up probe's budget: neither may be quicker than a slow start or a busy moment."""
    (server,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    startup, liveness = server["startupProbe"], server["livenessProbe"]
    assert startup.get("periodSeconds", 10) * startup["failureThreshold"] >= 60
    assert liveness.get("failureThreshold", 3) >= 3
    assert liveness.get("timeoutSeconds", 1) >= 2


def test_each_overlay_is_what_its_name_says():
    """The GPU overlay asks for a GPU, CUDA and the GPU image, and tolerates GPU nodes; the
    CPU overlay none of these. (A check that a GPU goes with CUDA and the GPU image, the same
    for both, passed with the overlays swapped or a toleration gone.)"""
    for overlay, gpu in (("cpu", False), ("gpu", True)):
        pod = one(render(overlay), "Deployment")["spec"]["template"]["spec"]
        (server,) = pod["containers"]
        env = {e["name"]: e["value"] for e in server["env"]}
        resources = server["resources"]
        tolerations = [t["key"] for t in pod.get("tolerations", [])]
        if gpu:
            # A GPU a pod, asked for and limited alike (extended resources must be equal).
            assert resources["requests"]["nvidia.com/gpu"] == resources["limits"][
                "nvidia.com/gpu"] == "1"
            assert "nvidia.com/gpu" in tolerations and env["VAE_PROVIDER"] == "cuda"
            assert server["image"].startswith("vae-serving-server-gpu:")
        else:
            assert "nvidia.com/gpu" not in {**resources["requests"], **resources["limits"]}
            assert not tolerations and env.get("VAE_PROVIDER", "auto") != "cuda"
            assert server["image"].startswith("vae-serving-server:")


def test_the_autoscaler_alone_sets_the_replica_count(docs):
    """Before: the Deployment said `replicas: 2` beside the HPA, so every `kubectl apply -k`
    reset a scaled-out Deployment to 2 pods. The count is the HPA's, whose floor keeps a pod
    serving while the PodDisruptionBudget lets another go."""
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    hpas = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    assert hpas
    for hpa in hpas:
        target = hpa["spec"]["scaleTargetRef"]
        assert target["kind"] == "Deployment"
        assert "replicas" not in deployments[target["name"]]["spec"], target["name"]
        assert hpa["spec"]["minReplicas"] - one(docs, "PodDisruptionBudget")["spec"][
            "maxUnavailable"] >= 1
        assert hpa["spec"]["maxReplicas"] >= hpa["spec"]["minReplicas"]


def test_the_server_image_is_pinned_to_the_version_its_dockerfile_builds(docs):
    """Before: the overlays pinned vae-serving-server:0.1.0 while the documented builds made
    :latest, so the pods asked for an image no build gave. The tag is the project's version,
    and the build command in the image's Dockerfile makes exactly that image."""
    version = pyproject_project()["version"]
    (server,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    name, _, tag = server["image"].partition(":")
    assert tag == version, server["image"]
    dockerfile = Path("deploy/docker") / (name.removeprefix("vae-serving-") + ".Dockerfile")
    built = re.findall(rf"^#\s+docker build -f {re.escape(str(dockerfile))} -t (\S+) \.$",
                       (REPO_ROOT / dockerfile).read_text(), re.M)
    assert built == [server["image"]], (dockerfile, built)


def adapter_rules(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """prometheus-adapter's rules, by the name each gives its metric."""
    yaml = need_module("yaml")
    config = yaml.safe_load(one(docs, "ConfigMap", "vae-serving-adapter-rules")["data"]
                            ["config.yaml"])
    return {rule["name"]["as"]: rule for rule in config["rules"]}


def test_the_autoscaler_uses_the_adapter_s_metric(docs):
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", one(docs, "Deployment")
                                                ["metadata"]["name"])
    calls, loop, cpu = hpa["spec"]["metrics"]
    assert calls["type"] == loop["type"] == "Pods"
    assert [m["pods"]["metric"]["name"] for m in (calls, loop)] == list(adapter_rules(docs))
    # Before: a pod whose event loop was the limit (many small calls) scaled on neither: its
    # calls waited in gRPC, uncounted in flight, and its one loop used one core of two, short
    # of the CPU target. One loop must be able to reach the target: under a core.
    target = loop["pods"]["target"]
    assert target["type"] == "AverageValue"
    value = str(target["averageValue"])  # a quantity: "700m" or "0.7"
    cores = float(value[:-1]) / 1000 if value.endswith("m") else float(value)
    assert 0.5 <= cores < 0.9, value
    # Before: calls in flight alone, and a pod saturated by one SampleStream (1 call) or four
    # LogLikelihood calls at K = 1000 never scaled out. CPU against the request: the server
    # container must request CPU, and a utilisation target must be one a pod can reach.
    assert cpu["type"] == "Resource" and cpu["resource"]["name"] == "cpu"
    assert cpu["resource"]["target"]["type"] == "Utilization"
    assert 50 <= cpu["resource"]["target"]["averageUtilization"] <= 90
    (server,) = [c for c in one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
                 if c["name"] == "vae-server"]
    assert server["resources"]["requests"]["cpu"]


def test_the_adapter_query_gives_each_pod_its_load_from_a_real_prometheus(model_dir, tmp_path):
    """Two servers scraped as pods a and b of namespace test, under load; each adapter rule's
    query, as prometheus-adapter fills it in for the HPA, returns one value per pod."""
    binary = need_tool("prometheus")
    queries = {name: rule["metricsQuery"]
               .replace("<<.Series>>", re.match(r"\w+", rule["seriesQuery"]).group(0))
               .replace("<<.LabelMatchers>>", 'namespace="test",pod=~"a|b"')
               .replace("<<.GroupBy>>", "pod")
               for name, rule in adapter_rules(render("cpu")).items()}
    assert set(queries) == {"vae_in_flight_calls", "vae_event_loop_busy"}
    ports = {"a": free_port(), "b": free_port()}
    with served_process(model_dir, "--metrics-port", str(ports["a"])) as (a, _), \
            served_process(model_dir, "--metrics-port", str(ports["b"])) as (b, _):
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "scrape_configs": [{"job_name": "vae-server", "static_configs": [
                      {"targets": [f"127.0.0.1:{port}"],
                       "labels": {"namespace": "test", "pod": pod}}
                      for pod, port in ports.items()]}]}
        prom = Prometheus(binary, config, tmp_path / "prometheus")
        stop = threading.Event()

        def load(target: str) -> None:
            with VaeClient(target, timeout=60) as client:
                while not stop.is_set():
                    list(client.sample_stream(20_000, seed=1, chunk_size=500))

        threads = [threading.Thread(target=load, args=(t,), daemon=True)
                   for t in (a, a, a, b)]
        try:
            prom.wait_ready()
            for t in threads:
                t.start()
            deadline = time.monotonic() + 60
            values: dict[str, dict[str, float]] = {}
            while time.monotonic() < deadline:
                values = {name: {r["metric"].get("pod", ""): float(r["value"][1])
                                 for r in prom.query(query)}
                          for name, query in queries.items()}
                if all(set(v) == {"a", "b"} and all(x > 0 for x in v.values())
                       for v in values.values()):
                    break
                time.sleep(1)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
            prom.stop()
    calls, loop = values["vae_in_flight_calls"], values["vae_event_loop_busy"]
    assert set(calls) == set(loop) == {"a", "b"}, values
    # Three streams at a time on a, one on b: each pod's own load.
    assert calls["a"] > calls["b"] > 0, values
    assert 0 < loop["b"] < 1.5 and 0 < loop["a"] < 1.5, values  # cores: one loop each


def _relabel(labels: dict[str, str], rules: list[dict[str, Any]]) -> dict[str, str] | None:
    """Prometheus's relabelling (the actions the scrape job uses: keep, drop, replace), on one
    discovered target: its labels after, or None where it is dropped. Regexes are anchored, as
    Prometheus's are; these use nothing that RE2 and Python read differently."""
    labels = dict(labels)
    for rule in rules:
        action = rule.get("action", "replace")
        value = rule.get("separator", ";").join(labels.get(name, "")
                                                for name in rule.get("source_labels", []))
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        if action == "keep" and not match or action == "drop" and match:
            return None
        if action == "replace":
            if match:
                # $1 or ${1}: the regex's group, as Prometheus expands a replacement.
                template = re.sub(r"\$\{?(\d+)\}?", r"\\\1", rule.get("replacement", "$1"))
                labels[rule["target_label"]] = match.expand(template)
        elif action not in ("keep", "drop"):
            raise AssertionError(f"the test reads no relabel action {action!r}")
    return labels


def _discovered(pod: dict[str, Any], ip: str, phase: str = "Running") -> list[dict[str, str]]:
    """The targets Prometheus's Kubernetes discovery (role: pod) makes of a pod of the
    Deployment's template at `ip`: one per port of each container, at IP:PORT (an IPv6
    address in brackets), and one for each container without ports, at its address alone."""
    host = f"[{ip}]" if ":" in ip else ip

    def name(key: str) -> str:
        return re.sub(r"[^a-zA-Z0-9_]", "_", key)

    meta = {"__meta_kubernetes_namespace": "serving", "__meta_kubernetes_pod_name": "vae-1",
            "__meta_kubernetes_pod_ip": ip, "__metrics_path__": "/metrics",
            "__meta_kubernetes_pod_phase": phase}
    meta |= {f"__meta_kubernetes_pod_annotation_{name(k)}": v
             for k, v in pod["metadata"].get("annotations", {}).items()}
    meta |= {f"__meta_kubernetes_pod_label_{name(k)}": v
             for k, v in pod["metadata"]["labels"].items()}
    targets = []
    for init, key in ((True, "initContainers"), (False, "containers")):
        for container in pod["spec"].get(key, []):
            base = meta | {"__meta_kubernetes_pod_container_name": container["name"],
                           "__meta_kubernetes_pod_container_init": str(init).lower()}
            for port in container.get("ports", []):
                targets.append(base | {
                    "__address__": f"{host}:{port['containerPort']}",
                    "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
                    "__meta_kubernetes_pod_container_port_number": str(port["containerPort"])})
            if not container.get("ports"):
                targets.append(base | {"__address__": host})
    return targets


@pytest.mark.parametrize("ip", ["10.1.2.3", "fd00:10:244::5"])
def test_the_scrape_job_reaches_each_pod_s_metrics_port_once(docs, ip):
    """Before: the job rewrote __address__ to the annotation's port with a "host:port" regex
    that no IPv6 address matches: on an IPv6 cluster each pod's targets kept their own ports,
    and Prometheus scraped the gRPC port (down) and the init container's address. Now each pod
    is one target, its metrics port, on either family. (Targets whose labels end the same are
    one to Prometheus: on IPv4 the three targets of a pod were one.)"""
    yaml = need_module("yaml")
    scrape = yaml.safe_load(one(docs, "ConfigMap", "vae-serving-scrape")["data"]["scrape.yaml"])
    (job,) = scrape["scrape_configs"]
    pod = one(docs, "Deployment")["spec"]["template"]
    (server,) = pod["spec"]["containers"]
    metrics = next(p["containerPort"] for p in server["ports"] if p["name"] == "metrics")
    kept = [t for t in (_relabel(d, job["relabel_configs"]) for d in _discovered(pod, ip)) if t]
    host = f"[{ip}]" if ":" in ip else ip
    assert {t["__address__"] for t in kept} == {f"{host}:{metrics}"}
    assert kept[0]["__metrics_path__"] == pod["metadata"]["annotations"]["prometheus.io/path"]
    assert (kept[0]["namespace"], kept[0]["pod"]) == ("serving", "vae-1")
    # A pod that ended (its address may be another's by now), or not yet started: no target.
    for phase in ("Pending", "Succeeded", "Failed", "Unknown"):
        assert not [t for t in (_relabel(d, job["relabel_configs"])
                                for d in _discovered(pod, ip, phase)) if t], phase


def test_the_server_listens_on_both_address_families(docs):
    """Before: VAE_HOST=0.0.0.0, which left the metrics port IPv4 only (gRPC takes 0.0.0.0 as
    both): on an IPv6 cluster no scrape reached a pod. The server's default, [::], is both."""
    (server,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in server["env"]}
    assert load_settings([], env=env).host == "[::]"


def test_a_gpu_rollout_needs_no_spare_gpu(docs):
    """A rollout that adds a pod before it removes one (maxSurge 1) needs a free GPU: on a
    pool whose GPUs are all in use the new pod stayed Pending and the rollout stalled. The GPU
    Deployment replaces one pod at a time, the others serving (the autoscaler's floor of 2)."""
    deployment = one(docs, "Deployment")
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    if "nvidia.com/gpu" in server["resources"]["limits"]:
        assert (rolling["maxSurge"], rolling["maxUnavailable"]) == (0, 1)
        hpa = one(docs, "HorizontalPodAutoscaler")
        assert hpa["spec"]["minReplicas"] - rolling["maxUnavailable"] >= 1
    else:
        assert rolling["maxUnavailable"] == 0


def test_the_model_image_leaves_out_what_a_write_cut_short_leaves():
    """A `vae-export onnx` killed midway leaves its staging folder, `.export-*` (mode 0700),
    in models/default, and a killed write its part file: the model image copied them, and the
    init container, not root, could not copy a 0700 folder on, so no pod started. The
    .dockerignore's last matching line decides, as Docker reads it (these patterns have no
    `**`, so fnmatch reads them as Docker does)."""
    import fnmatch

    ignore = REPO_ROOT / "deploy" / "docker" / "model.Dockerfile.dockerignore"
    lines = [ln.strip() for ln in ignore.read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert all("**" not in ln for ln in lines)

    def sent(path: str) -> bool:
        verdict = True
        for line in lines:
            pattern, keep = (line[1:], True) if line.startswith("!") else (line, False)
            pattern = pattern.rstrip("/")
            if fnmatch.fnmatchcase(path, pattern) or path.startswith(pattern + "/"):
                verdict = keep
        return verdict

    assert sent("models/default/manifest.json") and sent("models/default/decoder.onnx")
    assert not sent("models/default/.export-k2j3h4/encoder.onnx")
    assert not sent("models/default/.manifest.json.1a2b3c4d.part")
    assert not sent("runs/default/checkpoint.pt")


def test_the_model_image_is_readable_by_the_init_container_s_user():
    """The exported files follow the umask (0600 under 077): copied into the image as they
    were, root's, the init container (uid 10001) could not read them."""
    text = (REPO_ROOT / "deploy" / "docker" / "model.Dockerfile").read_text()
    (copy,) = re.findall(r"^COPY\s.*$", text, re.M)
    mode = re.search(r"--chmod=([0-7]{3,4})\b", copy)
    assert mode and int(mode.group(1), 8) & 0o005 == 0o005, copy  # others: read, enter
