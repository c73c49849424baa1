"""NAFNet architecture: exact parameter counts, official names, and a functional reference forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nafnet_core as nc
from nafnet_core.config import ModelConfig, get_config
from nafnet_core.layers import LayerNorm2d
from nafnet_core.model import NAFNet
from tests.helpers import make_nontrivial, photo


@pytest.mark.parametrize("preset", sorted(nc.PRESET_PARAMS))
def test_parameter_counts_exact(preset):
    with torch.device("meta"):
        model = nc.create_model(preset)
    assert nc.count_parameters(model) == nc.PRESET_PARAMS[preset]


def test_tiny_parameter_count():
    assert nc.count_parameters(nc.create_model("tiny")) == 290_715


def test_official_parameter_names():
    with torch.device("meta"):
        keys = set(nc.create_model("nafnet-gopro-width32").state_dict())
    for key in ["intro.weight", "intro.bias", "ending.weight", "downs.0.weight", "downs.3.bias",
                "ups.0.0.weight", "encoders.0.0.conv1.weight", "encoders.0.0.conv2.weight",
                "encoders.3.27.sca.1.weight", "encoders.0.0.norm1.weight", "encoders.0.0.norm2.bias",
                "encoders.0.0.beta", "encoders.0.0.gamma", "middle_blks.0.conv4.weight",
                "decoders.3.0.conv5.bias"]:
        assert key in keys, key
    assert "ups.0.0.bias" not in keys  # the up-convs have no bias
    assert not any("sca.0" in k for k in keys)  # pooling has no parameters


def test_overrides_are_type_checked():
    assert nc.create_model("tiny", width=4).config.width == 4
    with pytest.raises(TypeError, match="width"):
        get_config("tiny", width="16")
    with pytest.raises(ValueError, match="unknown model option"):
        get_config("tiny", widht=16)
    with pytest.raises(KeyError, match="unknown preset"):
        get_config("nafnet-huge")
    with pytest.raises(ValueError, match="gate"):
        get_config("tiny", gate="tanh")
    with pytest.raises(ValueError, match="same length"):
        ModelConfig(enc_blk_nums=(1, 1), dec_blk_nums=(1,))


def test_layernorm2d_matches_layer_norm_over_channels():
    torch.manual_seed(0)
    ln = LayerNorm2d(6)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(2, 6, 5, 7) * 3 + 1
    ref = F.layer_norm(x.permute(0, 2, 3, 1), (6,), ln.weight, ln.bias, eps=1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(ln(x), ref, atol=1e-5, rtol=1e-5)


def test_layernorm2d_half_stays_finite_on_large_residuals():
    # |x| ~ 300 over 64 channels: sum of squares ~ 5.8e6 overflows FP16 (65504) unless computed in FP32.
    torch.manual_seed(0)
    ln = LayerNorm2d(64).half()
    x = (torch.randn(1, 64, 8, 8) * 300).half()
    y = ln(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), LayerNorm2d(64)(x.float()), atol=2e-2, rtol=1e-2)


def _randomised_norm(c: int, affine: bool, seed: int = 0) -> LayerNorm2d:
    ln = LayerNorm2d(c, affine=affine)
    if affine:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            ln.weight.copy_(1 + 0.5 * torch.randn(c, generator=g))
            ln.bias.copy_(0.5 * torch.randn(c, generator=g))
    return ln


@pytest.mark.parametrize("affine", [True, False])
def test_layernorm2d_backward_passes_gradcheck_and_equals_autograd(affine):
    # float64: the hand-written backward against finite differences (gradcheck) and against autograd of
    # the plain-ops reference, for the input and (affine) the weight and bias.
    ln = _randomised_norm(5, affine).double()
    x = (torch.randn(2, 5, 4, 3, dtype=torch.float64) * 3 + 1).requires_grad_()
    params = [ln.weight, ln.bias] if affine else []
    assert torch.autograd.gradcheck(lambda x, *p: ln(x), (x, *params))
    go = torch.randn(2, 5, 4, 3, dtype=torch.float64)
    grads = torch.autograd.grad(ln(x), [x, *params], go)
    ref_grads = torch.autograd.grad(ln.reference(x), [x, *params], go)
    assert ln(x).grad_fn.name() != ln.reference(x).grad_fn.name()  # the two paths really differ
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# Tolerances against the FP32 reference: the forward output and dx are rounded once to the input dtype
# (half: 2**-11 relative, bf16: 2**-8), on values of size ~3 (outputs) or ~|dL/dout| / std.
_DTYPE_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("affine", [True, False])
def test_layernorm2d_backward_in_low_precision_matches_fp32_reference(dtype, affine):
    torch.manual_seed(1)
    ln = _randomised_norm(16, affine, seed=1)
    x32 = torch.randn(2, 16, 6, 5) * 40 + 20  # a large residual stream: FP16 channel sums would overflow
    go32 = torch.randn(2, 16, 6, 5)
    x = x32.to(dtype).requires_grad_()
    go = go32.to(dtype)
    params = [ln.weight, ln.bias] if affine else []
    out = ln(x)
    assert out.dtype == dtype
    grads = torch.autograd.grad(out, [x, *params], go)
    # Reference: plain ops in FP32 on the same (rounded) input and output gradient.
    xr = x.detach().float().requires_grad_()
    ref = ln.reference(xr)
    ref_grads = torch.autograd.grad(ref, [xr, *params], go.float())
    tol = _DTYPE_TOL[dtype]
    torch.testing.assert_close(out.float(), ref, atol=tol * 4, rtol=tol)
    assert grads[0].dtype == dtype
    dx_scale = float(ref_grads[0].abs().max())
    torch.testing.assert_close(grads[0].float(), ref_grads[0], atol=tol * dx_scale, rtol=tol)
    for got, want in zip(grads[1:], ref_grads[1:]):  # weight/bias grads: FP32 sums of FP32 products
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_layernorm2d_half_module_gives_half_grads_from_fp32_statistics():
    ln = _randomised_norm(64, True).half()
    x = (torch.randn(1, 64, 8, 8) * 300).half().requires_grad_()  # FP16 sums of squares would overflow
    out = ln(x)
    out.float().pow(2).sum().backward()
    assert x.grad.dtype == ln.weight.grad.dtype == torch.float16
    assert torch.isfinite(x.grad).all() and torch.isfinite(ln.weight.grad).all()


def _saved_bytes(fn, x: torch.Tensor) -> int:
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(storages.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layernorm2d_training_form_keeps_one_feature_map_alive(dtype):
    ln = _randomised_norm(16, True)
    x = torch.randn(2, 16, 8, 8, dtype=dtype, requires_grad=True)
    fp32_map = x.numel() * 4
    kept = _saved_bytes(ln, x)
    # One map (FP32 y, or the half input itself) plus per-pixel statistics of 1/16 map each.
    assert kept <= (x.numel() * x.element_size()) + 2 * fp32_map / 16 + 1024
    assert _saved_bytes(ln.reference, x) >= 2 * fp32_map  # what autograd of the plain form keeps


def test_layernorm2d_uses_plain_ops_without_grad():
    ln = _randomised_norm(8, True)
    x = torch.randn(1, 8, 4, 4, requires_grad=True)
    with torch.no_grad():
        torch.testing.assert_close(ln(x), ln.reference(x), atol=0, rtol=0)
    assert type(ln(x).grad_fn).__name__.startswith("_LayerNorm2dFunction")


# --- an independent, functional NAFNet written from docs/DESIGN.md §3 (The model), reading the state dict directly ---

def _ref_block(sd, p, x, gate):
    def conv(name, t, **kw):
        return F.conv2d(t, sd[p + name + ".weight"], sd.get(p + name + ".bias"), **kw)

    def ln(name, t):
        mu = t.mean(1, keepdim=True)
        var = ((t - mu) ** 2).mean(1, keepdim=True)
        return ((t - mu) / torch.sqrt(var + 1e-6) * sd[p + name + ".weight"][None, :, None, None]
                + sd[p + name + ".bias"][None, :, None, None])

    act = {"simple": lambda a: a, "reglu": F.relu, "geglu": F.gelu, "swiglu": F.silu}[gate]

    def g(t):
        a, b = t.chunk(2, 1)
        return act(a) * b

    c2 = sd[p + "conv2.weight"].shape[0]
    t = g(conv("conv2", conv("conv1", ln("norm1", x)), padding=1, groups=c2))
    t = t * conv("sca.1", t.mean((2, 3), keepdim=True))
    y = x + conv("conv3", t) * sd[p + "beta"]
    t = conv("conv5", g(conv("conv4", ln("norm2", y))))
    return y + t * sd[p + "gamma"]


def reference_nafnet(sd, cfg, x, extra_input=None):
    """Functional NAFNet; ``extra_input(padded x)`` (if given) is concatenated to the intro's input."""
    h, w = x.shape[-2:]
    m = 2 ** len(cfg.enc_blk_nums)
    x = F.pad(x, (0, -w % m, 0, -h % m))
    t = F.conv2d(x if extra_input is None else torch.cat([x, extra_input(x)], 1), sd["intro.weight"],
                 sd["intro.bias"], padding=1)
    skips = []
    for i, n in enumerate(cfg.enc_blk_nums):
        for j in range(n):
            t = _ref_block(sd, f"encoders.{i}.{j}.", t, cfg.gate)
        skips.append(t)
        t = F.conv2d(t, sd[f"downs.{i}.weight"], sd[f"downs.{i}.bias"], stride=2)
    for j in range(cfg.middle_blk_num):
        t = _ref_block(sd, f"middle_blks.{j}.", t, cfg.gate)
    for i, n in enumerate(cfg.dec_blk_nums):
        t = F.pixel_shuffle(F.conv2d(t, sd[f"ups.{i}.0.weight"]), 2) + skips[-1 - i]
        for j in range(n):
            t = _ref_block(sd, f"decoders.{i}.{j}.", t, cfg.gate)
    t = F.conv2d(t, sd["ending.weight"], sd["ending.bias"], padding=1) + x
    return t[..., :h, :w]


@pytest.mark.parametrize("gate", ["simple", "swiglu"])
@pytest.mark.parametrize("hw", [(37, 53), (64, 48)])
def test_forward_matches_functional_reference(gate, hw):
    torch.manual_seed(1)
    model = make_nontrivial(nc.create_model("tiny", gate=gate, enc_blk_nums=[1, 2, 1, 1]))
    x = photo(*hw)
    with torch.no_grad():
        out = model(x)
        ref = reference_nafnet(model.state_dict(), model.config, x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # the check can fail: the blocks do change the image
    assert (out - x).abs().max() > 1e-2



def test_training_forward_and_gradients_match_the_functional_reference():
    """In training, beta/gamma are folded into conv3/conv5 (``scaled_branch``) and the LayerNorm has its own
    backward: the output and every parameter's gradient equal autograd of the plain functional reference."""
    torch.manual_seed(3)
    model = make_nontrivial(nc.create_model("tiny", enc_blk_nums=[1, 1], dec_blk_nums=[1, 1])).train()
    x = photo(32, 48)
    out = model(x)
    out.square().mean().backward()
    sd = {k: v.detach().clone().requires_grad_(True) for k, v in model.state_dict().items()}
    ref = reference_nafnet(sd, model.config, x)
    ref.square().mean().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, sd[name].grad, atol=1e-6, rtol=1e-4, msg=name)
    assert model.encoders[0][0].beta.grad.abs().max() > 1e-4  # the scales do get gradients


def test_training_keeps_two_maps_fewer_per_block_than_the_plain_form():
    """What the fold buys: autograd no longer keeps conv3's and conv5's outputs for beta's and gamma's gradients."""
    from nafnet_core.layers import NAFBlock

    torch.manual_seed(0)
    block = make_nontrivial(NAFBlock(8)).train()
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    folded = _saved_bytes(block, x)
    with torch.no_grad():
        plain = NAFBlock(8)
        plain.load_state_dict(block.state_dict())
    plain.conv3, plain.conv5 = _Unfoldable(plain.conv3), _Unfoldable(plain.conv5)
    unfolded = _saved_bytes(plain.train(), x)
    one_map = x.numel() * 4
    assert unfolded - folded >= 2 * one_map - 1024, (unfolded, folded, one_map)
    torch.testing.assert_close(block(x), plain(x), atol=1e-6, rtol=1e-5)


class _Unfoldable(torch.nn.Module):
    """A conv that ``scaled_branch`` does not recognise as one (it calls it, then multiplies)."""

    def __init__(self, conv):
        super().__init__()
        self.inner = conv

    def forward(self, x):
        return self.inner(x)

def test_gates_differ():
    torch.manual_seed(0)
    x = photo(32, 32)
    outs = {}
    for gate in nc.GATES:
        torch.manual_seed(0)
        model = make_nontrivial(nc.create_model("tiny", gate=gate))
        with torch.no_grad():
            outs[gate] = model(x)
    assert all((outs["simple"] - outs[g]).abs().max() > 1e-4 for g in ("reglu", "geglu", "swiglu"))


def test_fresh_model_is_identity_plus_ending():
    # beta = gamma = 0 at init: every block is skipped; with the ending conv zeroed the net is the identity.
    model = nc.create_model("tiny").eval()
    with torch.no_grad():
        model.ending.weight.zero_()
        model.ending.bias.zero_()
        x = torch.rand(1, 3, 21, 35)
        torch.testing.assert_close(model(x), x)


def test_dropout_option_builds_dropout_layers():
    model = nc.create_model("tiny", drop_out_rate=0.5)
    assert isinstance(model.encoders[0][0].dropout1, torch.nn.Dropout)
    assert isinstance(nc.create_model("tiny").encoders[0][0].dropout1, torch.nn.Identity)


def test_model_is_nafnet_with_config():
    model = nc.create_model("seed-v1")
    assert isinstance(model, NAFNet) and model.config == get_config("seed-v1") and model.padder_size == 16
