"""vae_core.prior: the model's p(z), sampled by index and scored, for N(0, I) and for a
class-labelled Gaussian mixture."""

from __future__ import annotations

import numpy as np
import pytest

import vae_core.prior
from vae_core.manifest import ManifestError
from vae_core.prior import BLOCK, GaussianMixture, PriorError, load_prior

K = 4


def mixture(classes: int = 3, per_class: int = 2, seed: int = 0, k: int = K) -> GaussianMixture:
    rng = np.random.default_rng(seed)
    c = classes * per_class
    a = rng.standard_normal((c, k, k)) * 0.3
    chols = np.linalg.cholesky(a @ a.transpose(0, 2, 1) + 0.2 * np.eye(k))
    weights = rng.random(c) + 0.5
    return GaussianMixture(weights / weights.sum(), rng.standard_normal((c, k)) * 3, chols,
                           np.repeat(np.arange(classes), per_class))


def test_the_standard_prior_draws_the_blocks_of_seeded_normals():
    """z of image i of seed s is row i % BLOCK of N(0, I) drawn by the generator (s, i // BLOCK):
    what every earlier server sent for the same seed."""
    prior = GaussianMixture.standard(K)
    z = prior.latents(7, 1000, 3000)
    blocks = np.concatenate([np.random.default_rng([7, b]).standard_normal((BLOCK, K),
                                                                            dtype=np.float32)
                             for b in range(4)])
    np.testing.assert_array_equal(z, blocks[1000:4000])
    assert prior.is_standard and prior.digits == []


@pytest.mark.parametrize("k", [K, 40])  # the stacked transform, and one product a component
def test_each_latent_is_its_components_mean_plus_its_factor_times_its_normals(k):
    """z_i = m_j + L_j eps_i, with eps_i the row of the block's seeded normals and j the
    component its seeded uniform picks, computed here row by row (both ways the prior
    computes it: small latents stacked, larger ones a product per component)."""
    prior = mixture(k=k, seed=3)
    z = prior.latents(9, 900, 100)  # rows 900 .. 999 of block 0
    eps = np.random.default_rng([9, 0]).standard_normal((1000, k), dtype=np.float32)[900:]
    u = np.random.default_rng([9, 0, 1]).random(1000)[900:]
    comp = np.minimum(np.searchsorted(np.cumsum(prior.weights), u, side="right"),
                      len(prior.weights) - 1)
    assert len(set(comp.tolist())) > 1
    want = np.stack([prior.means[j] + prior.chols[j] @ e.astype(np.float64)
                     for j, e in zip(comp, eps, strict=True)])
    np.testing.assert_allclose(z, want.astype(np.float32), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("digit", [None, 0, 2])
def test_any_range_is_the_same_images_whatever_the_split(digit):
    prior = mixture()
    whole = prior.latents(11, 500, 2600, digit)
    parts = [prior.latents(11, lo, hi - lo, digit)
             for lo, hi in ((500, 501), (501, 1024), (1024, 2100), (2100, 3100))]
    np.testing.assert_array_equal(whole, np.concatenate(parts))
    assert whole.dtype == np.float32 and whole.shape == (2600, K)


def test_a_digit_draws_from_its_own_components_only():
    prior = mixture(classes=3, per_class=2)
    for digit in prior.digits:
        z = prior.latents(3, 0, 4000, digit)
        # Each latent's most likely component belongs to the class asked for.
        per = np.stack([_component_log_prob(prior, j, z) for j in range(len(prior.weights))], 1)
        assert (prior.classes[per.argmax(1)] == digit).mean() > 0.97
    with pytest.raises(ValueError, match="digit 5"):
        prior.latents(3, 0, 10, 5)


def test_samples_follow_the_mixture():
    prior = mixture()
    z = prior.latents(5, 0, 60_000).astype(np.float64)
    mean = (prior.weights[:, None] * prior.means).sum(0)
    np.testing.assert_allclose(z.mean(0), mean, atol=0.05)


def _component_log_prob(prior: GaussianMixture, j: int, z: np.ndarray) -> np.ndarray:
    d = np.linalg.solve(prior.chols[j], (z.astype(np.float64) - prior.means[j]).T).T
    return (np.log(prior.weights[j]) - np.log(np.diag(prior.chols[j])).sum()
            - 0.5 * K * np.log(2 * np.pi) - 0.5 * (d * d).sum(1))


def test_log_prob_is_the_mixture_density():
    prior = mixture()
    z = np.random.default_rng(1).standard_normal((3, 50, K)).astype(np.float32) * 3
    per = np.stack([_component_log_prob(prior, j, z.reshape(-1, K))
                    for j in range(len(prior.weights))], 1)
    want = np.logaddexp.reduce(per, axis=1).reshape(3, 50)
    np.testing.assert_allclose(prior.log_prob(z), want, rtol=0, atol=1e-4)
    standard = GaussianMixture.standard(K)
    want_std = -0.5 * ((z.astype(np.float64) ** 2).sum(-1) + K * np.log(2 * np.pi))
    np.testing.assert_allclose(standard.log_prob(z), want_std, rtol=1e-12)


def test_log_prob_integrates_to_one():
    """The normalising constants, checked apart from the formula: a mixture on R^2 summed
    over a fine grid."""
    chols = np.array([[[0.5, 0.0], [0.3, 0.4]], [[1.0, 0.0], [-0.6, 0.7]]])
    prior = GaussianMixture(np.array([0.3, 0.7]), np.array([[-1.0, 0.5], [2.0, -1.0]]), chols,
                            np.array([0, 1]))
    step = 0.02
    axis = np.arange(-9, 9, step)
    grid = np.stack(np.meshgrid(axis, axis), -1)
    total = np.exp(prior.log_prob(grid)).sum() * step * step
    assert abs(total - 1.0) < 1e-3, total


def test_a_prior_file_round_trips_and_a_bad_one_is_refused(tmp_path):
    prior = mixture()
    prior.save(tmp_path / "prior.npz")
    manifest = {"files": {"prior.npz": {}}}
    loaded = load_prior(tmp_path, manifest, K)
    np.testing.assert_array_equal(loaded.latents(1, 0, 100, 1), prior.latents(1, 0, 100, 1))
    assert load_prior(tmp_path / "empty", {"files": {}}, K).is_standard
    with pytest.raises(PriorError, match="R\\^4"):
        load_prior(tmp_path, manifest, 8)
    whole = (tmp_path / "prior.npz").read_bytes()
    # Not a zip, and a zip cut short (a write interrupted): the second was a BadZipFile
    # traceback from `vae-export onnx`.
    for spoilt in (b"not a prior", whole[: len(whole) // 2], b""):
        (tmp_path / "prior.npz").write_bytes(spoilt)
        with pytest.raises(PriorError, match="not a prior file"):
            load_prior(tmp_path, manifest, K)
    with pytest.raises(PriorError, match="sum to 1"):
        GaussianMixture(np.array([0.5, 0.2]), np.zeros((2, K)), np.stack([np.eye(K)] * 2),
                        np.array([0, 1]))


def test_the_prior_kind_and_the_files_must_agree(tmp_path):
    """A manifest that says "mixture" without listing the prior file, or lists none while one
    lies beside it, is refused rather than served as N(0, I); a PriorError is a ManifestError,
    which the CLIs print as one line."""
    mixture().save(tmp_path / "prior.npz")
    listed = {"files": {"prior.npz": {}}}
    unlisted: dict = {"files": {}}
    assert not load_prior(tmp_path, {**listed, "prior": {"kind": "mixture"}}, K).is_standard
    with pytest.raises(ManifestError, match="prior kind 'mixture', but files has no entry"):
        load_prior(tmp_path, {**unlisted, "prior": {"kind": "mixture"}}, K)
    with pytest.raises(ManifestError, match="prior kind 'standard', but files lists"):
        load_prior(tmp_path, {**listed, "prior": {"kind": "standard"}}, K)
    for kind in ("standard", None):
        entry = {"prior": {"kind": kind}} if kind else {}
        with pytest.raises(ManifestError, match="lies in the model directory but the manifest "
                                                "does not list it"):
            load_prior(tmp_path, {**unlisted, **entry}, K)
    with pytest.raises(ManifestError, match="prior kind 'flow'"):
        load_prior(tmp_path, {**listed, "prior": {"kind": "flow"}}, K)
    assert issubclass(PriorError, ManifestError)


class _EdgeDraws:
    """A stand-in for keyed_rng: noise of zeros, and every uniform draw the largest double
    below 1 (1 - 2^-53), where a class's cumulative weights may end."""

    def __init__(self, *key: int) -> None:
        pass

    def standard_normal(self, shape: tuple[int, int], dtype: type) -> np.ndarray:
        return np.zeros(shape, dtype)

    def random(self, n: int) -> np.ndarray:
        return np.full(n, np.nextafter(1.0, 0.0))


@pytest.mark.parametrize("digit", [None, 0, 1])
def test_a_draw_at_the_end_of_a_class_stays_in_the_class(monkeypatch, digit):
    """Weights whose class sums, normalised, end at 1 - 2^-53: a draw there ran past the
    class's components, to the next class's (or, clipped, the last component of all)."""
    weights = np.array([0.2, 0.6, 0.2])
    classes = np.array([0, 0, 1])
    # The premise: class 0's cumulative weights end short of 1.
    w = np.where(classes == 0, weights, 0.0)
    assert np.cumsum(w / w.sum())[-1] == np.nextafter(1.0, 0.0)
    means = np.arange(3, dtype=np.float64)[:, None] * np.ones((3, K))
    prior = GaussianMixture(weights, means, np.stack([np.eye(K)] * 3), classes)
    monkeypatch.setattr(vae_core.prior, "keyed_rng", _EdgeDraws)
    z = prior.latents(0, 0, 3, digit)
    # Zero noise: z is the mean of the component drawn, whose index the means give.
    last = {None: 2, 0: 1, 1: 2}[digit]
    assert z[:, 0].astype(int).tolist() == [last] * 3


def test_a_prior_written_over_another_is_whole_or_the_other(tmp_path, monkeypatch):
    # A training run wrote prior.npz in place: one interrupted left a file cut short.
    prior = mixture()
    prior.save(tmp_path / "prior.npz")

    def cut_short(file, **arrays):
        file.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", cut_short)
    with pytest.raises(OSError, match="No space left"):
        mixture().save(tmp_path / "prior.npz")
    monkeypatch.undo()
    loaded = load_prior(tmp_path, {"files": {"prior.npz": {}}}, K)
    np.testing.assert_array_equal(loaded.means, prior.means)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prior.npz"]


def test_a_digit_draws_its_components_in_proportion_to_their_weights_in_the_class():
    """Within a class, component j is drawn with w_j over the class's total. (Cumulating the
    weights without that division still drew only the class's components, nearly all from
    its last.)"""
    weights = np.array([0.1, 0.3, 0.2, 0.1, 0.3])
    classes = np.array([0, 0, 0, 1, 1])
    means = np.arange(5, dtype=np.float64)[:, None] * np.full((5, K), 100.0)
    prior = GaussianMixture(weights, means, np.stack([np.eye(K) * 1e-3] * 5), classes)
    n = 60_000
    for digit, members in ((0, [0, 1, 2]), (1, [3, 4])):
        drawn = np.rint(prior.latents(5, 0, n, digit)[:, 0] / 100).astype(int)
        share = np.bincount(drawn, minlength=5)[members] / n
        want = weights[members] / weights[members].sum()
        # 60,000 draws: a share's standard deviation is at most 0.002
        np.testing.assert_allclose(share, want, atol=0.01)


def _header_only_npz(path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A prior file whose arrays are headers alone: what a file of a few hundred bytes may
    claim to unpack to."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        for name, shape in shapes.items():
            f = io.BytesIO()
            np.lib.format.write_array_header_1_0(
                f, {"descr": "<i8" if name == "classes" else "<f8", "fortran_order": False,
                    "shape": shape})
            z.writestr(f"{name}.npy", f.getvalue())


def test_a_prior_whose_factors_would_not_fit_in_memory_is_refused_by_its_headers(tmp_path):
    """Before: 10,000 components in R^4096 passed the header check (components and latent
    size were bounded apart), and loading asked for 1.22 TiB: a MemoryError traceback."""
    c, k = 10_000, 4096
    _header_only_npz(tmp_path / "prior.npz", {"weights": (c,), "means": (c, k),
                                              "chols": (c, k, k), "classes": (c,)})
    with pytest.raises(PriorError, match="factor entries, past the 16777216"):
        GaussianMixture.load(tmp_path / "prior.npz", k)


def _one_class(chols: np.ndarray, means: np.ndarray | None = None) -> GaussianMixture:
    c, k = chols.shape[:2]
    return GaussianMixture(np.full(c, 1.0 / c), np.zeros((c, k)) if means is None else means,
                           chols, np.zeros(c, dtype=np.int64))


def test_a_prior_that_would_serve_wrong_figures_is_refused():
    """Each loaded before, and was served with status OK."""
    eye = np.eye(K)[None]
    # A class all of whose weight is 0: its digit was offered, and its draws came from
    # component 0, another class's (0/0 in the cumulative weights).
    with pytest.raises(PriorError, match="class 1's components have no weight"):
        GaussianMixture(np.array([0.5, 0.5, 0.0]), np.zeros((3, K)), np.repeat(eye, 3, 0),
                        np.array([0, 0, 1]))
    # A factor whose diagonal is bounded but whose inverse overflows float32: every
    # LogLikelihood was NaN.
    k = 32
    steep = np.tril(np.ones((k, k)))
    np.fill_diagonal(steep, 1e-6)
    with pytest.raises(PriorError, match="cannot be inverted"):
        _one_class(steep[None])
    # One whose float32 inverse is finite (at most 1e33) but whose products with a latent,
    # squared, are not: log_prob was NaN.
    tall = np.diag(np.full(K, 1e-6)) + np.diag(np.full(K - 1, 1e3), -1)
    with pytest.raises(PriorError, match="cannot be inverted"):
        _one_class(tall[None])
    # Means far out: every Sample image NaN (1e39), or latents Decode would refuse (1e7).
    for far in (1e39, 1e7):
        with pytest.raises(PriorError, match="within \\+-1e\\+06"):
            _one_class(eye, np.full((1, K), far))
    # Entries above the diagonal, within allclose's tolerance: samples used the whole
    # factor, the density its diagonal alone (8.5 nats off on the audit's example).
    upper = np.array([[[1e-6, 1e-8], [0.5, 1e-6]]])
    with pytest.raises(PriorError, match="lower-triangular"):
        _one_class(upper)


def test_unsigned_classes_past_9_are_refused(tmp_path):
    """Before: uint64 2^64 - 1 read as -1, no class, and its digit silently went missing."""
    prior = mixture(classes=2, per_class=1)
    np.savez(tmp_path / "prior.npz", weights=prior.weights, means=prior.means,
             chols=prior.chols, classes=np.array([0, 2**64 - 1], dtype=np.uint64))
    with pytest.raises(PriorError, match="digits 0 .. 9"):
        GaussianMixture.load(tmp_path / "prior.npz", K)
    np.savez(tmp_path / "prior.npz", weights=prior.weights, means=prior.means,
             chols=prior.chols, classes=np.array([0, 1], dtype=np.uint8))
    assert GaussianMixture.load(tmp_path / "prior.npz", K).digits == [0, 1]


@pytest.mark.parametrize("digit", [None, 1])
def test_numpy_integers_give_the_rows_python_integers_give(digit):
    """Before: start + n in int64 wrapped near 2^63, no block was drawn, and the rows came
    back as whatever the empty array held."""
    prior = mixture()
    start = 2**63 - 1
    np.testing.assert_array_equal(prior.latents(np.uint64(4), np.int64(start), np.int64(3),
                                                digit),
                                  prior.latents(4, start, 3, digit))
