"""What every CLI command shares: the group that turns UserError into one line, shared options."""

from __future__ import annotations

import click

from .config import PRESETS
from .errors import UserError


class Group(click.Group):
    """A click group that prints a :class:`UserError` as ``Error: <message>`` (exit 1), no traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as e:
            raise click.ClickException(str(e)) from None


preset_option = click.option(
    "--preset", type=click.Choice(sorted(PRESETS)), default=None,
    help="Architecture of an official {'params': ...} .pth file (project checkpoints carry their own).")

train_size_option = click.option(
    "--train-size", type=click.IntRange(min=16), default=None,
    help="Crop size the model was trained on; sets the TLC kernels. Default: from the checkpoint, else 256.")


def parse_size(text: str) -> tuple[int, int]:
    """``"720x1280"`` -> (720, 1280); ``"512"`` -> (512, 512). Raises ValueError with an example."""
    text = str(text).strip().lower().replace("×", "x").replace(",", "x")
    parts = text.split("x")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"expected HEIGHTxWIDTH such as 512x512 or 720x1280, got {text!r}")
    return int(parts[0]), int(parts[1])


class SizeType(click.ParamType):
    """A ``HEIGHTxWIDTH`` option value (``512x512``; a single number means a square)."""

    name = "HxW"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            return parse_size(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


SIZE = SizeType()


def fmt(value, spec: str = "") -> str:
    """``format(value, spec)``, or ``-`` for a missing value (table cells)."""
    return "-" if value is None else format(value, spec)


def text_table(head: list[str], rows: list[list]) -> str:
    """A plain-text table: left-aligned columns, a rule under the header; the last column is free-length."""
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    widths[-1] = len(head[-1])  # the last column (a status or note) is not padded
    out = ["  ".join(str(x).ljust(w) for x, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(out)
