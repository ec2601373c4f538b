"""Procedural 16x16 grey-scale image tasks for the ``classify`` zoo family (no downloads).

Every task has its own input distribution and label space, like the eight datasets of the CLIP
task-arithmetic benchmark (Ilharco et al., ICLR 2023). All generators are vectorised torch code driven
by a ``torch.Generator``, so a (task, split, seed) triple always gives the same tensors.
"""
from __future__ import annotations

import math

import torch

SIDE = 16

# 3x5 bitmap font for the digits task (rows top to bottom, 3 bits each).
_FONT = [
    "111101101101111", "010110010010111", "111001111100111", "111001111001111", "101101111001001",
    "111100111001111", "111100111101111", "111001010010010", "111101111101111", "111101111001111",
]


def _grid(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    ys, xs = torch.meshgrid(torch.arange(SIDE, dtype=torch.float32), torch.arange(SIDE, dtype=torch.float32), indexing="ij")
    return ys.expand(n, SIDE, SIDE), xs.expand(n, SIDE, SIDE)


def _u(g, n, lo, hi):
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _col(v):
    return v.view(-1, 1, 1)


def shapes(n, g):
    """4 classes: filled square, disc, triangle, plus sign; random place, size and intensity."""
    y = torch.randint(0, 4, (n,), generator=g)
    ys, xs = _grid(n)
    r = _col(_u(g, n, 3.0, 5.0))
    dy = ys - _col(_u(g, n, 6.0, 10.0))
    dx = xs - _col(_u(g, n, 6.0, 10.0))
    sq = (dx.abs() <= r) & (dy.abs() <= r)
    disc = dx**2 + dy**2 <= r**2
    tri = (dy.abs() <= r) & (dx.abs() <= (dy + r) / 2)
    plus = ((dx.abs() <= r / 3) & (dy.abs() <= r)) | ((dy.abs() <= r / 3) & (dx.abs() <= r))
    masks = torch.stack([sq, disc, tri, plus], 1)[torch.arange(n), y]
    return masks.float() * _col(_u(g, n, 0.5, 1.0)), y


def count(n, g):
    """4 classes: 1..4 small dots."""
    y = torch.randint(0, 4, (n,), generator=g)
    img = torch.zeros(n, SIDE, SIDE)
    cells = torch.rand(n, 16, generator=g).argsort(dim=1)[:, :4]  # 4 distinct cells of a 4x4 grid
    jit = torch.randint(0, 3, (n, 4, 2), generator=g)
    for k in range(4):
        on = y >= k
        r = (cells[:, k] // 4) * 4 + jit[:, k, 0]
        c = (cells[:, k] % 4) * 4 + jit[:, k, 1]
        idx = torch.nonzero(on).squeeze(1)
        for oy in (0, 1):
            for ox in (0, 1):
                img[idx, r[idx] + oy, c[idx] + ox] = 1.0
    return img * _col(_u(g, n, 0.8, 1.0)), y


def _grating(n, g, angle, freq):
    ys, xs = _grid(n)
    phase = _col(_u(g, n, 0, 2 * math.pi))
    a, f = _col(angle), _col(freq)
    proj = xs * torch.cos(a) + ys * torch.sin(a)
    return 0.5 + 0.5 * torch.sin(2 * math.pi * f * proj / SIDE + phase)


def orient(n, g):
    """4 classes: orientation of a grating (0, 45, 90, 135 degrees, +-10 jitter), random frequency."""
    y = torch.randint(0, 4, (n,), generator=g)
    angle = y.float() * math.pi / 4 + _u(g, n, -0.17, 0.17)
    return _grating(n, g, angle, _u(g, n, 1.5, 4.0)) * _col(_u(g, n, 0.5, 1.0)), y


def freq(n, g):
    """4 classes: spatial frequency of a grating (1, 2, 3, 4.5 cycles per image), random orientation."""
    y = torch.randint(0, 4, (n,), generator=g)
    f = torch.tensor([1.0, 2.0, 3.0, 4.5])[y] * _u(g, n, 0.9, 1.1)
    return _grating(n, g, _u(g, n, 0, math.pi), f) * _col(_u(g, n, 0.5, 1.0)), y


def digits(n, g):
    """10 classes: 3x5 bitmap digits scaled x2 at a random place."""
    y = torch.randint(0, 10, (n,), generator=g)
    font = torch.tensor([[int(b) for b in s] for s in _FONT], dtype=torch.float32).view(10, 5, 3)
    big = font.repeat_interleave(2, 1).repeat_interleave(2, 2)  # 10 x 10 x 6
    img = torch.zeros(n, SIDE, SIDE)
    oy = torch.randint(1, 6, (n,), generator=g)
    ox = torch.randint(3, 8, (n,), generator=g)
    rows = oy.view(-1, 1, 1) + torch.arange(10).view(1, -1, 1)
    cols = ox.view(-1, 1, 1) + torch.arange(6).view(1, 1, -1)
    img[torch.arange(n).view(-1, 1, 1), rows, cols] = big[y]
    return img * _col(_u(g, n, 0.5, 1.0)), y


def symmetry(n, g):
    """4 classes: random pattern mirrored left-right, top-bottom, both, or neither."""
    y = torch.randint(0, 4, (n,), generator=g)
    img = (torch.rand(n, SIDE, SIDE, generator=g) < 0.35).float()
    lr = (y == 0) | (y == 2)
    tb = (y == 1) | (y == 2)
    img = torch.where(lr.view(-1, 1, 1), torch.cat([img[:, :, :8], img[:, :, :8].flip(2)], 2), img)
    img = torch.where(tb.view(-1, 1, 1), torch.cat([img[:, :8], img[:, :8].flip(1)], 1), img)
    return img * _col(_u(g, n, 0.5, 1.0)), y


TASKS = {"shapes": (shapes, 4), "count": (count, 4), "orient": (orient, 4), "freq": (freq, 4),
         "digits": (digits, 10), "symmetry": (symmetry, 4)}


def make(task: str, n: int, seed: int, noise: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images of ``task`` as (x [n, 256] float32, y [n] int64), with Gaussian pixel noise."""
    fn, _ = TASKS[task]
    g = torch.Generator().manual_seed(seed)
    x, y = fn(n, g)
    x = x + noise * torch.randn(x.shape, generator=g) + _col(_u(g, n, -0.05, 0.05))
    return x.reshape(n, SIDE * SIDE), y
