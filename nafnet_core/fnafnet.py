"""FNAFNet's block (Mao et al., AAAI 2023, "Intriguing Findings of Frequency Selection for Image Deblurring"):
a NAFBlock with windowed channel attention and two windowed FFT branches.

Official code: ``WNAFBlock_ffc3_gelu_sin_2block`` and ``fft_bench_complex_mlp`` (INVOKERer/DeepRFT, branch
AAAI2023). Module and parameter names are the official ones (``fft_block1.complex_weight1_real``,
``fft_block2.b2_imag``, ``sca.1``, ...), so official ``{'params': ...}`` files load strictly.

The block, with ``t = norm1(inp)``:

    x = sca_windows(gate(conv2(conv1(t))))                    SCA pooled per window of ``sca_window``
    x = conv3(x) + sin(fft1(t));              y = inp + beta * x
    u = norm2(y);  x = sin(fft2(u)) + conv5(gate(conv4(u))); out = y + gamma * x

(without FFT branches at its level, fft_window = -1, the block is NAFNet's with windowed SCA).
An FFT branch (c channels, hidden ``dw_expand * c``) on windows of ``fft_window`` (0: the whole map):
``Y = rfft2(window)`` (norm 'backward'), a complex linear c -> 2c over channels with a complex bias, exact
GELU on the real and imaginary parts separately, a complex linear 2c -> c with bias, ``irfft2(s=window)``.

Windows (the official ``window_partitionx`` / ``window_reversex``): non-overlapping ws x ws windows from the
top-left; when a side is not a multiple of ws, one more column (row) of windows aligned to the right (bottom)
edge, and the bottom-right corner window. Every window is computed whole, but each pixel takes its value
from the top-left grid where that grid covers it: an edge window only supplies the strip the grid leaves
uncovered (its overlap with the grid is discarded).

The FFTs are real matrix products (:mod:`nafnet_core.dft`): no ``DFT`` op and no complex tensor in an
exported graph, and the branch is an FP32 island in a half model (a 64 x 64 window's DC term is its sum,
far past FP16's 65504); its output is cast back to the convs' dtype.

Sizes (where this departs from the official code): the official code needs every window to fit in its map
(inputs >= 128 px per side for the GoPro presets; it fails below). :class:`~nafnet_core.model.NAFNet` pads
the input (zeros, right and bottom) to at least ``config.min_side`` (the largest window times its level's
downscale) as well as to a multiple of 16, and crops the output back. For inputs whose padded size is at
least ``min_side`` (>= 128 px for the GoPro presets) the output equals the official one; smaller inputs give
the official network's output on the zero-padded image, cropped.

TLC: the SCA pooling is a :class:`~nafnet_core.layers.GlobalAvgPool2d` in ``sca[0]``, applied to each window,
so :func:`~nafnet_core.tlc.convert_to_tlc` swaps it like NAFNet's (the official ``FNAFNetLocal`` also swaps
only that pooling). A TLC kernel at least as large as the window pools the whole window, exactly the
global mean: with the GoPro windows (64 at level 0 ... 8 in the middle) and TLC kernels from 256-px training
(384 ... 24) TLC changes nothing (tests/test_fnafnet.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dft
from .config import ModelConfig
from .layers import BlockSite, NAFBlock, scaled_branch, to_branch, to_stream


def _nonempty(n) -> bool:
    """False only for a concrete 0 (a symbolic size may be 0 at run time: keep that part in the graph)."""
    return not isinstance(n, int) or n > 0


def _tiles(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(N, C, a*ws, b*ws) -> (N*a*b, C, ws, ws): the ws x ws tiles of ``x``, row-major per image."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // ws, ws, w // ws, ws).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(-1, c, ws, ws)


def _untile(t: torch.Tensor, n: int, a, b, ws: int) -> torch.Tensor:
    """Inverse of :func:`_tiles`: (n*a*b, C, ws, ws) -> (n, C, a*ws, b*ws)."""
    c = t.shape[1]
    t = t.reshape(n, a, b, c, ws, ws).permute(0, 3, 1, 4, 2, 5)
    return t.reshape(n, c, a * ws, b * ws)


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """The official windows of ``x`` (N, C, H, W), H and W >= ws: (windows, C, ws, ws).

    Order: the top-left grid, then (if W is not a multiple of ws) the right column aligned to the right edge,
    then (if H is not) the bottom row aligned to the bottom edge, then (if neither is) the bottom-right window.
    """
    h_full, w_full = x.shape[-2:]
    h, w = ws * (h_full // ws), ws * (w_full // ws)
    parts = [_tiles(x[..., :h, :w], ws)]
    right, bottom = _nonempty(w_full - w), _nonempty(h_full - h)
    if right:
        parts.append(_tiles(x[..., :h, w_full - ws:], ws))
    if bottom:
        parts.append(_tiles(x[..., h_full - ws:, :w], ws))
    if right and bottom:
        parts.append(x[..., h_full - ws:, w_full - ws:])
    return torch.cat(parts, 0) if len(parts) > 1 else parts[0]


def window_merge(t: torch.Tensor, n: int, size: tuple, ws: int) -> torch.Tensor:
    """Inverse of :func:`window_partition` to (n, C, H, W): the grid where it covers, edge windows elsewhere."""
    h_full, w_full = size
    a, b = h_full // ws, w_full // ws
    h, w = a * ws, b * ws
    right, bottom = _nonempty(w_full - w), _nonempty(h_full - h)
    out = _untile(t[: n * a * b], n, a, b, ws)  # (n, C, h, w)
    start = n * a * b
    if right:
        r = _untile(t[start: start + n * a], n, a, 1, ws)  # (n, C, h, ws)
        out = torch.cat([out, r[..., ws - (w_full - w):]], -1)
        start = start + n * a
    if bottom:
        d = _untile(t[start: start + n * b], n, 1, b, ws)  # (n, C, ws, w)
        d = d[..., ws - (h_full - h):, :]
        if right:
            corner = t[start + n * b:]  # (n, C, ws, ws)
            d = torch.cat([d, corner[..., ws - (h_full - h):, ws - (w_full - w):]], -1)
        out = torch.cat([out, d], -2)
    return out


class FFTBranch(nn.Module):
    """The official ``fft_bench_complex_mlp`` (GELU, with bias): a complex MLP over channels on windowed spectra.

    Args:
        dim: channels in and out.
        expand: hidden channels = ``dim * expand``.
        window: window side (0: the whole map).
    """

    #: Computes in FP32 inside a half model (the FP16 range report of ``export lint`` skips its output).
    fp32_island = True

    def __init__(self, dim: int, expand: int, window: int):
        super().__init__()
        hid = dim * expand
        self.window = window
        self.complex_weight1_real = nn.Parameter(torch.empty(dim, hid))
        self.complex_weight1_imag = nn.Parameter(torch.empty(dim, hid))
        self.complex_weight2_real = nn.Parameter(torch.empty(hid, dim))
        self.complex_weight2_imag = nn.Parameter(torch.empty(hid, dim))
        for w in (self.complex_weight1_real, self.complex_weight1_imag, self.complex_weight2_real,
                  self.complex_weight2_imag):
            nn.init.kaiming_uniform_(w, a=4.0)  # the official init (a = sqrt(16))
        self.b1_real = nn.Parameter(torch.zeros(1, 1, 1, hid))
        self.b1_imag = nn.Parameter(torch.zeros(1, 1, 1, hid))
        self.b2_real = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.b2_imag = nn.Parameter(torch.zeros(1, 1, 1, dim))

        if window > 0:  # fixed window: the DFT matrices are constants (non-persistent buffers)
            for name, m in zip(("rfft_right", "rfft_left"), dft.rfft2_stacked_matrices(window, window)):
                self.register_buffer(name, m, persistent=False)
            for name, m in zip(("irfft_left", "irfft_right"), dft.irfft2_stacked_matrices(window, window)):
                self.register_buffer(name, m, persistent=False)

    def _apply(self, fn, recurse=True):
        # the DFT matrices stay FP32 whatever .half() / .to(dtype) does to the module (an FP32 island)
        super()._apply(fn, recurse)
        for name, buf in self.named_buffers(recurse=False):
            if buf.dtype != torch.float32:
                setattr(self, name, buf.float())
        return self

    @staticmethod
    def _complex_linear(y: torch.Tensor, wr: torch.Tensor, wi: torch.Tensor, br: torch.Tensor,
                        bi: torch.Tensor) -> torch.Tensor:
        """``Y @ (wr + i wi) + (br + i bi)`` over the channels of a spectrum with the real and imaginary parts
        interleaved per channel, (B, 2 C_in, L) -> (B, 2 C_out, L), as one real FP32 MatMul."""
        wr, wi = wr.float().T, wi.float().T  # (out, in)
        m = torch.stack([torch.stack([wr, -wi], -1), torch.stack([wi, wr], -1)], 1)  # (out, 2, in, 2)
        bias = torch.stack([br.float().reshape(-1), bi.float().reshape(-1)], 1).reshape(-1, 1)
        return m.reshape(2 * m.shape[0], -1) @ y + bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, C, H, W) FP32
        n, c, h_full, w_full = x.shape
        ws = self.window
        xw = window_partition(x, ws) if ws else x
        h, w = xw.shape[-2:]
        if ws:
            mats = self.rfft_right, self.rfft_left, self.irfft_left, self.irfft_right
        else:  # the whole map: matrices of its (possibly symbolic) size, built in the graph
            mats = dft.rfft2_stacked_matrices(h, w, x.device) + dft.irfft2_stacked_matrices(h, w, x.device)
        y = dft.rfft2_stacked(xw, mats[0], mats[1])  # (B, C, 2h, f) = [Re; Im] along H, FP32
        b, f = y.shape[0], y.shape[-1]
        y = y.reshape(b, 2 * c, h * f)  # channel-major, [re; im] per channel
        y = self._complex_linear(y, self.complex_weight1_real, self.complex_weight1_imag, self.b1_real, self.b1_imag)
        y = F.gelu(y)  # exact GELU on the real and imaginary parts alike
        y = self._complex_linear(y, self.complex_weight2_real, self.complex_weight2_imag, self.b2_real, self.b2_imag)
        y = dft.irfft2_stacked(y.reshape(b, c, 2 * h, f), mats[2], mats[3])  # (B, C, h, w)
        return window_merge(y, n, (h_full, w_full), ws) if ws else y

    def extra_repr(self) -> str:
        return f"window={self.window or 'whole map'}"


class FNAFBlock(NAFBlock):
    """FNAFNet's block (``WNAFBlock_ffc3_gelu_sin_2block``): NAFBlock + windowed SCA + two FFT branches.

    Args:
        c: channels in and out.
        sca_window: SCA pooled per window of this side (0: the whole map, NAFNet's SCA).
        fft_window: window of the FFT branches (0: the whole map; -1: no FFT branches).
        dw_expand: expansion of the depthwise branch (also the FFT branches' hidden expansion).
        ffn_expand: expansion of the feed-forward branch.
        drop_out_rate: dropout after conv3 (+ FFT) and conv5 (+ FFT).
        gate: gate kind (see :class:`~nafnet_core.layers.Gate`; official: ``simple``).
    """

    def __init__(self, c: int, sca_window: int = 0, fft_window: int = -1, dw_expand: int = 2, ffn_expand: int = 2,
                 drop_out_rate: float = 0.0, gate: str = "simple"):
        super().__init__(c, dw_expand, ffn_expand, drop_out_rate, gate)
        self.sca_window = sca_window
        self.fft_window = fft_window
        if fft_window >= 0:
            self.fft_block1 = FFTBranch(c, dw_expand, fft_window)
            self.fft_block2 = FFTBranch(c, dw_expand, fft_window)
        else:
            self.fft_block1 = self.fft_block2 = None

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """``x * sca(x)`` with the pooling (and the 1x1 conv) per window of ``sca_window``."""
        ws = self.sca_window
        if not ws:
            return x * self.sca(x)
        t = window_partition(x, ws)
        return window_merge(t * self.sca(t), x.shape[0], tuple(x.shape[-2:]), ws)

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        s = self.fp32_stream
        inp = inp.float() if s else inp
        t = self.norm1(inp)
        x = self.sg(self.conv2(self.conv1(to_branch(t, self.conv1, s))))
        x = self.conv3(self.attention(x))
        if self.fft_block1 is not None:
            x = x + torch.sin(self.fft_block1(t)).to(x.dtype)
        y = inp + to_stream(scaled_branch(x, self.beta, self.dropout1), s)

        u = self.norm2(y)
        x = self.conv5(self.sg(self.conv4(to_branch(u, self.conv4, s))))
        if self.fft_block2 is not None:
            x = torch.sin(self.fft_block2(u)).to(x.dtype) + x
        return y + to_stream(scaled_branch(x, self.gamma, self.dropout2), s)

    def extra_repr(self) -> str:
        return f"sca_window={self.sca_window or 'whole map'}, fft_window={self.fft_window}"


def site_windows(config: ModelConfig, site: BlockSite) -> tuple[int, int]:
    """(sca window, fft window) of the block at ``site``: its level's entries (the middle's last); decoders use
    their encoder level's. No windows configured: global SCA, no FFT branches."""
    i = len(config.enc_blk_nums) if site.stage == "mid" else site.level
    sca = config.sca_windows[i] if config.sca_windows else 0
    fft = config.fft_windows[i] if config.fft_windows else -1
    return sca, fft


def fnaf_block(config: ModelConfig, c: int, site: BlockSite) -> FNAFBlock:
    """The FNAFNet block with ``c`` channels at ``site`` (windows from ``config.sca_windows``/``fft_windows``)."""
    sca, fft = site_windows(config, site)
    return FNAFBlock(c, sca, fft, config.dw_expand, config.ffn_expand, config.drop_out_rate, config.gate)


__all__ = ["FNAFBlock", "FFTBranch", "fnaf_block", "site_windows", "window_partition", "window_merge"]
