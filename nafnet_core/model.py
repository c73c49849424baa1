"""NAFNet (Chen et al., "Simple Baselines for Image Restoration", ECCV 2022).

The U (intro, encoders, middle, decoders, ending) over the block kinds of :data:`BLOCK_KINDS`; the blocks'
parts live in :mod:`nafnet_core.layers`.

Module and parameter names are the official ones (``intro``, ``encoders.i.j.conv1``,
``sca.1``, ``norm1``, ``beta``, ...), so official ``{'params': state_dict}`` files
load without remapping.

Mixed precision: the channel LayerNorm and the pooling reductions always compute
in FP32, whatever the module's dtype (a residual stream reaching |x| ~ 175 makes
the channel sums overflow FP16). A ``model.half()`` therefore runs with the same
FP32 islands as the exported FP16 ONNX graph. A half model also accepts FP32 input: it casts
after padding, computes in FP16, and adds the global residual in the input's dtype, so FP32 in
gives FP32 out with an exact FP32 skip path (the FP16 ONNX graph is exactly this model exported).

Multi-head models (``heads > 1``, CascadedGaze's GoPro model): the ending conv gives ``heads`` images,
averaged pairwise into ``n_outputs`` outputs (:func:`head_pairs`), each plus the input. ``model(x)``
returns one of them, the deployment head :attr:`NAFNet.head` (0 until a validation chooses one;
checkpoints record it), so TLC, folding, export and every runner see a single-image model;
``model(x, all_heads=True)`` returns them all, (N, n_outputs, C, H, W), for training and evaluation.

Deploy-time folding (``export.fold``) removes the LayerNorm affine (``affine=False``) and
beta/gamma (set to ``None``); the forward passes below accept both forms.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cgnet import cg_block
from .config import ModelConfig
from .dft import frequency_selection
from .fnafnet import fnaf_block
from .layers import BlockSite, NAFBlock


def naf_block(config: ModelConfig, c: int, site: BlockSite) -> NAFBlock:
    """The plain NAFNet block (the same at every site)."""
    return NAFBlock(c, config.dw_expand, config.ffn_expand, config.drop_out_rate, config.gate)


#: Block kinds by ``ModelConfig.block``: each makes the block with ``c`` channels at a site of the U.
BLOCK_KINDS = {"naf": naf_block, "fnaf": fnaf_block, "cg": cg_block}


def make_block(config: ModelConfig, c: int, site: BlockSite) -> nn.Module:
    """The block of ``config.block``'s kind with ``c`` channels at ``site`` (one family, several block kinds)."""
    return BLOCK_KINDS[config.block](config, c, site)


class NAFNet(nn.Module):
    """U-shaped NAFNet with additive skips and a global residual; the block kind comes from the config.

    Args:
        config: the architecture (see :class:`~nafnet_core.config.ModelConfig`).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.decoder != "unet":
            raise ValueError(f"NAFNet builds decoder 'unet'; decoder {config.decoder!r} is built by build_model")
        self.config = config
        c = config.width
        levels = len(config.enc_blk_nums)

        def blocks(ch: int, n: int, stage: str, level: int) -> nn.Sequential:
            return nn.Sequential(*[make_block(config, ch, BlockSite(stage, level, i)) for i in range(n)])

        in_channels = config.img_channel * (2 if config.input_fft == "fs" else 1)
        self.intro = nn.Conv2d(in_channels, c, 3, padding=1)
        self.encoders = nn.ModuleList()
        self.downs = nn.ModuleList()
        for level, n in enumerate(config.enc_blk_nums):
            self.encoders.append(blocks(c, n, "enc", level))
            self.downs.append(nn.Conv2d(c, 2 * c, 2, stride=2))
            c *= 2
        self.middle_blks = blocks(c, config.middle_blk_num, "mid", levels)
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for j, n in enumerate(config.dec_blk_nums):
            self.ups.append(nn.Sequential(nn.Conv2d(c, 2 * c, 1, bias=False), nn.PixelShuffle(2)))
            c //= 2
            self.decoders.append(blocks(c, n, "dec", levels - 1 - j))
        self.ending = nn.Conv2d(config.width, config.img_channel * config.heads, 3, padding=1)
        self.padder_size = config.pad_multiple
        self.head = 0

    @property
    def head(self) -> int:
        """The output ``forward`` returns: index into :func:`head_pairs` (0 until a validation chooses one;
        checkpoints record it). Always 0 for a single-head model."""
        return self._head

    @head.setter
    def head(self, k: int) -> None:
        n = self.config.n_outputs
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < n:
            raise ValueError(f"head must be an output index in 0..{n - 1} (the model has {n} output"
                             f"{'s' if n > 1 else ''}), got {k!r}")
        self._head = k

    def tlc_sites(self) -> list[tuple[nn.Sequential, int]]:
        """The stages whose SCA pooling TLC converts, with their levels (decoder i at level ``levels - 1 - i``)."""
        sites = [(enc, i) for i, enc in enumerate(self.encoders)]
        sites.append((self.middle_blks, len(self.encoders)))
        return sites + [(dec, len(self.decoders) - 1 - i) for i, dec in enumerate(self.decoders)]

    def forward(self, inp: torch.Tensor, all_heads: bool = False) -> torch.Tensor:
        """The restored image (N, C, H, W) of the deployment head :attr:`head`; with ``all_heads`` every
        output, (N, n_outputs, C, H, W) (training and evaluation of multi-head models)."""
        h, w = inp.shape[-2:]
        inp = self.pad_input(inp)
        # FP32 input into a half model: cast after padding
        x = self.intro(self.intro_input(inp).to(self.intro.weight.dtype))
        skips = []
        for encoder, down in zip(self.encoders, self.downs):
            x = encoder(x)
            skips.append(x)
            x = down(x)
        x = self.middle_blks(x)
        for decoder, up, skip in zip(self.decoders, self.ups, reversed(skips)):
            x = decoder(up(x) + skip)
        x = self.ending(x).to(inp.dtype)  # global residual below, in the input's dtype
        if all_heads:
            return (self.combine_heads(x) + inp.unsqueeze(1))[..., :h, :w]
        return (self.head_output(x, self.head) + inp)[:, :, :h, :w]

    def head_output(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Output ``k`` of the ending conv's ``heads`` images ``x`` (N, heads*C, H, W), before the residual:
        ``(x_i + x_j) / 2`` for ``(i, j) = head_pairs(heads)[k]``; ``x`` itself for a single head."""
        if self.config.heads == 1:
            return x
        c = self.config.img_channel
        i, j = head_pairs(self.config.heads)[k]
        return (x[:, i * c:(i + 1) * c] + x[:, j * c:(j + 1) * c]) / 2

    def combine_heads(self, x: torch.Tensor) -> torch.Tensor:
        """Every output of the ending conv's images ``x`` (N, heads*C, H, W): (N, n_outputs, C, H, W)."""
        return torch.stack([self.head_output(x, k) for k in range(self.config.n_outputs)], dim=1)

    def intro_input(self, inp: torch.Tensor) -> torch.Tensor:
        """What ``intro`` reads: the padded image, with its frequency-selection image when ``input_fft='fs'``.

        ``fs``: ``[x, irfft2(relu(Re F) + i relu(Im F))]`` with ``F = rfft2(x)`` of the whole *padded* image
        (N, 2C, H', W'), so the model's own output on an image equals the runtime's (which pads to 16 before
        calling the model). The spectrum is an FP32 island (:func:`~nafnet_core.dft.frequency_selection`).
        """
        if self.config.input_fft == "none":
            return inp
        return torch.cat([inp, frequency_selection(inp)], dim=1)  # (N, 2C, H', W')

    def pad_input(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pads right and bottom to a multiple of ``padder_size`` (the official check_image_size), and to at
        least ``config.min_side`` (FNAFNet's windows must fit in their maps)."""
        h, w = x.shape[-2:]
        m, least = self.padder_size, self.config.min_side
        if least > 1:
            h, w = _sym_max(h, least), _sym_max(w, least)
        return F.pad(x, (0, (m - w % m) % m + w - x.shape[-1], 0, (m - h % m) % m + h - x.shape[-2]))


def _sym_max(a, b):
    # torch.sym_max keeps max() symbolic under torch.export instead of guarding on one branch.
    return torch.sym_max(a, b) if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt) else max(a, b)


def head_pairs(heads: int) -> list[tuple[int, int]]:
    """The ending conv's image pairs ``(i, j)``, ``i >= j``, averaged into the outputs of a multi-head model, in
    output order (official ``GCENetMH`` with ``combinate_heads``): (0,0), (1,0), (1,1), (2,0), ..."""
    return [(i, j) for i in range(heads) for j in range(i + 1)]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
