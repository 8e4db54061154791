"""The training deformations (vae_export.augment): the affine grid and the elastic field."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from vae_export.augment import (
    augment,
    blur_matrix,
    elastic_field,
    field_basis,
    planar_affine_grid,
    random_affine_theta,
)


def _conv_blur(images: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """The separable Gaussian blur by two convolutions with zero padding: the reference."""
    r = int(math.ceil(3 * sigma_px))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    g = torch.exp(-0.5 * (x / sigma_px) ** 2)
    g = g / g.sum()
    out = F.conv2d(images[:, None], g.view(1, 1, 1, -1), padding=(0, r))
    return F.conv2d(out, g.view(1, 1, -1, 1), padding=(r, 0))[:, 0]


@pytest.mark.parametrize("sigma_px", [0.5, 1.0, 4.0, 12.0])
def test_the_blur_matrix_blurs_as_the_convolutions_do(sigma_px: float) -> None:
    images = torch.rand(16, 28, 28, generator=torch.Generator().manual_seed(0))
    b = blur_matrix(sigma_px)
    torch.testing.assert_close(b @ images @ b.T, _conv_blur(images, sigma_px),
                               atol=1e-6, rtol=1e-5)
    # A constant image keeps its value away from the edges (the kernel sums to one), and
    # fades towards them (zeros beyond).
    flat = b @ torch.ones(28, 28) @ b.T
    r = math.ceil(3 * sigma_px)
    if 2 * r < 28:
        torch.testing.assert_close(flat[r:28 - r, r:28 - r], torch.ones(28 - 2 * r, 28 - 2 * r))
    assert flat[0, 0] < 1


@pytest.mark.parametrize("sigma_px", [1.0, 4.0, 12.0])
def test_the_field_basis_has_the_blurred_noise_covariance(sigma_px: float) -> None:
    b = blur_matrix(sigma_px)
    basis = field_basis(sigma_px)
    assert basis.shape[0] == 28 and basis.shape[1] <= 28
    torch.testing.assert_close(basis @ basis.T, b @ b.T, atol=1e-5 * float((b @ b.T).max()),
                               rtol=0)
    # A wide blur leaves few modes: that is what makes the field cheap.
    if sigma_px >= 4:
        assert basis.shape[1] <= 12


def test_the_elastic_field_is_drawn_as_blurred_white_noise_is() -> None:
    """The same distribution as Simard's white noise blurred by the Gaussian: the per-pixel
    spread and the correlation between neighbours, over many fields, agree."""
    n, sigma_px = 4000, 4.0
    field = elastic_field(n, torch.Generator().manual_seed(3), 1.0, sigma_px)
    field = field.permute(0, 3, 1, 2).reshape(2 * n, 28, 28)
    b = blur_matrix(sigma_px)
    ref = b @ (torch.rand(2 * n, 28, 28, generator=torch.Generator().manual_seed(4)) * 2 - 1) @ b.T
    ref = ref * (field.std() / ref.std())

    def profile(f: torch.Tensor) -> torch.Tensor:  # spread by row: the edges fade
        return f.std(dim=(0, 2))

    def neighbour_corr(f: torch.Tensor, lag: int) -> float:
        a, c = f[:, :, :-lag].flatten(), f[:, :, lag:].flatten()
        return float(torch.corrcoef(torch.stack([a, c]))[0, 1])

    torch.testing.assert_close(profile(field), profile(ref), rtol=0.05, atol=0)
    for lag in (1, 4, 8):
        assert neighbour_corr(field, lag) == pytest.approx(neighbour_corr(ref, lag), abs=0.02)
    # Not white: neighbours are strongly correlated.
    assert neighbour_corr(field, 1) > 0.9


def test_the_elastic_field_is_seeded_smooth_and_of_the_size_asked() -> None:
    field = elastic_field(64, torch.Generator().manual_seed(1), alpha_px=2.0, sigma_px=4.0)
    assert field.shape == (64, 28, 28, 2)
    assert torch.equal(field, elastic_field(64, torch.Generator().manual_seed(1), 2.0, 4.0))
    # Its typical displacement is alpha_px pixels (2 / 28 per pixel in grid units).
    assert field.std().item() == pytest.approx(2.0 * 2 / 28, rel=1e-3)
    # Smooth: neighbouring pixels move alike, unlike white noise.
    step = (field[:, 1:] - field[:, :-1]).abs().mean()
    assert step < 0.2 * field.abs().mean()


def test_an_elastic_deformation_moves_ink_and_keeps_the_batch_shape() -> None:
    x = torch.zeros(8, 1, 28, 28)
    x[:, :, 10:18, 12:16] = 255.0
    gen = torch.Generator().manual_seed(2)
    out = augment(x, gen, rot_deg=0, shift_px=0, scale=0, elastic_alpha=2.0)
    assert out.shape == x.shape
    assert not torch.allclose(out, x)
    # Plain affine identity without the field leaves the images as they were.
    same = augment(x, torch.Generator().manual_seed(2), rot_deg=0, shift_px=0, scale=0)
    torch.testing.assert_close(same, x, atol=1e-3, rtol=0)


def test_the_planar_affine_grid_is_affine_grids_with_its_last_axis_first() -> None:
    gen = torch.Generator().manual_seed(5)
    theta = random_affine_theta(300, gen, rot_deg=30, shift_px=3, scale=0.3, shear_deg=10)
    ref = F.affine_grid(theta, [300, 1, 28, 28], align_corners=False)
    grid = planar_affine_grid(theta).view(300, 2, 28, 28).permute(0, 2, 3, 1)
    # The same products and sums: equal to float32 rounding (bit for bit where the CPU's
    # batched matmul adds them in the same order, as on the machines of this project).
    torch.testing.assert_close(grid, ref, atol=1e-6, rtol=0)
    # The identity map is the pixel centres themselves.
    identity = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    assert torch.equal(planar_affine_grid(identity).view(1, 2, 28, 28).permute(0, 2, 3, 1),
                       F.affine_grid(identity, [1, 1, 28, 28], align_corners=False))
