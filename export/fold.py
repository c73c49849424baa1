"""Deploy-time folding: exact algebra that removes per-channel scales from the inference graph.

In every NAFBlock (eval mode, dropout inactive):

* ``norm1``'s affine ``w * n + b`` feeds the 1x1 ``conv1``:  ``W (w*n + b) + c = (W diag(w)) n + (W b + c)``,
  so ``conv1.weight[:, i] *= w[i]``, ``conv1.bias += W b`` and the norm keeps only the normalisation.
  Same for ``norm2`` -> ``conv4``.
* ``y = inp + conv3(x) * beta``: ``conv3.weight[o] *= beta[o]``, ``conv3.bias[o] *= beta[o]``, beta removed.
  Same for ``gamma`` -> ``conv5``.

Per block this removes 6 broadcast Mul/Add over full feature maps. The arithmetic is done in float64
and rounded once, so the folded model equals the original to float32 rounding (tests: <= 1e-5).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from nafnet_core.model import LayerNorm2d, NAFBlock, NAFNet


def _fold_affine_into_conv(norm: LayerNorm2d, conv: nn.Conv2d) -> LayerNorm2d:
    """Moves ``norm``'s affine into the following 1x1 ``conv`` (in place on ``conv``); returns the bare norm."""
    w, b = norm.weight.double(), norm.bias.double()  # (C,)
    weight = conv.weight.double()  # (O, C, 1, 1)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64)
    conv.weight.copy_((weight * w.view(1, -1, 1, 1)).to(conv.weight.dtype))
    new_bias = bias + weight[:, :, 0, 0] @ b
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype))
    else:
        conv.bias.copy_(new_bias.to(conv.bias.dtype))
    return _bare_norm(norm)


def _bare_norm(norm: LayerNorm2d) -> LayerNorm2d:
    bare = LayerNorm2d(norm.weight.numel(), eps=norm.eps, affine=False)
    return bare.to(norm.weight.device)


def _fold_scale_into_conv(scale: torch.Tensor, conv: nn.Conv2d) -> None:
    """``conv(x) * scale`` -> ``conv'(x)`` for a per-output-channel ``scale`` of shape (1, O, 1, 1)."""
    s = scale.double().view(-1)
    conv.weight.copy_((conv.weight.double() * s.view(-1, 1, 1, 1)).to(conv.weight.dtype))
    if conv.bias is not None:
        conv.bias.copy_((conv.bias.double() * s).to(conv.bias.dtype))


def fold_block(block: NAFBlock) -> None:
    """Folds one block in place (callers pass a copy)."""
    if block.norm1.weight is not None:
        block.norm1 = _fold_affine_into_conv(block.norm1, block.conv1)
    if block.norm2.weight is not None:
        block.norm2 = _fold_affine_into_conv(block.norm2, block.conv4)
    if block.beta is not None:
        _fold_scale_into_conv(block.beta, block.conv3)
        del block.beta
        block.register_parameter("beta", None)
    if block.gamma is not None:
        _fold_scale_into_conv(block.gamma, block.conv5)
        del block.gamma
        block.register_parameter("gamma", None)


def fold_for_deploy(model: NAFNet) -> NAFNet:
    """A copy of ``model`` with LayerNorm affines and beta/gamma folded into convs; ``model`` is untouched.

    Args:
        model: a NAFNet (with or without TLC); it is evaluated in eval mode afterwards (dropout off).
    """
    if not isinstance(model, NAFNet):
        raise TypeError(f"fold_for_deploy expects a NAFNet, got {type(model).__name__}")
    new = copy.deepcopy(model).eval()
    with torch.no_grad():
        for module in new.modules():
            if isinstance(module, NAFBlock):
                fold_block(module)
    new.folded = True
    return new


def is_folded(model: nn.Module) -> bool:
    return any(isinstance(m, NAFBlock) and m.beta is None for m in model.modules())
