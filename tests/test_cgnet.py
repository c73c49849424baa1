"""CascadedGaze (block="cg") and multi-head output: parameter counts, official names, an independent functional
reference (official semantics at multiples of 16, the documented padding elsewhere, down to 1x1), heads,
checkpoints, TLC, training with head selection, and export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from test_tlc import reference_local_mean

import nafnet_core as nc
from nafnet_core.cgnet import CascadedGazeBlock
from nafnet_core.checkpoint import CheckpointError
from nafnet_core.layers import GlobalAvgPool2d, NAFBlock
from nafnet_core.tlc import LocalAvgPool2d
from tests.helpers import make_nontrivial, photo, short_cfg

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread per module


def cg_model(seed: int = 0, **overrides) -> nc.NAFNet:
    torch.manual_seed(seed)
    return make_nontrivial(nc.create_model("tiny-cg", **overrides), seed=seed)


# --- an independent, functional CascadedGaze network written from the published description ---

KERNELS, STRIDES = (3, 3, 5), (2, 3, 4)
ACTS = {"simple": lambda a: a, "swiglu": F.silu}


def _ops(sd, p):
    def conv(name, t, **kw):
        return F.conv2d(t, sd[p + name + ".weight"], sd.get(p + name + ".bias"), **kw)

    def ln(name, t):
        mu = t.mean(1, keepdim=True)
        var = ((t - mu) ** 2).mean(1, keepdim=True)
        return (t - mu) / torch.sqrt(var + 1e-6) * sd[p + name + ".weight"][None, :, None, None] + \
            sd[p + name + ".bias"][None, :, None, None]

    return conv, ln


def ref_naf_block(sd, p, x, gate, pool):
    conv, ln = _ops(sd, p)

    def g(t):
        a, b = t.chunk(2, 1)
        return ACTS[gate](a) * b

    t = g(conv("conv2", conv("conv1", ln("norm1", x)), padding=1, groups=sd[p + "conv2.weight"].shape[0]))
    t = t * conv("sca.1", pool(t))
    y = x + conv("conv3", t) * sd[p + "beta"]
    return y + conv("conv5", g(conv("conv4", ln("norm2", y)))) * sd[p + "gamma"]


def ref_cg_block(sd, p, x, gate, pool, official):
    conv, ln = _ops(sd, p)
    h, w = x.shape[-2:]
    d = sd[p + "conv1.weight"].shape[0]
    t = F.gelu(conv("conv2", conv("conv1", ln("norm1", x)), padding=1, groups=d))
    g = t[:, : d // 2] + t[:, d // 2:]
    maps = [t]
    for k in range(3):
        key = p + f"GCE.depthwise_separable_convs.{k}."
        if key + "depthwise.weight" not in sd:
            break
        if official:
            assert min(g.shape[-2:]) >= KERNELS[k], "the official code fails on a map smaller than the kernel"
        else:  # the documented departure: zero-pad right/bottom up to the kernel
            g = F.pad(g, (0, max(0, KERNELS[k] - g.shape[-1]), 0, max(0, KERNELS[k] - g.shape[-2])))
        g = F.conv2d(g, sd[key + "depthwise.weight"], stride=STRIDES[k], groups=d // 2)
        g = F.gelu(F.conv2d(g, sd[key + "pointwise.weight"]))
        maps.append(F.interpolate(g, size=(h, w), mode="nearest"))
    t = torch.cat(maps, 1)
    t = conv("project_out", t * conv("sca.1", pool(t)))
    y = x + t * sd[p + "beta"]
    a, b = conv("conv4", ln("norm2", y)).chunk(2, 1)
    return y + conv("conv5", ACTS[gate](a) * b) * sd[p + "gamma"]


def reference_cgnet(sd, cfg, x, official=False, kernels=None):
    """All outputs (N, n_outputs, C, H, W). ``official``: no padding anywhere (asserts the size allows it).
    ``kernels``: TLC windows per level (None: global pooling)."""
    def pool_at(level):
        if kernels is None:
            return lambda t: t.mean((2, 3), keepdim=True)
        return lambda t: reference_local_mean(t, kernels[level])

    n, c, h, w = x.shape
    m = 2 ** len(cfg.enc_blk_nums)
    if official:
        assert h % m == 0 and w % m == 0
    x = F.pad(x, (0, -w % m, 0, -h % m))
    t = F.conv2d(x, sd["intro.weight"], sd["intro.bias"], padding=1)
    skips = []
    for i, nb in enumerate(cfg.enc_blk_nums):
        for j in range(nb):  # the first block of every encoder level is a CascadedGaze block
            p = f"encoders.{i}.{j}."
            t = ref_cg_block(sd, p, t, cfg.gate, pool_at(i), official) if j == 0 else \
                ref_naf_block(sd, p, t, cfg.gate, pool_at(i))
        skips.append(t)
        t = F.conv2d(t, sd[f"downs.{i}.weight"], sd[f"downs.{i}.bias"], stride=2)
    levels = len(cfg.enc_blk_nums)
    for j in range(cfg.middle_blk_num):
        t = ref_naf_block(sd, f"middle_blks.{j}.", t, cfg.gate, pool_at(levels))
    for i, nb in enumerate(cfg.dec_blk_nums):
        t = F.pixel_shuffle(F.conv2d(t, sd[f"ups.{i}.0.weight"]), 2) + skips[-1 - i]
        for j in range(nb):
            t = ref_naf_block(sd, f"decoders.{i}.{j}.", t, cfg.gate, pool_at(levels - 1 - i))
    t = F.conv2d(t, sd["ending.weight"], sd["ending.bias"], padding=1)
    heads = t.view(n, cfg.heads, c, *t.shape[-2:])  # head i = channels i*C .. (i+1)*C
    outs = torch.stack([(heads[:, i] + heads[:, j]) / 2 for i in range(cfg.heads) for j in range(i + 1)], 1)
    return (outs + x.unsqueeze(1))[..., :h, :w]


# --- architecture ---

def test_parameter_counts_and_info_cli():
    with torch.device("meta"):
        assert nc.count_parameters(nc.create_model("cgnet-gopro")) == 68_766_134
        assert nc.count_parameters(nc.create_model("cgnet-gopro", heads=1)) == 68_761_103  # facts: one head
    # `python cli.py info cgnet-gopro` prints the same count (it builds the real model: run here on tiny-cg)
    result = CliRunner().invoke(__import__("cli").main, ["info", "tiny-cg"])
    assert result.exit_code == 0, result.output
    assert f"{nc.count_parameters(nc.create_model('tiny-cg')):,}" in result.output
    assert "cg, 4 heads -> 10 outputs, deployment head 0" in result.output


def test_block_sites_and_official_names():
    with torch.device("meta"):
        model = nc.create_model("cgnet-gopro")
    kinds = {name: type(m) for name, m in model.named_modules() if isinstance(m, (NAFBlock, CascadedGazeBlock))}
    assert [n for n, k in kinds.items() if k is CascadedGazeBlock] == [f"encoders.{i}.0" for i in range(4)]
    assert sum(k is NAFBlock for k in kinds.values()) == 26 + 1 + 4
    keys = set(model.state_dict())
    for key in ["encoders.0.0.GCE.depthwise_separable_convs.2.depthwise.weight",
                "encoders.1.0.GCE.depthwise_separable_convs.2.pointwise.weight",
                "encoders.3.0.GCE.depthwise_separable_convs.1.depthwise.weight", "encoders.0.0.project_out.bias",
                "encoders.0.0.sca.1.weight", "encoders.3.26.conv3.weight", "ending.weight"]:
        assert key in keys, key
    assert "encoders.2.0.GCE.depthwise_separable_convs.2.depthwise.weight" not in keys  # 2 steps below level 1
    assert "encoders.0.0.conv3.weight" not in keys and not any("depthwise.bias" in k for k in keys)
    sd = model.state_dict()
    assert sd["encoders.0.0.sca.1.weight"].shape[0] == 5 * 62 and sd["encoders.2.0.sca.1.weight"].shape[0] == 4 * 248
    assert sd["ending.weight"].shape[0] == 12


# --- numerics against the reference ---

@pytest.mark.parametrize("gate", ["simple", "swiglu"])
def test_official_semantics_at_multiples_of_16(gate):
    model = cg_model(1, gate=gate)
    x = torch.cat([photo(64, 96, 0), photo(64, 96, 1)])
    with torch.no_grad():
        out = model(x, all_heads=True)
        ref = reference_cgnet(model.state_dict(), model.config, x, official=True)
    assert out.shape == (2, 10, 3, 64, 96)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # the check can fail: the CG blocks do change the result
    no_cg = {k: (torch.zeros_like(v) if k.startswith("encoders.0.0.beta") else v)
             for k, v in model.state_dict().items()}
    assert (reference_cgnet(no_cg, model.config, x, official=True) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("hw", [(37, 53), (5, 9), (1, 1), (20, 3)])
def test_any_size_matches_reference_with_documented_padding(hw):
    model = cg_model(2)
    x = photo(*hw, index=2)
    with torch.no_grad():
        out = model(x, all_heads=True)
        ref = reference_cgnet(model.state_dict(), model.config, x)
    assert out.shape == (1, 10, 3, *hw) and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_forward_returns_the_deployment_head():
    model = cg_model(3)
    x = photo(40, 24)
    with torch.no_grad():
        every = model(x, all_heads=True)
        assert model.head == 0
        for k in (0, 4, 9):
            model.head = k
            assert torch.equal(model(x), every[:, k])
    assert (every[:, 0] - every[:, 9]).abs().max() > 1e-3  # the outputs differ
    for bad in (10, -1, 1.0):
        with pytest.raises(ValueError, match="head must be"):
            model.head = bad
    single = nc.create_model("tiny")
    with torch.no_grad():
        assert single(x, all_heads=True).shape == (1, 1, 3, 40, 24)


def test_tlc_swaps_the_sca_pools_of_both_block_kinds():
    model = cg_model(4)
    tlc = nc.convert_to_tlc(model, train_size=32)
    for name, block in tlc.named_modules():
        if isinstance(block, (NAFBlock, CascadedGazeBlock)):
            assert isinstance(block.sca[0], LocalAvgPool2d), name
    assert not any(isinstance(m, GlobalAvgPool2d) for m in tlc.modules())
    assert any(isinstance(m, GlobalAvgPool2d) for m in model.modules())  # the input is untouched
    x = photo(45, 70, index=1)
    with torch.no_grad():
        out = tlc(x, all_heads=True)
        ref = reference_cgnet(model.state_dict(), model.config, x, kernels=nc.tlc_kernels(model.config, 32))
        glob = model(x, all_heads=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert (out - glob).abs().max() > 1e-3


# --- checkpoints ---

def test_official_file_round_trip_and_wrong_variant(tmp_path):
    model = cg_model(5)
    path = nc.save_official(tmp_path / "CGNet-official.pth", model)
    ckpt = nc.load_checkpoint(path, preset="tiny-cg")
    x = photo(33, 17)
    with torch.no_grad():
        assert torch.equal(ckpt.model(x, all_heads=True), model(x, all_heads=True))
    assert ckpt.model.head == 0 and ckpt.source == "official"
    with pytest.raises(CheckpointError) as e:
        nc.load_checkpoint(path, preset="tiny")
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "preset 'tiny-cg'" in msg
    plain = nc.save_official(tmp_path / "NAFNet.pth", nc.create_model("tiny"))
    with pytest.raises(CheckpointError, match=r"preset 'tiny'"):
        nc.load_checkpoint(plain, preset="tiny-cg")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_checkpoint_records_the_deployment_head(tmp_path, suffix):
    model = cg_model(6)
    model.head = 7
    path = nc.save_checkpoint(tmp_path / f"m{suffix}", model)
    assert nc.load_checkpoint(path).model.head == 7
    tlc = nc.convert_to_tlc(nc.load_checkpoint(path).model)
    assert tlc.head == 7
    if suffix == ".pt":
        raw = torch.load(path, weights_only=True)
        raw["head"] = 10
        torch.save(raw, tmp_path / "bad.pt")
        with pytest.raises(CheckpointError, match=r"bad\.pt: invalid deployment head.*0\.\.9"):
            nc.load_checkpoint(tmp_path / "bad.pt")


# --- training: best-of-outputs loss, head chosen on validation, resume ---

def test_best_output_loss_is_the_official_multi_head_psnr_loss():
    from train.objectives import best_output, psnr_loss

    g = torch.Generator().manual_seed(0)
    outs = torch.rand(3, 10, 3, 8, 9, generator=g, requires_grad=True)
    sharp = torch.rand(3, 3, 8, 9, generator=g)
    ours = psnr_loss(best_output(outs, sharp), sharp)
    # CascadedGaze's MultiHeadPSNRLoss: per image the minimum MSE over the outputs, then -PSNR, batch mean
    mse = ((outs - sharp.unsqueeze(1)) ** 2).mean(dim=(2, 3, 4)).min(dim=1)[0]
    official = 10 / torch.log(torch.tensor(10.0)) * torch.log(mse + 1e-8).mean()
    (ga,) = torch.autograd.grad(ours, outs)
    (gb,) = torch.autograd.grad(official, outs)
    torch.testing.assert_close(ours, official)
    torch.testing.assert_close(ga, gb)
    assert (ga.flatten(2).abs().sum(2) > 0).sum() == 3  # one output per image receives the gradient
    assert torch.equal(best_output(outs[:, :1], sharp), outs[:, 0]) and torch.equal(best_output(outs), outs[:, 0])


@pytest.mark.slow
def test_tiny_cg_trains_resumes_exactly_and_records_the_head(cache_dir, tmp_path):
    from nafnet_core.data import load_pairs
    from train.evaluate import evaluate
    from train.loop import train

    cfg = short_cfg(model="tiny-cg", steps=4, val_every=2, save_every=2, amp="bf16")  # EMA, dropout, TLC val
    full = train(cfg, tmp_path / "full", progress=False)
    part = train(cfg, tmp_path / "part", progress=False, stop_at=3)
    resumed = train(cfg, tmp_path / "part", progress=False, resume=True)
    assert part.step == 3 and resumed.step == full.step == 4
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    assert resumed.model.head == full.model.head
    # best.pt records the head with the best validation PSNR, and loads with it (export and infer use it)
    best = nc.load_checkpoint(tmp_path / "full" / "best.pt")
    val = best.extra["val"]
    assert best.model.head == val["head"] == val["best_head"]
    assert val["psnr"] == max(h["psnr"] for h in val["heads"]) == val["heads"][val["head"]]["psnr"]
    pairs = load_pairs(read_checkpoint_data(best))["val"][: cfg.val_max]
    res = evaluate(best.model, pairs, tlc=True, train_size=cfg.crop)
    assert res.best_head() == best.model.head and res.summary()["psnr"] == pytest.approx(val["psnr"], abs=1e-9)
    x = photo(24, 40)
    with torch.no_grad():
        assert torch.equal(best.model(x), best.model(x, all_heads=True)[:, best.model.head])


def read_checkpoint_data(ckpt) -> str:
    """The data root a run trained on (the synthetic set in these tests)."""
    import json

    return json.loads((ckpt.path.parent / "config.json").read_text())["data_root"]


def test_eval_cli_reports_every_head_and_the_recorded_one(cache_dir, tmp_path):
    model = cg_model(7)
    model.head = 3
    path = nc.save_checkpoint(tmp_path / "cg.pt", model, train_size=32)
    result = CliRunner().invoke(__import__("cli").main, ["eval", str(path), "--max-images", "1", "--device", "cpu",
                                                         "--json", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    table = lines[lines.index("output  heads   PSNR dB    SSIM") + 1:][:10]
    assert [int(t.split()[0]) for t in table] == list(range(10)) and "(3,0)" in table[6]
    assert "deployment head (recorded in the checkpoint)" in table[3] and "(deployment head 3)" in result.output
    import json

    saved = json.loads((tmp_path / "e.json").read_text())
    assert saved["head"] == saved["recorded_head"] == 3 and len(saved["heads"]) == 10
    assert saved["psnr"] == saved["heads"][3]["psnr"] and "psnr_h9" in result.output


# --- export ---

@pytest.mark.slow
def test_tiny_cg_checkpoint_exports_fp32_fp16_dynamic_and_tile_with_tlc(tmp_path, synth_root):
    """fp32 + FP16 for a 48x64 tile and the dynamic fp32 graph, with TLC and the recorded head. The dynamic FP16
    graph is left out: its export alone took 146 s here (the dynamo exporter's symbolic-shape tracing of four
    levels); the FP16 placement it would check is the tile's, and its shape logic the dynamic fp32 graph's."""
    import onnxruntime as ort

    from export.api import export_model
    from export.lint import lint_path

    model = cg_model(8, width=4)
    model.head = 5  # export and the runners use the recorded deployment head
    path = nc.save_checkpoint(tmp_path / "cg.pt", model, train_size=16)
    tile = export_model(path, tmp_path / "tile", tiles=[(48, 64)], dynamic=False, fp16=True, train_size=16)
    dynamic = export_model(path, tmp_path / "dynamic", tiles=None, dynamic=True, fp16=False, train_size=16)
    assert set(tile.artifacts) == {"onnx-fp32-48x64", "onnx-fp16-48x64"} and set(dynamic.artifacts) == {
        "onnx-fp32-dynamic"}
    for manifest in (tile, dynamic):
        assert manifest.data["model"]["head"] == 5
        failed = [f for f in lint_path(manifest.directory) if not f.ok]
        assert not failed, failed
    tlc = nc.convert_to_tlc(model, train_size=16)

    def run(name, x):
        manifest = dynamic if name.endswith("dynamic") else tile
        sess = ort.InferenceSession(str(manifest.path(name)), providers=["CPUExecutionProvider"])
        return torch.from_numpy(sess.run(["output"], {"input": x.numpy()})[0])

    for name, x in [("onnx-fp32-dynamic", photo(37, 53)), ("onnx-fp32-dynamic", photo(5, 9, index=1)),
                    ("onnx-fp32-dynamic", torch.cat([photo(64, 96, index=2), photo(64, 96, index=3)])),
                    ("onnx-fp32-48x64", photo(48, 64, index=4))]:
        with torch.no_grad():
            every = tlc(x, all_heads=True)
        out = run(name, x)
        assert (out - every[:, 5]).abs().max().item() <= 1e-4, (name, tuple(x.shape))
        assert (out - every[:, 0]).abs().max().item() > 1e-3  # another head would be seen
    with torch.no_grad():
        half = run("onnx-fp16-48x64", photo(48, 64, index=4))
        assert (half - tlc(photo(48, 64, index=4))).abs().max().item() < 2e-2
    # `parity` on the synthetic test split: every row that runs passes (the reference uses the recorded head)
    from runtime.parity import check_parity

    for manifest in (tile, dynamic):
        report = check_parity(manifest.directory, synth_root, torch_precisions=("fp16",), progress=False, limit=2)
        assert report.passed and sum(r.passed is not None for r in report.rows) >= 3, report.table()


def test_lint_counts_shape_gathers_not_data_gathers():
    import onnx
    from onnx import TensorProto, helper

    from export import graph

    idx = helper.make_tensor("idx", TensorProto.INT64, [4], [0, 0, 1, 1])
    nodes = [helper.make_node("Gather", ["x", "idx"], ["up"], axis=3, name="nearest"),
             helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "two"], ["h"], axis=0, name="height")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
                          [helper.make_tensor_value_info("up", TensorProto.FLOAT, [1, 1, 2, 4]),
                           helper.make_tensor_value_info("h", TensorProto.INT64, [])],
                          [idx, helper.make_tensor("two", TensorProto.INT64, [], [2])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    assert graph.shape_arithmetic(model) == ["Shape shape", "Gather height"]
