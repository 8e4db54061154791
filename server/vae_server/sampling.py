"""Prior noise for Sample and SampleStream, addressable by image index.

z for image i of seed s is row i % B of the block drawn from the generator seeded by
(s, i // B). Any range of images can be produced without drawing the ones before it, so a
stream can resume at any offset, and Sample(n) equals the first n images of a stream.
"""

from __future__ import annotations

import numpy as np

BLOCK = 1024


def prior_latents(seed: int, start: int, n: int, latent_dim: int) -> np.ndarray:
    """z [n, k] for images start .. start + n - 1 of the sequence seeded by `seed`."""
    out = np.empty((n, latent_dim), dtype=np.float32)
    first, last = start // BLOCK, (start + n - 1) // BLOCK
    pos = 0
    for b in range(first, last + 1):
        block = np.random.default_rng([seed, b]).standard_normal((BLOCK, latent_dim),
                                                                  dtype=np.float32)
        lo = max(start, b * BLOCK) - b * BLOCK
        hi = min(start + n, (b + 1) * BLOCK) - b * BLOCK
        out[pos : pos + hi - lo] = block[lo:hi]
        pos += hi - lo
    return out
