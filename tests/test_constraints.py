"""constraints.txt, the versions `make setup` and the Docker images install: each pin meets
pyproject.toml's requirements, every package the project requires is pinned (but the GPU
extra's own, which the GPU image pins), and the packages of the interpreter running the tests
are the pinned versions, so that make test tests what the images ship."""

from __future__ import annotations

import re
import subprocess
from importlib import metadata

from conftest import REPO_ROOT, pyproject_project
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

CONSTRAINTS = REPO_ROOT / "constraints.txt"
# The gpu extra's packages that constraints.txt leaves out: `make lock` resolves the cpu extra,
# and the GPU image names its onnxruntime-gpu itself.
GPU_ONLY = {"onnxruntime-gpu", "nvidia-ml-py"}


def _pins() -> dict[str, Requirement]:
    pins: dict[str, Requirement] = {}
    for n, line in enumerate(CONSTRAINTS.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        assert re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.!+]+", line), \
            f"constraints.txt:{n}: {line!r} is not NAME==VERSION"
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name not in pins, f"constraints.txt:{n}: {req.name} pinned twice"
        pins[name] = req
    return pins


def _pinned_version(req: Requirement) -> Version:
    (spec,) = req.specifier
    return Version(spec.version)


def _project_requirements() -> list[Requirement]:
    project = pyproject_project()
    lines = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        lines += extra
    return [Requirement(line) for line in lines]


def test_every_pin_meets_the_projects_requirements_and_every_requirement_is_pinned():
    pins = _pins()
    assert "vae-serving" not in pins  # the project itself is installed from the checkout
    unpinned = []
    for req in _project_requirements():
        name = canonicalize_name(req.name)
        if name not in pins:
            unpinned.append(req.name)
            continue
        version = _pinned_version(pins[name])
        assert req.specifier.contains(version, prereleases=True), \
            f"constraints.txt pins {name} {version}, which pyproject.toml's {req} refuses: make lock"
    assert set(unpinned) <= GPU_ONLY, \
        f"pyproject.toml requires {sorted(set(unpinned) - GPU_ONLY)}, unpinned: make lock"


def test_the_packages_installed_are_the_pinned_versions():
    """make setup installs with -c constraints.txt: a pinned package installed at another
    version means the venv was set up without it (CONSTRAINTS=) or by hand. (A package not
    installed at all is not checked: a venv of fewer extras, or the gpu extra's, lacks some.)"""
    installed = {canonicalize_name(d.metadata["Name"]): d.version
                 for d in metadata.distributions()}
    pins = _pins()
    assert {"grpcio", "numpy", "protobuf"} <= installed.keys() & pins.keys()  # the base install
    differ = {name: (installed[name], str(_pinned_version(req)))
              for name, req in pins.items()
              if name in installed and not req.specifier.contains(Version(installed[name]),
                                                                   prereleases=True)}
    assert not differ, f"installed against pinned: {differ}; make setup applies constraints.txt"


def _setup_installs(*make_args: str) -> list[str]:
    """The pip installs of make's set-up rule, as `make -n` prints them (nothing is run)."""
    out = subprocess.run(["make", "-n", "-B", "setup", *make_args], cwd=REPO_ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [ln for ln in out.splitlines() if re.search(r"pip install -q (torch|-e )", ln)]


def test_make_setup_installs_under_the_constraints_unless_told_otherwise():
    pinned = _setup_installs()
    assert len(pinned) == 2, pinned  # torch, then the project with its extras
    assert all(" -c constraints.txt" in ln for ln in pinned), pinned
    unpinned = _setup_installs("CONSTRAINTS=")
    assert len(unpinned) == 2 and not any(" -c " in ln for ln in unpinned), unpinned
