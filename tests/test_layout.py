"""The package boundaries of DESIGN.md: the server and the client never import the training
package (nor torch), and the client's base install needs no ONNX Runtime."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import pyproject_project

REPO_ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "server/vae_server": {"vae_export", "torch", "onnx", "onnxscript"},
    "client/vae_client": {"vae_export", "torch", "onnx", "onnxscript", "onnxruntime",
                          "vae_server"},  # ray and pyarrow: imported by bulk when it runs
    "core/vae_core": {"vae_export", "vae_server", "vae_client", "torch", "onnx", "grpc"},
}


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_module_imports_across_the_boundary(package):
    """Any import statement, top level or inside a function."""
    found = {str(p.relative_to(REPO_ROOT)): sorted(_imported_roots(p) & FORBIDDEN[package])
             for p in sorted((REPO_ROOT / package).rglob("*.py"))}
    assert not {f: names for f, names in found.items() if names}


IMPORTED = """
import json, sys
import {modules}
print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}})))
"""


@pytest.mark.parametrize(("modules", "absent"), [
    ("vae_server, vae_server.__main__, vae_server.server, vae_server.servicer",
     {"torch", "vae_export", "onnx"}),
    ("vae_client, vae_client.__main__, vae_client.bench, vae_client.images, vae_client.bulk",
     {"torch", "vae_export", "onnx", "onnxruntime", "vae_server", "ray", "pyarrow"}),
], ids=["server", "client"])
def test_importing_loads_neither_torch_nor_the_training_package(modules, absent):
    proc = subprocess.run([sys.executable, "-c", IMPORTED.format(modules=modules)],
                          capture_output=True, text=True, timeout=120, check=True)
    loaded = set(json.loads(proc.stdout))
    assert modules.split(",")[0] in loaded  # the import did happen
    assert not loaded & absent, sorted(loaded & absent)


def test_the_base_install_pulls_neither_ray_nor_onnxruntime_nor_torch():
    import re

    project = pyproject_project()
    names = {re.match(r"[A-Za-z0-9_.-]+", d).group(0).lower() for d in project["dependencies"]}
    assert names == {"grpcio", "protobuf", "numpy"}
    bulk = {re.match(r"[A-Za-z0-9_.-]+", d).group(0).lower()
            for d in project["optional-dependencies"]["bulk"]}
    assert bulk == {"ray", "pyarrow"}


def _make_run_plan(tmp_path: Path, model_dir: Path) -> str:
    """What `make run` would do (make -n) for the model directory `model_dir` and a run
    directory that does not exist."""
    import shutil

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    done = subprocess.run(["make", "-n", "run", f"MODEL_DIR={model_dir}",
                           f"RUN_DIR={tmp_path / 'no-run'}"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_make_run_trains_only_when_the_model_is_missing(tmp_path):
    """README: `make run` trains and exports the default model if missing. Before, it
    trained whenever the run's checkpoint was missing, even beside an exported model (the
    order-only prerequisite was still built when missing)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "manifest.json").write_text("{}")
    plan = _make_run_plan(tmp_path, model)
    assert "vae-export" not in plan, plan
    assert f"vae-server --model-dir {model}" in plan
    missing = _make_run_plan(tmp_path, tmp_path / "none")
    assert "vae-export train" in missing and "vae-export onnx" in missing, missing
