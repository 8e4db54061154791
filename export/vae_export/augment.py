"""Random deformations of 28x28 digits for training, in torch, seeded by a torch.Generator:
small rotations, shifts, scalings and shears (one sampling grid and grid_sample for a whole
batch), and optionally an elastic field (Simard et al., 2003) added to the affine grid.
Input and output are float tensors [N, 1, 28, 28] on the same scale (0..255 or 0..1).
"""

from __future__ import annotations

import functools
import math

import torch
from torch.nn import functional as F


def random_affine_theta(n: int, gen: torch.Generator, rot_deg: float, shift_px: float,
                        scale: float, shear_deg: float) -> torch.Tensor:
    """Random affine maps theta [n, 2, 3], as `F.affine_grid` takes them (normalised
    coordinates, output to input)."""
    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen)
    a = u(-rot_deg, rot_deg) * math.pi / 180
    sh = u(-shear_deg, shear_deg) * math.pi / 180
    s = u(1 - scale, 1 + scale)
    t = u(-shift_px, shift_px) * 2 / 28, u(-shift_px, shift_px) * 2 / 28
    cos, sin = torch.cos(a), torch.sin(a)
    theta = torch.zeros(n, 2, 3)
    # grid maps output coords to input coords: dividing by s enlarges the digit when s > 1.
    theta[:, 0, 0] = cos / s
    theta[:, 0, 1] = (-sin + torch.tan(sh)) / s
    theta[:, 1, 0] = sin / s
    theta[:, 1, 1] = cos / s
    theta[:, 0, 2] = t[0]
    theta[:, 1, 2] = t[1]
    return theta


def planar_affine_grid(theta: torch.Tensor) -> torch.Tensor:
    """`F.affine_grid(theta, [n, 1, 28, 28], align_corners=False)` with its last axis first,
    [n, 2, 784]: the same products and sums, elementwise. affine_grid multiplies n tiny
    matrices one by one, several times slower for a batch of thousands; and the elastic
    field is drawn in this layout, so it adds without a strided copy."""
    px, py = _pixel_centres()
    grid = px * theta[:, :, 0:1]
    grid += py * theta[:, :, 1:2]
    grid += theta[:, :, 2:3]
    return grid


@functools.lru_cache(maxsize=1)
def _pixel_centres() -> tuple[torch.Tensor, torch.Tensor]:
    """The x and y of the 28 x 28 pixel centres in normalised coordinates [1, 1, 784],
    computed as affine_grid computes them."""
    line = torch.linspace(-1, 1, 28) * 27 / 28
    return (line.view(1, 28).expand(28, 28).reshape(1, 1, 784),
            line.view(28, 1).expand(28, 28).reshape(1, 1, 784))


def elastic_field(n: int, gen: torch.Generator, alpha_px: float, sigma_px: float) -> torch.Tensor:
    """Smooth random displacement [n, 28, 28, 2] in normalised coordinates: white noise
    blurred by a Gaussian of sigma_px, scaled so its typical size is ~alpha_px pixels."""
    return _planar_elastic_field(n, gen, alpha_px, sigma_px).view(n, 2, 28, 28).permute(0, 2, 3, 1)


def _planar_elastic_field(n: int, gen: torch.Generator, alpha_px: float, sigma_px: float
                          ) -> torch.Tensor:
    """`elastic_field` with its last axis first, [n, 2, 784].

    Drawn as L @ W @ L.T with W white [m, m] and L L.T = B B.T (`field_basis`): the same
    covariance as B @ noise @ B.T, Simard's blurred white noise, from m * m random numbers
    per field rather than 28 * 28 (m = 9 at sigma_px = 4)."""
    basis = field_basis(sigma_px)
    m = basis.shape[1]
    noise = basis @ (torch.randn(n * 2, m, m, generator=gen) @ basis.T)
    noise.mul_(alpha_px * 2 / 28 / (noise.std() + 1e-8))  # in place: it is a large tensor
    return noise.view(n, 2, 784)


@functools.lru_cache(maxsize=8)
def field_basis(sigma_px: float, size: int = 28, rel_tol: float = 1e-6) -> torch.Tensor:
    """L [size, m] with L @ L.T = B @ B.T (B = blur_matrix(sigma_px)) but for the modes
    whose eigenvalue is below rel_tol of the largest: a blur leaves few modes."""
    b = blur_matrix(sigma_px, size).double()
    evals, evecs = torch.linalg.eigh(b @ b.T)
    keep = evals > rel_tol * evals[-1]
    evals, evecs = evals[keep], evecs[:, keep]
    # An eigenvector's sign is arbitrary: fix it so that a seed draws the same field on any
    # machine (a weight neither symmetric nor antisymmetric, as the blur's modes are).
    weight = torch.exp(torch.linspace(0.0, 1.0, size, dtype=torch.float64))
    sign = torch.sign(weight @ evecs)
    return (evecs * sign * evals.sqrt()).float()


def blur_matrix(sigma_px: float, size: int = 28) -> torch.Tensor:
    """B [size, size] with B @ v the Gaussian blur of v (sigma_px, truncated at 3 sigma, the
    image taken as zero beyond its edges): the 1-D convolution as a matrix. B @ v @ B.T blurs
    an image v; `field_basis` draws the elastic field from B's covariance."""
    r = int(math.ceil(3 * sigma_px))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    g = torch.exp(-0.5 * (x / sigma_px) ** 2)
    g = g / g.sum()
    offset = torch.arange(size).view(1, -1) - torch.arange(size).view(-1, 1)  # j - i
    inside = offset.abs() <= r
    return torch.where(inside, g[(offset + r).clamp(0, 2 * r)], torch.zeros(()))


def augment(x: torch.Tensor, gen: torch.Generator, rot_deg: float = 10.0, shift_px: float = 2.0,
            scale: float = 0.1, shear_deg: float = 0.0, elastic_alpha: float = 0.0,
            elastic_sigma: float = 4.0, p: float = 1.0) -> torch.Tensor:
    """Randomly deform a batch x [N, 1, 28, 28]; each image is left untouched with prob 1 - p."""
    n = x.shape[0]
    grid = planar_affine_grid(random_affine_theta(n, gen, rot_deg, shift_px, scale, shear_deg))
    if elastic_alpha > 0:
        grid += _planar_elastic_field(n, gen, elastic_alpha, elastic_sigma)
    grid = grid.view(n, 2, 28, 28).permute(0, 2, 3, 1)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if p < 1.0:
        keep = (torch.rand(n, generator=gen) >= p).view(n, 1, 1, 1)
        out = torch.where(keep, x, out)
    return out


def perturb(x: torch.Tensor, gen: torch.Generator, rate: float, top: float = 255.0
            ) -> torch.Tensor:
    """x with each pixel replaced, with probability `rate`, by a uniform value in [0, top]."""
    replace = torch.rand(x.shape, generator=gen) < rate
    return torch.where(replace, torch.rand(x.shape, generator=gen) * top, x)
