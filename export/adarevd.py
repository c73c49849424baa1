"""Export of an AdaRevD model (``decoder="adarevd"``) for the adaptive-exit runtime (:mod:`runtime.adarevd`).

An AdaRevD model decides per tile how many sub-decoders run, so it is not one graph: the export writes

- ``adarevd-encoder.onnx``: graph E, the padded image (1, 3, H', W') -> the five scaled encoder features
  ``e0`` .. ``e4`` of the whole image (TLC) and, with a classifier, ``logits`` (tiles, classes) of every tile;
- ``adarevd-step{k}.onnx`` for k = 1..K: sub-decoder k on a batch of tiles (dynamic batch), the state
  ``(e4, e3, e2, e1, e0)`` in, the new ``next_e3`` .. ``next_e0`` and ``residual``, the head of depth k, out;
- ``manifest.json``: the model config, the image size and padded size, the tile geometry (tile, overlap,
  rows, columns), the exit table and every file's sha256.

Every FFT of the sub-decoders is a product with DFT matrices (no ``DFT`` op, no complex type); the FP16
graphs (``--fp16``) are the half model exported as written, so the FFT branches, the channel LayerNorms and
the pooling stay FP32 islands. The runtime pads, cuts the tiles, picks each tile's depth, runs only the
steps a tile needs (tiles of equal depth batched) and blends.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from nafnet_core.adarevd import AdaRevD, tile_starts
from nafnet_core.config import padded_size
from nafnet_core.errors import UserError
from nafnet_core.fileio import atomic_write_text, make_dirs, sha256_file
from nafnet_core.tlc import convert_to_tlc, is_tlc

from .onnx_export import DEFAULT_OPSET, _quiet_exporter, save_onnx

FORMAT = "adarevd-export"
STATE_NAMES = ("e4", "e3", "e2", "e1", "e0")


class EncoderGraph(nn.Module):
    """Graph E: the scaled encoder features of a padded image and the classifier's logits of its tiles."""

    def __init__(self, model: AdaRevD):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        features = self.model.encode(x)
        out = [f.float() for f in features]
        if self.model.ape is not None:
            tiles, _, _ = self.model.tiles(features)
            out.append(self.model.exit_logits(tiles[3]))
        return tuple(out)


class StepGraph(nn.Module):
    """Sub-decoder ``k`` (0-based) and its head on a batch of tiles."""

    def __init__(self, model: AdaRevD, k: int):
        super().__init__()
        self.model, self.k = model, k

    def forward(self, e4, e3, e2, e1, e0):
        dtype = self.model.outputs[self.k][0].weight.dtype
        state = self.model.step(self.k, [t.to(dtype) for t in (e4, e3, e2, e1, e0)])
        return (*[t.float() for t in state[1:]], self.model.head_output(self.k, state[4]).float())


def _export(module: nn.Module, args: tuple, names_in: list[str], names_out: list[str], dynamic_batch: bool,
            opset: int):
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("tiles", min=1)
        dynamic_shapes = tuple({0: batch} for _ in args)
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(module.eval(), args, dynamo=True, input_names=names_in, output_names=names_out,
                                    opset_version=opset, dynamic_shapes=dynamic_shapes, optimize=True,
                                    verbose=False, external_data=False)
    proto = program.model_proto
    proto.producer_name = "nafnet-deblurring"
    return proto


def export_adarevd(model: AdaRevD, out_dir: str | Path, size: tuple[int, int], *, fp16: bool = False,
                   train_size: int = 256, opset: int = DEFAULT_OPSET, source: dict | None = None,
                   trt: bool = False, trt_options=None, progress: bool = False) -> dict:
    """Writes graph E, one graph per sub-decoder step and ``manifest.json`` (last) into ``out_dir`` for images of
    ``size`` = (H, W); returns the manifest. ``model`` gets TLC (``train_size``) unless it has it already.

    Args:
        model: the AdaRevD model (global pooling, or already TLC-converted).
        out_dir: the export folder.
        size: the image size the graphs serve (the runtime refuses others).
        fp16: also write the FP16 graphs (FP32 islands, FP32 inputs and outputs).
        train_size: TLC training size of the encoder (the NAFNet's crops).
        opset: ONNX opset.
        source: what the model came from (recorded in the manifest).
        trt: also build a TensorRT engine from each FP16 graph (implies ``fp16``; needs a CUDA GPU and the
            tensorrt package): ``adarevd-encoder.engine`` and ``adarevd-step{k}.engine``, whose tile batch ranges
            from 1 to every tile of the image.
        trt_options: :class:`export.trt_plan.TrtOptions` of the builds.
        progress: say each engine build on stderr.
    """
    if not isinstance(model, AdaRevD):
        raise TypeError(f"export_adarevd expects an AdaRevD model, got {type(model).__name__}")
    cfg = model.config
    h, w = size
    if h < 1 or w < 1:
        raise UserError(f"image size must be positive, got {h}x{w}")
    hp, wp = padded_size(h, cfg.pad_multiple), padded_size(w, cfg.pad_multiple)
    tlc_model = model if is_tlc(model) else convert_to_tlc(model, train_size=train_size)
    out = make_dirs(Path(out_dir))
    rows, cols = tile_starts(hp, cfg.tile, cfg.tile_overlap), tile_starts(wp, cfg.tile, cfg.tile_overlap)
    k1, k2 = min(hp, cfg.tile), min(wp, cfg.tile)
    files: dict[str, dict] = {}
    fp16 = fp16 or trt
    if trt:
        from .tensorrt_build import import_tensorrt

        import_tensorrt(out)  # fail before the long ONNX exports
    precisions = ["fp32", "fp16"] if fp16 else ["fp32"]
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, cfg.img_channel, hp, wp, generator=g)
    for precision in precisions:
        net = tlc_model if precision == "fp32" else _half(tlc_model)
        suffix = "" if precision == "fp32" else "-fp16"
        enc_names = ["e0", "e1", "e2", "e3", "e4"] + (["logits"] if cfg.exits else [])
        proto = _export(EncoderGraph(net), (x,), ["input"], enc_names, False, opset)
        name = f"adarevd-encoder{suffix}.onnx"
        save_onnx(proto, out / name)
        files[name] = {"role": "encoder", "precision": precision}
        with torch.no_grad():
            feats = tlc_model.encode(x)
            tiles, _, _ = tlc_model.tiles(feats)
        state = [t[:1].repeat(2, 1, 1, 1) for t in tiles[::-1]]  # batch 2: the tile dim stays dynamic
        for k in range(cfg.sub_decoders):
            outs = ["next_e3", "next_e2", "next_e1", "next_e0", "residual"]
            proto = _export(StepGraph(net, k), tuple(state), list(STATE_NAMES), outs, True, opset)
            if precision == "fp16":  # the FFT branches' convs compute in FP32 (FP32 islands); export lint counts them
                _set_props(proto, {"nafnet.fp32_convs": json.dumps(island_convs(net, k))})
            name = f"adarevd-step{k + 1}{suffix}.onnx"
            save_onnx(proto, out / name)
            files[name] = {"role": "step", "depth": k + 1, "precision": precision}
    if trt:
        files.update(_build_engines(out, files, tuple(x.shape), [tuple(t.shape[1:]) for t in state],
                                    len(rows) * len(cols), trt_options, progress))
    for name in files:
        files[name]["sha256"] = sha256_file(out / name)
    manifest = {
        "format": FORMAT, "config": cfg.to_dict(), "size": [h, w], "padded": [hp, wp],
        "tiles": {"tile": cfg.tile, "overlap": cfg.tile_overlap, "rows": rows, "cols": cols, "k": [k1, k2],
                  "blend": cfg.blend},
        "exits": list(cfg.exits), "depth": cfg.sub_decoders, "train_size": train_size,
        "tlc_kernels": [list(k) for k in tlc_model.tlc["kernels"]] if getattr(tlc_model, "tlc", None) else None,
        "precisions": precisions, "files": files, "source": source or {},
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    return manifest


def _build_engines(out: Path, files: dict[str, dict], image_shape: tuple, tile_shapes: list[tuple], n_tiles: int,
                   options, progress: bool) -> dict:
    """A TensorRT engine per FP16 graph: the encoder's for the one padded image, each step's for a batch of 1 to
    ``n_tiles`` tiles (``tile_shapes``: each state tensor's (C, h, w))."""
    import sys

    from .shapes import Profile
    from .tensorrt_build import build_engine
    from .trt_plan import TrtOptions

    options = options or TrtOptions()
    engines = {}
    for name, rec in list(files.items()):
        if rec["precision"] != "fp16":
            continue
        engine = name.replace("-fp16.onnx", ".engine")
        if rec["role"] == "encoder":
            s = tuple(image_shape)
            profile, input_name = Profile(s, s, s), "input"
        else:
            profile = {n: Profile((1, *s), (n_tiles, *s), (n_tiles, *s)) for n, s in zip(STATE_NAMES, tile_shapes)}
            input_name = STATE_NAMES[0]
        if progress:
            print(f"building TensorRT engine {engine} ...", file=sys.stderr)
        trt_rec = build_engine(out / name, out / engine, profile, input_name, options, out)
        engines[engine] = {**{k: v for k, v in rec.items() if k != "sha256"}, "built_from": name, "tensorrt": trt_rec}
    return engines


def island_convs(model: AdaRevD, k: int) -> list[str]:
    """The names of sub-decoder ``k``'s convs inside FP32 islands (modules with ``fp32_island``: the FFT
    branches), which compute in FP32 in a half model."""
    islands = [m for m in model.subdenets[k].modules() if getattr(m, "fp32_island", False)]
    return [f"subdenets.{k}.{name}" for name, mod in model.subdenets[k].named_modules()
            if isinstance(mod, nn.Conv2d) and any(mod in island.modules() for island in islands)]


def _set_props(proto, props: dict[str, str]) -> None:
    import onnx

    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, **props})


def _half(model: AdaRevD) -> AdaRevD:
    import copy

    return copy.deepcopy(model).half()

