"""Property tests (hypothesis) of the tiling math, for any image size, tile and overlap.

- the tiles cover every pixel, stay inside the (padded) image and overlap by at least ``overlap``;
- the blending weights of a pixel, normalised as run_tiled does, sum to 1 everywhere (and the raw sum
  is never 0, so nothing is divided by zero);
- an identity runner gives back the input exactly, bit for bit (run_tiled blends in float64; in
  float32 the weighted average of equal values was off by up to ~4 ulps, found by this test), and so
  the uint8 image any output file holds is the input's;
- a runner that adds a per-tile constant shows every pixel's weights are a convex combination.

The TLC part of item 4 (cumulative-sum TLC == direct pooling on random shapes, symbolic and constant
forms) is tests/test_tlc_properties.py.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nafnet_core as nc
from nafnet_core.config import DEFAULT_PAD_MULTIPLE as PAD_MULTIPLE
from nafnet_core.config import padded_size
from runtime.tiling import TileSpec, restore_tensor, run_tiled, tile_starts, tile_weights, weight_sum

SETTINGS = settings(max_examples=150, deadline=None)


@st.composite
def grids(draw, max_len: int = 700):
    """(length, tile, overlap) with a valid TileSpec side."""
    tile = draw(st.integers(1, 12)) * PAD_MULTIPLE
    overlap = draw(st.integers(0, tile - 1))
    length = draw(st.integers(1, max_len))
    return length, tile, overlap


@SETTINGS
@given(grids())
def test_tiles_cover_every_pixel_inside_the_image_with_the_overlap(grid):
    length, tile, overlap = grid
    padded = max(padded_size(length), tile)  # what run_tiled sees along this axis
    starts = tile_starts(padded, tile, overlap)
    assert starts[0] == 0 and starts == sorted(set(starts))
    assert all(0 <= s <= padded - tile for s in starts)  # inside the image
    covered = torch.zeros(padded, dtype=torch.int32)
    for s in starts:
        covered[s:s + tile] += 1
    assert int(covered.min()) >= 1  # every pixel
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # neighbours overlap enough


@SETTINGS
@given(grids())
def test_normalised_blending_weights_sum_to_one(grid):
    length, tile, overlap = grid
    padded = max(padded_size(length), tile)
    starts = tile_starts(padded, tile, overlap)
    weights = tile_weights(starts, tile, overlap)
    total = weight_sum(padded, starts, weights)
    assert float(total.min()) > 0.5  # never divides by (near) zero: border tiles keep weight 1
    normalised = torch.zeros(padded, dtype=torch.float64)
    for s, w in zip(starts, weights):
        normalised[s:s + tile] += w.double() / total[s:s + tile].double()
    torch.testing.assert_close(normalised, torch.ones(padded, dtype=torch.float64), rtol=0, atol=1e-6)


@st.composite
def images(draw):
    h, w = draw(st.integers(1, 160)), draw(st.integers(1, 160))
    th, tw = draw(st.integers(1, 6)) * PAD_MULTIPLE, draw(st.integers(1, 6)) * PAD_MULTIPLE
    overlap = draw(st.integers(0, min(th, tw) - 1))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, h, w, generator=g)
    if draw(st.booleans()):  # as decoded from an 8-bit file
        x = torch.randint(0, 256, (1, 3, h, w), generator=g).float() / 255
    return x, TileSpec((th, tw), overlap)


@SETTINGS
@given(images())
def test_identity_runner_returns_the_input(case):
    x, spec = case
    calls = []

    def identity(t: torch.Tensor) -> torch.Tensor:
        assert tuple(t.shape[-2:]) == spec.tile  # a fixed-shape runner only ever sees its tile
        calls.append(1)
        return t.clone()

    y = restore_tensor(identity, x, spec)
    assert y.shape == x.shape and y.dtype == torch.float32 and calls
    assert torch.equal(y, x), float((y - x).abs().max())
    assert torch.equal(nc.quantize(y), nc.quantize(x))


@SETTINGS
@given(images())
def test_output_is_a_convex_combination_of_tile_outputs(case):
    """Each tile adds its own constant: every output pixel lies between the smallest and largest constant
    of the tiles covering it, i.e. the blend weights are non-negative and sum to one."""
    x, spec = case
    x = pad = torch.nn.functional.pad(x, (0, padded_size(x.shape[-1]) - x.shape[-1],
                                          0, padded_size(x.shape[-2]) - x.shape[-2]))
    offsets = []

    def shifted(t: torch.Tensor) -> torch.Tensor:
        offsets.append(float(len(offsets)))
        return torch.full_like(t, offsets[-1])

    y = run_tiled(shifted, pad, spec)
    assert float(y.min()) >= -1e-5 and float(y.max()) <= offsets[-1] + 1e-5
    if len(offsets) == 1:
        assert torch.equal(y, torch.zeros_like(y))
