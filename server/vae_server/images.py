"""The images a reply carries: [N, 28, 28], FLOAT32 as the decoder made them or UINT8.
make bench's in-process limit converts with the same function."""

from __future__ import annotations

import numpy as np

from vae_proto import vae_pb2


def images_out(x: np.ndarray, dtype: int) -> np.ndarray:
    """Decoder means [N, 784] in [0, 1] -> [N, 28, 28] float32, or round(255 x) as uint8."""
    x = x.reshape(len(x), 28, 28)
    if dtype == vae_pb2.UINT8:
        # One temporary, rounded in place: np.rint(x * 255) makes a second one, and for a
        # stream's chunk of 1,024 images that took 2.3 ms instead of 0.6 (fresh pages).
        y = np.multiply(x, np.float32(255.0))
        np.rint(y, out=y)
        return y.astype(np.uint8)
    return x
