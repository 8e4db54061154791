"""How good generated digits are, judged by the classifier (vae_export.classifier), in numpy:

- confident_fraction: the share of images whose top softmax is at least 0.9;
- class_entropy: the entropy of the histogram of predicted classes over log 10 (1 when every
  class is as frequent, 0 when all images are of one class);
- frechet_distance: between the classifier's penultimate features of two image sets (the FID
  formula, on a digit classifier's features);
- nn_distances: each image's distance to its nearest training digit, in pixels or in features,
  to tell samples that copy training digits from new ones; heldout_nn_distances: the same for
  unseen digits of the training digits' own population, by folds.
"""

from __future__ import annotations

import numpy as np

CONFIDENT = 0.9
CLASSES = 10


def confident_fraction(probs: np.ndarray, threshold: float = CONFIDENT) -> float:
    return float(np.mean(np.max(probs, axis=1) >= threshold))


def class_entropy(probs: np.ndarray) -> float:
    """Entropy of the predicted classes' histogram, normalised by log 10."""
    counts = np.bincount(np.argmax(probs, axis=1), minlength=CLASSES).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum() / np.log(CLASSES)) + 0.0  # + 0.0: no -0.0


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """The square root of a symmetric positive semi-definite matrix (eigenvalues below 0,
    from rounding, are taken as 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """||m1 - m2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) between the Gaussians fitted to feature
    sets f1 [N1, d] and f2 [N2, d]. tr (S1 S2)^1/2 is computed as tr (R S2 R)^1/2 with
    R = S1^1/2, which is symmetric, so no general matrix square root is needed."""
    m1, m2 = f1.mean(axis=0), f2.mean(axis=0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    r = _sqrtm_psd(s1)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0, None)).sum()
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross)


def _nearest_rows(a: np.ndarray, reference: np.ndarray, chunk: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Each row of `a`'s nearest row of `reference`: (its index, the squared distance)."""
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    ref = np.asarray(reference, np.float64).reshape(len(reference), -1)
    rr = (ref * ref).sum(axis=1)
    index, d2 = [np.zeros(0, np.int64)], [np.zeros(0)]
    for start in range(0, len(a), chunk):
        x = a[start : start + chunk]
        d = (x * x).sum(axis=1)[:, None] + rr[None, :] - 2 * x @ ref.T
        j = d.argmin(axis=1)
        index.append(j)
        d2.append(d[np.arange(len(x)), j])
    return np.concatenate(index), np.concatenate(d2)


def nn_distances(a: np.ndarray, reference: np.ndarray, chunk: int = 2000) -> np.ndarray:
    """The Euclidean distance of each row of `a` to its nearest row of `reference`."""
    return np.sqrt(np.clip(_nearest_rows(a, reference, chunk)[1], 0, None))


def heldout_nn_distances(a: np.ndarray, folds: int = 10, seed: int = 0) -> np.ndarray:
    """The distance of each row of `a` to its nearest row outside its fold (rows split into
    `folds` random folds): how far unseen members of a population lie from a sample of it
    the size of the rest."""
    order = np.random.default_rng(seed).permutation(len(a))
    out = np.empty(len(a))
    for fold in np.array_split(order, folds):
        rest = np.setdiff1d(order, fold, assume_unique=True)
        out[fold] = nn_distances(a[fold], a[rest])
    return out


def nearest(a: np.ndarray, reference: np.ndarray, chunk: int = 2000) -> np.ndarray:
    """The index of each row's nearest row of `reference` (for pictures of samples beside the
    training digits closest to them)."""
    return _nearest_rows(a, reference, chunk)[0]
