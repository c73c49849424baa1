#!/usr/bin/env python
"""NAFNet-Deblurring command line: ``python cli.py --help``.

Each command lives beside the code it drives (``<package>/commands.py``) and only parses and calls.
"""

from __future__ import annotations

import click

from nafnet_core import __version__
from nafnet_core.cli_common import Group
from nafnet_core.commands import info
from export.commands import export
from runtime.commands import bench, demo, infer, parity, serve
from train.commands import compare_cmd, data, eval_cmd, train_cmd


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="nafnet-deblurring")
def main() -> None:
    """Train NAFNet to remove motion blur, export it to ONNX / TensorRT FP16, and prove the export
    restores images as well as PyTorch.

    \b
    Example:
      python cli.py info nafnet-gopro-width32
    """


main.add_command(info)
main.add_command(demo)
main.add_command(data)
main.add_command(train_cmd)
main.add_command(eval_cmd)
main.add_command(compare_cmd)
main.add_command(export)
main.add_command(infer)
main.add_command(parity)
main.add_command(bench)
main.add_command(serve)

if __name__ == "__main__":
    main()
