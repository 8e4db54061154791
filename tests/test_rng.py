"""vae_core.rng: the streams of keys whose values fit in 32 bits are numpy's own (every
earlier seeded output stays what it was), and keys with larger values no longer share a
stream with another key."""

from __future__ import annotations

import numpy as np
import pytest

from vae_core import likelihood as lk
from vae_core.prior import BLOCK, GaussianMixture
from vae_core.rng import ROWS_PER_BLOCK, indexed_normals, key_words, keyed_rng

BIG = 2**32


@pytest.mark.parametrize("key", [(0, 0), (5, 1), (2**32 - 1, 7, 1), (20261124, 499)])
def test_small_keys_are_numpy_s_own_streams(key):
    np.testing.assert_array_equal(keyed_rng(*key).random(8),
                                  np.random.default_rng(list(key)).random(8))


def test_large_keys_have_streams_of_their_own():
    keys = [(5, 1), (5, 1, 0), (BIG + 5, 0), (BIG + 5, 2), (5, 1, 2), (BIG + 5, 1),
            (5, BIG + 1), (5 + 2 * BIG, 1), (5, 1 + 2 * BIG), (BIG + 5, 2, 1), (2**64 + 3, 0)]
    draws = {key: tuple(keyed_rng(*key).integers(0, 2**63, 4)) for key in keys}
    # (5, 1) and (5, 1, 0) are one stream, as in numpy (a short key is padded with zeros);
    # every other pair differs.
    assert draws[(5, 1)] == draws[(5, 1, 0)]
    others = [draws[key] for key in keys if key != (5, 1, 0)]
    assert len(set(others)) == len(others)
    with pytest.raises(ValueError, match="non-negative integers, not -1"):
        key_words(-1, BIG)


def test_a_large_seed_is_not_another_seed_s_later_images():
    """Before: Sample(seed=2**32 + 5) gave the images 1024 - 2047 of Sample(seed=5) under
    N(0, I), and LogLikelihood with seed 2**32 + 5 the noise of seed 5 at offset 1."""
    prior = GaussianMixture.standard(4)
    assert not np.array_equal(prior.latents(BIG + 5, 0, BLOCK), prior.latents(5, BLOCK, BLOCK))
    assert not np.array_equal(lk.score_noise(BIG + 5, 0, 1, 8, 4),
                              lk.score_noise(5, 1, 1, 8, 4))
    # An offset past 2**32 draws its own noise, not image i's dequantisation noise.
    pixels = np.zeros((1, 784), np.uint8)
    assert not np.array_equal(lk.dequantize(pixels, 5, BIG + 1),
                              lk.dequantize(pixels, 5 + BIG, 1))


@pytest.mark.parametrize("seed", [5, 2**32 + 5, 2**64 - 1])
def test_indexed_normals_of_a_row_do_not_depend_on_the_call(seed):
    whole = indexed_normals(seed, 0, 3 * ROWS_PER_BLOCK + 5, 4)
    for start, n in [(0, 1), (1023, 2), (1000, 2070), (3 * ROWS_PER_BLOCK, 5), (7, 0)]:
        np.testing.assert_array_equal(indexed_normals(seed, start, n, 4),
                                      whole[start : start + n], err_msg=f"{start}, {n}")
    # Below 2^32, the first block is the stream of the whole call before rows had indices.
    if seed < 2**32:
        np.testing.assert_array_equal(
            whole[:ROWS_PER_BLOCK],
            np.random.default_rng(seed).standard_normal((5000, 4), dtype=np.float32)[:1024])
    # Blocks are streams of their own, and so are other seeds'.
    blocks = whole[: 3 * ROWS_PER_BLOCK].reshape(3, -1)
    assert len({row.tobytes() for row in blocks}) == 3
    assert not np.array_equal(indexed_normals(seed ^ 1, 0, 10, 4), whole[:10])
    # numpy reads a seed 2^32 h + s as the key [s, h], Sample's stream of block h of seed s:
    # past 32 bits, the first block is a stream of its own.
    if seed >= 2**32:
        assert not np.array_equal(whole[:ROWS_PER_BLOCK],
                                  keyed_rng(seed % 2**32, seed // 2**32).standard_normal(
                                      (ROWS_PER_BLOCK, 4), dtype=np.float32))
    # Far rows cost their block, not their index; their values are ordinary draws.
    far = indexed_normals(seed, 2**64 - 3, 2000, 4)
    assert far.dtype == np.float32 and abs(float(far.mean())) < 0.1
    assert 0.9 < float(far.std()) < 1.1
