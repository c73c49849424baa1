"""Real 2-D FFTs as products with cosine/sine matrices: ``rfft2`` / ``irfft2`` that TensorRT can run.

TensorRT's ONNX parser has no ``DFT`` op and no complex type, and torch's exporter turns
``torch.fft.rfft2`` into ``DFT``. For a map of known size the transforms are matrix products with
constant matrices, which every backend runs (and which stay FP32 islands inside an FP16 graph: a
64x64 window's DC term is its sum, far past FP16's 65504).

With ``C_N[a, b] = cos(2 pi a b / N)`` and ``S_N[a, b] = sin(2 pi a b / N)``:

    rfft2:   A = x C_W,  B = -x S_W        (first W // 2 + 1 columns: the one-sided spectrum)
             Re = C_H A + S_H B,  Im = C_H B - S_H A
    irfft2:  Zr = (C_H Yr - S_H Yi) / H,  Zi = (C_H Yi + S_H Yr) / H          (inverse along H)
             x = Zr Chat - Zi Shat,  Chat[l, w] = a_l cos(2 pi l w / W) / W,  Shat likewise with sin
             a_0 = 1, a_{W/2} = 1 for even W, otherwise a_l = 2

The imaginary parts of columns 0 and W/2 drop out of irfft2 (their sines are 0), as in torch's CPU
FFT. Angles are formed as ``2 pi ((a * b) mod N) / N`` with the product and the modulo in integers,
so they stay exact for any N (a float ``a * b`` loses bits past 2**24); only the final scaling and the
cos/sin are FP32. The matrices are built with torch ops from the sizes, so the same code gives
constants in a fixed-shape graph and in-graph matrices in a dynamic one.

:func:`frequency_selection` is the input image of ``input_fft='fs'`` (docs/DESIGN.md §16 (The input FFT)):
``irfft2(relu(Re F) + i relu(Im F), s=(H, W))`` with ``F = rfft2(x)`` over the whole (padded) image.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator

import torch


def cos_sin(n_rows, n_cols, n, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """FP32 ``cos`` and ``sin`` of ``2 pi (a b mod n) / n`` for a < ``n_rows``, b < ``n_cols``: (n_rows, n_cols)."""
    a = torch.arange(n_rows, device=device, dtype=torch.int64)
    b = torch.arange(n_cols, device=device, dtype=torch.int64)
    # the modulus as a 0-d tensor: with a symbolic n (dynamic export) `% n` has no ONNX translation
    m = torch.remainder(a[:, None] * b[None, :], torch.ones((), device=device, dtype=torch.int64) * n)
    angle = m.to(torch.float32) * (2 * math.pi / n)
    return torch.cos(angle), torch.sin(angle)


def rfft2(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(real, imaginary) of ``torch.fft.rfft2(x, norm='backward')`` in FP32: (..., H, W) -> (..., H, W // 2 + 1)."""
    h, w = x.shape[-2:]
    x = x.float()
    cw, sw = cos_sin(w, w // 2 + 1, w, x.device)  # (W, W/2+1)
    ch, sh = cos_sin(h, h, h, x.device)  # (H, H), symmetric
    a = x @ cw
    b = -(x @ sw)
    return ch @ a + sh @ b, ch @ b - sh @ a


def irfft2(re: torch.Tensor, im: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``torch.fft.irfft2(re + i im, s=size, norm='backward')`` in FP32: (..., H, W // 2 + 1) -> (..., H, W)."""
    h, w = size
    re, im = re.float(), im.float()
    ch, sh = cos_sin(h, h, h, re.device)
    zr = (ch @ re - sh @ im) / h
    zi = (ch @ im + sh @ re) / h
    n_freq = w // 2 + 1
    c, s = cos_sin(n_freq, w, w, re.device)  # (W/2+1, W)
    freq = torch.arange(n_freq, device=re.device)
    # a_l / W: 1 for the DC column and (even W) the Nyquist column, 2 for the columns that stand for two
    weight = (2 - (freq == 0).to(torch.float32) - (2 * freq == w).to(torch.float32))[:, None] / w
    return zr @ (c * weight) - zi @ (s * weight)


# ---------------------------------------------------------------------------------------------------------
# Stacked forms with precomputed matrices: fewer, larger products (and graph nodes) for a fixed window.
# The real and imaginary parts travel stacked along H: (..., 2H, F) = [Re; Im].


def rfft2_stacked_matrices(h, w, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The matrices of :func:`rfft2_stacked` for an h x w map: ``[C_W | -S_W]`` (W, 2F) and
    ``[[C_H, S_H], [-S_H, C_H]]`` (2H, 2H), F = W // 2 + 1."""
    cw, sw = cos_sin(w, w // 2 + 1, w, device)
    ch, sh = cos_sin(h, h, h, device)
    return torch.cat([cw, -sw], 1), torch.cat([torch.cat([ch, sh], 1), torch.cat([-sh, ch], 1)], 0)


def rfft2_stacked(x: torch.Tensor, right: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """``rfft2(x)`` as ``[Re; Im]`` stacked along H, FP32: (..., H, W) -> (..., 2H, W // 2 + 1).

    Args:
        x: the map.
        right, left: :func:`rfft2_stacked_matrices` of its size.
    """
    ab = x.float() @ right  # (..., H, 2F) = [A | B], A = x C_W, B = -x S_W
    f = right.shape[-1] // 2  # slices, not chunk: a symbolic chunk exports as SplitToSequence
    return left @ torch.cat([ab[..., :f], ab[..., f:]], -2)  # [C_H A + S_H B; C_H B - S_H A]


def irfft2_stacked_matrices(h, w, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The matrices of :func:`irfft2_stacked` for an h x w output: ``[[C_H, -S_H], [S_H, C_H]] / H`` (2H, 2H)
    and ``[Chat; -Shat]`` (2F, W) (see the module docstring)."""
    ch, sh = cos_sin(h, h, h, device)
    left = torch.cat([torch.cat([ch, -sh], 1), torch.cat([sh, ch], 1)], 0) / h
    n_freq = w // 2 + 1
    c, s = cos_sin(n_freq, w, w, device)
    freq = torch.arange(n_freq, device=device)
    weight = (2 - (freq == 0).to(torch.float32) - (2 * freq == w).to(torch.float32))[:, None] / w
    return left, torch.cat([c * weight, -(s * weight)], 0)


def irfft2_stacked(y: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``irfft2`` of ``[Yr; Yi]`` stacked along H, FP32: (..., 2H, F) -> (..., H, W).

    Args:
        y: the stacked spectrum.
        left, right: :func:`irfft2_stacked_matrices` of the output size.
    """
    z = left @ y.float()  # inverse along H: [Zr; Zi]
    h = left.shape[-1] // 2
    return torch.cat([z[..., :h, :], z[..., h:, :]], -1) @ right  # Zr Chat - Zi Shat


#: Set by :func:`matrix_form`: eager code computes the frequency selection with the matrices too.
_MATRIX_FORM: contextvars.ContextVar[bool] = contextvars.ContextVar("nafnet_dft_matrix_form", default=False)


@contextlib.contextmanager
def matrix_form() -> Iterator[None]:
    """Within this block :func:`frequency_selection` uses the matrices in eager mode too (FLOP counts of the
    exported form, equality tests, benchmarks)."""
    token = _MATRIX_FORM.set(True)
    try:
        yield
    finally:
        _MATRIX_FORM.reset(token)


def uses_matrices() -> bool:
    """True when the transforms must be matrix products: export, tracing, compiling, or :func:`matrix_form`."""
    return (_MATRIX_FORM.get() or torch.compiler.is_compiling() or torch.compiler.is_exporting()
            or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing())


def frequency_selection(x: torch.Tensor) -> torch.Tensor:
    """The frequency-selection image of ``x`` (..., H, W): ``irfft2(relu(Re F) + i relu(Im F), s=(H, W))`` with
    ``F = rfft2(x)`` over the last two axes; computed in FP32 (an FP32 island in a half model), returned in
    ``x``'s dtype. Spatially aligned with ``x``, no parameters (the ``FFT_ReLU`` of Mao et al., AAAI 2023).

    Exported, traced or compiled it is the matrix form of this module (no ``DFT`` op, no complex type);
    in eager mode it is ``torch.fft``, the same values to FP32 rounding and ~10x faster at 720x1280
    (BENCHMARKS.md, "Input FFT (input_fft=fs)"), unless inside :func:`matrix_form`.

    Args:
        x: image(s); the transform spans the whole of the last two axes (the caller decides what "whole" is).
    """
    size = (x.shape[-2], x.shape[-1])
    if uses_matrices():
        re, im = rfft2(x)
        return irfft2(torch.relu(re), torch.relu(im), size).to(x.dtype)
    spectrum = torch.fft.rfft2(x.float(), norm="backward")
    selected = torch.complex(torch.relu(spectrum.real), torch.relu(spectrum.imag))
    return torch.fft.irfft2(selected, s=size, norm="backward").to(x.dtype)
