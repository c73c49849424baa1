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
