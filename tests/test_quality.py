"""vae_export.quality and the sample-quality part of `vae-export eval`, on known cases: real
digits against real digits, noise, one class only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vae_export import quality as q

RNG = np.random.default_rng(0)


def one_hot(classes: np.ndarray) -> np.ndarray:
    return np.eye(10)[classes]


def test_class_entropy_of_known_histograms():
    assert q.class_entropy(one_hot(np.full(500, 3))) == 0.0  # all of one class
    assert q.class_entropy(one_hot(np.arange(1000) % 10)) == pytest.approx(1.0)
    two = q.class_entropy(one_hot(np.arange(1000) % 2))
    assert two == pytest.approx(np.log(2) / np.log(10))


def test_confident_fraction_counts_top_probabilities_of_at_least_0_9():
    probs = np.array([[0.95, 0.05] + [0] * 8, [0.9, 0.1] + [0] * 8, [0.6, 0.4] + [0] * 8])
    assert q.confident_fraction(probs) == pytest.approx(2 / 3)


def test_frechet_distance_of_gaussians_with_known_answers():
    a = RNG.standard_normal((20_000, 4))
    assert q.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = a + np.array([3.0, 0, 0, 0])
    assert q.frechet_distance(a, shifted) == pytest.approx(9.0, rel=1e-6)
    # N(0, I) against N(0, 4 I) in 4 dimensions: tr(I + 4I - 2 * 2I) = 4.
    b = RNG.standard_normal((200_000, 4)) * 2
    assert q.frechet_distance(RNG.standard_normal((200_000, 4)), b) == pytest.approx(4.0, rel=0.02)


def test_nn_distances_and_nearest_are_exact():
    ref = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 5.0]])
    a = np.array([[1.0, 0.0], [9.0, 1.0], [0.0, 2.0]])
    np.testing.assert_allclose(q.nn_distances(a, ref), [1.0, np.sqrt(2), 2.0])
    np.testing.assert_array_equal(q.nearest(a, ref), [0, 1, 0])


def test_heldout_nn_distances_look_outside_each_rows_fold():
    line = np.arange(6.0)[:, None] * np.array([[3.0, 4.0]])  # rows 5 apart on a line
    # One row a fold: each row's nearest other row.
    np.testing.assert_allclose(q.heldout_nn_distances(line, folds=6), [5.0] * 6)
    twins = np.concatenate([line, line + np.array([[0.5, 0.0]])])
    np.testing.assert_allclose(q.heldout_nn_distances(twins, folds=12), [0.5] * 12)
    # With fewer folds a row may lose its nearest neighbours to its own fold, never gain one.
    points = RNG.standard_normal((300, 5))
    loo = q.heldout_nn_distances(points, folds=300)
    two = q.heldout_nn_distances(points, folds=2)
    assert np.all(two >= loo - 1e-12) and np.any(two > loo)
    np.testing.assert_array_equal(two, q.heldout_nn_distances(points, folds=2))  # seeded


@pytest.fixture(scope="module")
def judged(classifier_dir: Path, mnist_test_dir: Path):
    from vae_export.classifier import classify, load_classifier
    from vae_export.data import load_idx_dir

    net, _ = load_classifier(classifier_dir)
    test = load_idx_dir(mnist_test_dir)
    return net, test, classify(net, test.images)


def test_real_digits_are_close_to_real_digits_and_noise_is_far(judged):
    from vae_export.classifier import classify

    net, test, (probs, feats) = judged
    real = q.frechet_distance(feats[:5000], feats[5000:])
    noise = RNG.random((5000, 784)).astype(np.float32)
    _, noise_feats = classify(net, noise)
    far = q.frechet_distance(noise_feats, feats[5000:])
    assert real > 0 and far > 10 * real, (real, far)
    # Real digits are judged digits of every class; noise is not.
    assert q.class_entropy(probs) > 0.99
    assert (probs.argmax(1) == test.labels).mean() > 0.8


def test_eval_judges_the_samples_of_a_model(model_dir, classifier_dir, mnist_test_dir, tmp_path):
    from vae_export.__main__ import main

    out = tmp_path / "eval.json"
    assert main(["eval", "--model-dir", str(model_dir), "--data", str(mnist_test_dir),
                 "--k", "0", "--samples", "300", "--classifier", str(classifier_dir),
                 "--pictures", str(tmp_path / "pictures"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    s = result["samples"]
    assert s["n"] == 300 and sum(s["class_histogram"]) == 300
    assert 0 <= s["confident_fraction"] <= 1 and 0 <= s["class_entropy"] <= 1
    ref = s["reference"]
    # The two halves of the test set are nearer each other than its two writer populations.
    assert 0 < ref["fd_random_halves"] < ref["fd_writers"]
    assert s["fd_over_writers"] == pytest.approx(s["frechet_distance"] / ref["fd_writers"])
    # Real unseen digits are about as far from the training digits as from other unseen ones.
    assert 0.9 < ref["test_copy_ratio_pixels"] < 1.1
    assert 0.9 < ref["test_copy_ratio_features"] < 1.1
    assert s["copy_ratio_pixels"] > 0 and s["copy_ratio_features"] > 0
    # The test digits' writers are not the training digits': unseen digits of the training
    # digits' own population lie nearer them (in pixels, which no classifier enters).
    assert 0.9 * ref["test_nn_pixels_median"] < ref["population_nn_pixels_median"] \
        < ref["test_nn_pixels_median"]
    assert ref["population_nn_features_median"] > 0
    # And so they are nearer the training digits than the unseen test digits, as a copy ratio.
    assert 0.8 < ref["population_copy_ratio_pixels"] < ref["test_copy_ratio_pixels"]
    assert ref["population_copy_ratio_features"] > 0
    assert 0 < ref["population_fd_over_writers"] < 1
    assert s["fd_validation"] > 0
    # The reconstructions of real digits, judged (this small model draws blurs: its figures are
    # far from a real model's, so only their kind is checked here).
    rec = s["reconstructions"]
    assert rec["fd_over_writers"] > 0 and rec["train_fd_over_writers"] > 0
    assert rec["nn_pixels_median"] > 0 and rec["nn_features_median"] > 0
    assert rec["population_copy_ratio_pixels"] > 0 and rec["population_copy_ratio_features"] > 0
    assert set(s["by_digit"]["agreement"]) == {str(d) for d in range(10)}
    assert set(s["targets"]["met"]) == {"confident_fraction", "class_entropy",
                                        "fd_over_writers", "not_copies", "digit_agreement"}
    for name in ("samples.png", "nearest.png", "by-digit.png"):
        assert (tmp_path / "pictures" / name).read_bytes()[:4] == b"\x89PNG"
    assert "test" not in result  # --k 0: no likelihood
