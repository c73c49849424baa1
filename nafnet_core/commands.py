"""CLI commands of nafnet_core: ``info``."""

from __future__ import annotations

from pathlib import Path

import click

from .checkpoint import load_checkpoint
from .cli_common import preset_option, train_size_option
from .config import DEFAULT_TRAIN_SIZE, PRESETS, get_config
from .family import build_model
from .flops import model_gflops
from .model import count_parameters
from .tlc import tlc_kernels


@click.command()
@click.argument("model", metavar="PRESET_OR_CHECKPOINT")
@preset_option
@train_size_option
def info(model: str, preset: str | None, train_size: int | None) -> None:
    """Print a model's architecture, parameters, GFLOP and TLC kernels.

    \b
    Examples:
      python cli.py info nafnet-gopro-width32
      python cli.py info runs/demo/best.pt
      python cli.py info NAFNet-GoPro-width32.pth --preset nafnet-gopro-width32
    """
    if model in PRESETS and not Path(model).exists():
        config, name, source, stored_size = get_config(model), model, "preset", DEFAULT_TRAIN_SIZE
        net = build_model(config)
    else:
        ckpt = load_checkpoint(model, preset=preset)
        config, name, stored_size = ckpt.config, ckpt.preset, ckpt.train_size
        source = f"{ckpt.source} checkpoint {model}"
        net = ckpt.model
    n_params = count_parameters(net)
    train_size = train_size or stored_size
    kind = config.block
    if config.heads > 1:
        kind += f", {config.heads} heads -> {config.n_outputs} outputs, deployment head {net.head}"
    rows = [
        ("model", name or "(custom)"),
        ("source", source),
        ("width", config.width),
        ("blocks", f"enc {list(config.enc_blk_nums)} mid {config.middle_blk_num} dec {list(config.dec_blk_nums)}"),
        ("block kind", kind),
        ("gate", config.gate),
        ("input", "image + frequency-selection image (input_fft=fs)" if config.input_fft == "fs" else "image"),
        ("parameters", f"{n_params:,}"),
        *_adarevd_rows(config, net),
        ("GFLOP 256x256", f"{model_gflops(config, 256, 256):.2f}"),
        ("GFLOP 720x1280", f"{model_gflops(config, 720, 1280):.2f}"),
        ("pad multiple", config.pad_multiple),
        ("train size", train_size),
        ("TLC kernels", ", ".join(f"L{i}: {k[0]}x{k[1]}" for i, k in enumerate(tlc_kernels(config, train_size)))
         + (" (encoder)" if config.decoder == "adarevd" else "")),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")


def _adarevd_rows(config, net) -> list[tuple[str, str]]:
    """The AdaRevD rows of ``info``: decoder, exits, tiles and how the parameters split."""
    if config.decoder != "adarevd":
        return []
    from .adarevd import split_parameters

    parts = split_parameters(net)
    sub = [v for k, v in parts.items() if k.startswith("sub-decoder")]
    split = f"encoder {parts['encoder']:,} + {len(sub)} x sub-decoder {sub[0]:,}"
    if len(set(sub)) > 1:
        split = f"encoder {parts['encoder']:,} + sub-decoders " + " + ".join(f"{v:,}" for v in sub)
    if "classifier" in parts:
        split += f" + classifier {parts['classifier']:,}"
    exits = (f"classifier on e3, exit table {list(config.exits)}" if config.exits
             else f"no classifier: depth {config.sub_decoders} on every tile")
    return [("decoder", f"adarevd: {config.sub_decoders} reversible sub-decoders (FCNAF), one head each"),
            ("parameter split", split),
            ("exits", exits),
            ("tiles", f"{config.tile} px, overlap {config.tile_overlap}, blend {config.blend}"),
            ("GFLOP note", f"GFLOP below: every tile at depth {config.sub_decoders}"
             + (" plus the classifier" if config.exits else ""))]
