"""The prior p(z) of a model, in numpy: what Sample and SampleStream draw from and what
LogLikelihood scores with, so that the likelihood served is that of the model that generates.

A prior is a Gaussian mixture over R^k whose components may carry a digit class:

    p(z) = sum_j w_j N(z; m_j, L_j L_j^T),      p(z | c) ∝ sum_{j: class_j = c} w_j N(...)

N(0, I) is the one-component case (a model directory without `prior.npz`). A learned prior
is fitted to where the training digits' codes lie (vae-export train), one mixture per class,
so that labelled generation draws from the components of the class asked for.

Latents are addressable by index: image i of seed s takes its noise eps from row i % B of the
block drawn by the generator seeded (s, i // B), and its component from a uniform number drawn
by the generator seeded (s, i // B, 1). Any range of images can be made without drawing the
ones before it, whatever the batching, and for N(0, I) z = eps exactly.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vae_core.files import replacing
from vae_core.likelihood import LOG_2PI, log_normal_std
from vae_core.manifest import PRIOR_FILE as PRIOR_FILE
from vae_core.manifest import ManifestError, prior_kind
from vae_core.rng import ROWS_PER_BLOCK, block_spans, keyed_rng

BLOCK = ROWS_PER_BLOCK  # rows per seeded block, as every indexed stream
NO_CLASS = -1
# The largest latent coordinate Decode takes, and the largest mean or factor entry a prior may
# have. Every prior lies within a few tens of the origin; far past this bound the decoder's
# sums overflow float32 and its images are NaN.
MAX_LATENT = 1e6
# The least standard deviation a component may have along a latent axis: below it, its
# inverse factor overflows float32 and its density means nothing.
MIN_SCALE = 1e-6
# A sum of squares float32 holds with room to spare (its largest number is about 3.4e38).
_FLOAT32_SQUARES = 1e37
_CHUNK = 4096  # latents per matrix product in log_prob: [4096, C k] float32 at most
_TRANSFORM_ROWS = 256  # rows per stacked product in latents: [256, k, k] float64 factors
# Up to this latent size a stacked product of each row's own factor is the faster transform
# (one product per component pays numpy's cost of a call for each of the call's components);
# past it, gathering k x k factors per row costs more time and memory than those calls.
_STACKED_MAX_K = 32


class PriorError(ManifestError):
    """A prior file whose arrays do not make a mixture of the model's latent size (a model
    directory that cannot be trusted, as the CLIs report it)."""


@dataclass(frozen=True)
class GaussianMixture:
    weights: np.ndarray  # [C] float64, summing to 1
    means: np.ndarray  # [C, k] float64
    chols: np.ndarray  # [C, k, k] float64, lower-triangular factors of the covariances
    classes: np.ndarray  # [C] int64: the digit class of each component, or NO_CLASS
    _inv: np.ndarray = field(init=False, repr=False)
    _shift: np.ndarray = field(init=False, repr=False)
    _log_norm32: np.ndarray = field(init=False, repr=False)
    # Asked on every request (sampling, scoring): worked out once.
    _standard: bool = field(init=False, repr=False)
    _digits: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        c, k = self.means.shape
        _check_shapes(c, k, self.weights.shape, self.chols.shape, self.classes.shape)
        if not np.all(self.weights >= 0) or not np.isclose(self.weights.sum(), 1.0):
            raise PriorError("the mixture weights must be >= 0 and sum to 1")
        if not (np.isfinite(self.means).all() and np.isfinite(self.chols).all()):
            raise PriorError("the means and covariance factors must be finite numbers")
        if not (np.abs(self.means).max() <= MAX_LATENT
                and np.abs(self.chols).max() <= MAX_LATENT):
            raise PriorError(f"the means and covariance factors must lie within "
                             f"+-{MAX_LATENT:g}, as latents do")
        # Checked as given (a file's may be unsigned: as int64, 2^64 - 1 would read as -1),
        # then kept as int64.
        if not np.all((self.classes == NO_CLASS) | ((self.classes >= 0) & (self.classes <= 9))):
            raise PriorError(f"the classes must be digits 0 .. 9, or {NO_CLASS} for none")
        object.__setattr__(self, "classes", self.classes.astype(np.int64))
        for digit in set(self.classes.tolist()) - {NO_CLASS}:
            if not self.weights[self.classes == digit].sum() > 0:
                raise PriorError(f"class {digit}'s components have no weight: it cannot be "
                                 "sampled")
        diag = np.diagonal(self.chols, axis1=1, axis2=2)
        # Exactly triangular: sampling multiplies by the whole factor, while the density
        # takes its determinant from the diagonal alone.
        if not np.all(diag >= MIN_SCALE) or np.triu(self.chols, 1).any():
            raise PriorError(f"each covariance factor must be lower-triangular with a diagonal "
                             f"of at least {MIN_SCALE:g}")
        # For log_prob: ||L_j^-1 (z - m_j)||^2 for every component j is one matrix product,
        # z @ A^T - b, with the inverse factors stacked into A [C k, k] and b_j = L_j^-1 m_j
        # (float32: its rounding is far below a nat), and each component's log weight plus
        # the log of its normalising constant.
        with np.errstate(all="ignore"):
            try:
                inv = np.linalg.inv(self.chols)
            except np.linalg.LinAlgError:
                inv = np.full_like(self.chols, np.nan)
            # A factor far from its diagonal (the diagonal bounded, the entries below it not)
            # has an inverse whose products with a latent, squared and summed in float32 as
            # log_prob computes them, overflow: for latents within +-MAX_LATENT each
            # coordinate of L^-1 (z - m) is at most a row of |L^-1| summed times 2 MAX_LATENT.
            # (NaN or inf in the inverse fails the comparison too; within the bound, the
            # inverse and L^-1 m fit float32.)
            largest = float(np.abs(inv).sum(axis=2).max()) * 2 * MAX_LATENT
        if not largest < math.sqrt(_FLOAT32_SQUARES / k):
            raise PriorError("a covariance factor cannot be inverted (too near singular)")
        object.__setattr__(self, "_inv", inv.reshape(c * k, k).T.astype(np.float32).copy())
        object.__setattr__(self, "_shift", np.einsum("cij,cj->ci", inv, self.means)
                           .reshape(c * k).astype(np.float32))
        with np.errstate(divide="ignore"):
            log_w = np.log(self.weights)
        object.__setattr__(self, "_log_norm32", (log_w - np.log(diag).sum(axis=1)
                                                 - 0.5 * k * LOG_2PI).astype(np.float32))
        object.__setattr__(self, "_standard", bool(
            c == 1 and not self.means.any() and np.array_equal(self.chols[0], np.eye(k))))
        object.__setattr__(self, "_digits", tuple(
            sorted(int(x) for x in set(self.classes.tolist()) if x != NO_CLASS)))

    @classmethod
    def standard(cls, k: int) -> GaussianMixture:
        """N(0, I) on R^k."""
        return cls(np.ones(1), np.zeros((1, k)), np.eye(k)[None], np.array([NO_CLASS]))

    @property
    def latent_dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def is_standard(self) -> bool:
        return self._standard

    @property
    def digits(self) -> list[int]:
        """The classes that labelled sampling may ask for (none for an unlabelled prior)."""
        return list(self._digits)

    # -- files ----------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Written whole or not at all (vae_core.files.replacing)."""
        with replacing(path) as f:
            np.savez(f, weights=self.weights, means=self.means, chols=self.chols,
                     classes=self.classes)

    @classmethod
    def load(cls, path: str | Path, latent_dim: int) -> GaussianMixture:
        """The prior of a file, its arrays' shapes and types checked from their headers
        before any is read (a file of a few MB may unpack to any size)."""
        try:
            _check_headers(path, latent_dim)
            with np.load(path, allow_pickle=False) as f:
                arrays = {name: f[name] for name in ("weights", "means", "chols", "classes")}
            return cls(arrays["weights"].astype(np.float64), arrays["means"].astype(np.float64),
                       arrays["chols"].astype(np.float64), arrays["classes"])
        except PriorError as exc:
            raise PriorError(f"{path}: {exc}") from None
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise PriorError(f"{path}: not a prior file ({exc})") from None
        except MemoryError:
            raise PriorError(f"{path}: its arrays do not fit in this machine's memory") from None

    # -- sampling -------------------------------------------------------------------------

    def latents(self, seed: int, start: int, n: int, digit: int | None = None) -> np.ndarray:
        """z [n, k] float32 for images start .. start + n - 1 of the sequence seeded by
        `seed`, from the components of class `digit` when it is given."""
        k = self.latent_dim
        # Python ints: numpy's int64 would wrap at start + n near 2^63 and leave rows unset.
        seed, start, n = int(seed), int(start), int(n)
        out = np.empty((n, k), dtype=np.float32)
        cdf = self._cdf(digit)
        pos = 0
        for b, lo, hi in block_spans(start, n, BLOCK):
            # Only the block's rows up to the last one asked for are drawn: a block's streams
            # give their rows in order, so a row's draws do not depend on how many follow
            # (and one image costs no block of 1,024).
            eps = keyed_rng(seed, b).standard_normal((hi, k), dtype=np.float32)[lo:]
            if cdf is None:
                out[pos : pos + hi - lo] = eps
            else:
                u = keyed_rng(seed, b, 1).random(hi)[lo:]
                comp = np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1)
                out[pos : pos + hi - lo] = self._transform(comp, eps)
            pos += hi - lo
        assert pos == n, (start, n, pos)
        return out

    def _cdf(self, digit: int | None) -> np.ndarray | None:
        """The cumulative component weights to draw from (None: z = eps)."""
        if digit is None:
            if self.is_standard:
                return None
            w = self.weights
        else:
            if digit not in self._digits:
                raise ValueError(f"digit {digit}: this prior has classes {self.digits}")
            w = np.where(self.classes == digit, self.weights, 0.0)
        cdf = np.cumsum(w / w.sum())
        # Rounding can end the sum short of 1 (at 1 - 2^-53, say), and a uniform draw at or
        # above its end would run past the last component with weight: to another class's
        # component, or clipped to the last one. The entries at the end (that component's and
        # the weightless ones after it) are set to exactly 1; every draw below the end picks
        # the component it picked before.
        cdf[cdf >= cdf[-1]] = 1.0
        return cdf

    def _transform(self, comp: np.ndarray, eps: np.ndarray) -> np.ndarray:
        """m_j + L_j eps for each row's component j. Small latents: one stacked product over
        the rows, each row with its own factor, in slices that bound the gathered factors'
        memory; larger ones: one product per component."""
        if self.latent_dim > _STACKED_MAX_K:
            out = np.empty(eps.shape, dtype=np.float64)
            for c in np.unique(comp):
                rows = comp == c
                out[rows] = self.means[c] + eps[rows].astype(np.float64) @ self.chols[c].T
            return out.astype(np.float32)
        z = np.empty(eps.shape, dtype=np.float32)
        for lo in range(0, len(comp), _TRANSFORM_ROWS):
            j = comp[lo : lo + _TRANSFORM_ROWS]
            e = eps[lo : lo + _TRANSFORM_ROWS].astype(np.float64)[:, :, None]
            z[lo : lo + len(j)] = self.means[j] + np.matmul(self.chols[j], e)[:, :, 0]
        return z

    # -- density --------------------------------------------------------------------------

    def log_prob(self, z: np.ndarray) -> np.ndarray:
        """log p(z), summed over the last axis: z [..., k] -> [...] float64."""
        z = np.asarray(z)
        if self._standard:
            return log_normal_std(z)
        shape = z.shape[:-1]
        c, k = len(self.weights), self.latent_dim
        flat = z.reshape(-1, k)
        out = np.empty(len(flat))
        for lo in range(0, len(flat), _CHUNK):
            y = flat[lo : lo + _CHUNK].astype(np.float32) @ self._inv
            y -= self._shift
            np.square(y, out=y)
            # Each component's log-density; the log-sum-exp in float64 after its largest
            # term is taken out (the others only add their exp(difference) <= 1).
            per = self._log_norm32 - 0.5 * y.reshape(-1, c, k).sum(axis=2)
            m = per.max(axis=1, keepdims=True)
            per -= m
            np.exp(per, out=per)
            out[lo : lo + _CHUNK] = np.log(per.sum(axis=1, dtype=np.float64)) + m[:, 0]
        return out.reshape(shape)


# Components a prior file may hold: the default has 100 (10 a class); 10,000 in R^32 is
# 80 MB of covariance factors. Their entries, components x k x k, are bounded too: 2^24, 128
# MB as float64, takes those 10,000 in R^32 or one component in R^4096.
MAX_COMPONENTS = 10_000
MAX_FACTOR_ENTRIES = 1 << 24


def _check_headers(path: str | Path, latent_dim: int) -> None:
    """The shapes and types of a prior file's arrays, read from their .npy headers."""
    want_float = ("weights", "means", "chols")
    shapes = {}
    with zipfile.ZipFile(path) as z:
        for name in (*want_float, "classes"):
            with z.open(f"{name}.npy") as f:
                version = np.lib.format.read_magic(f)
                read = {(1, 0): np.lib.format.read_array_header_1_0,
                        (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if read is None:
                    raise PriorError(f"{name}: .npy format {version}, not 1.0 or 2.0")
                shape, _, dtype = read(f)
            kinds = "fi" if name in want_float else "iu"
            if dtype.kind not in kinds:
                raise PriorError(f"{name} holds {dtype}, not "
                                 f"{'numbers' if name in want_float else 'whole numbers'}")
            shapes[name] = tuple(shape)
    means = shapes["means"]
    if len(means) != 2:
        raise PriorError(f"means of shape {list(means)}, not [components, latent_dim]")
    if means[1] != latent_dim:
        raise PriorError(f"a prior on R^{means[1]}, the model's latents are in R^{latent_dim}")
    c = means[0]
    if not 1 <= c <= MAX_COMPONENTS:
        raise PriorError(f"{c} components; a prior has 1 .. {MAX_COMPONENTS}")
    if c * latent_dim * latent_dim > MAX_FACTOR_ENTRIES:
        raise PriorError(f"{c} components in R^{latent_dim}: {c * latent_dim ** 2} factor "
                         f"entries, past the {MAX_FACTOR_ENTRIES} a prior may have")
    _check_shapes(c, latent_dim, shapes["weights"], shapes["chols"], shapes["classes"])


def _check_shapes(c: int, k: int, weights: tuple[int, ...], chols: tuple[int, ...],
                  classes: tuple[int, ...]) -> None:
    if (tuple(weights), tuple(chols), tuple(classes)) != ((c,), (c, k, k), (c,)):
        raise PriorError(f"a mixture of {c} components in R^{k} needs weights [{c}], "
                         f"chols [{c}, {k}, {k}] and classes [{c}]")


def load_prior(model_dir: str | Path, manifest: dict[str, object], latent_dim: int
               ) -> GaussianMixture:
    """The prior a model directory declares: its prior file, or N(0, I) without one; the
    manifest's prior kind and its files must agree (manifest.prior_kind)."""
    if prior_kind(manifest, model_dir) == "mixture":
        return GaussianMixture.load(Path(model_dir) / PRIOR_FILE, latent_dim)
    return GaussianMixture.standard(latent_dim)
