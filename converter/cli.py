"""``ocrconv`` command line: a thin click layer over the converter modules."""
from __future__ import annotations

import logging
import sys

import click

from converter import __version__
from converter.errors import OcrconvError


def _meant_for_people(exc: Exception) -> bool:
    """An :class:`OcrconvError`, or an error ``architectures`` raises on purpose (recognised without importing
    ``architectures``, which would load torch: if it is not loaded, it raised nothing)."""
    errors = sys.modules.get("architectures.errors")
    return isinstance(exc, OcrconvError) or (errors is not None and isinstance(exc, errors.ArchitectureError))


class _Group(click.Group):
    """Click group that prints the errors meant for people (:func:`_meant_for_people`) as a plain message and exits
    with status 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except Exception as exc:
            if not _meant_for_people(exc):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ocrconv")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Convert PaddleOCR models into PyTorch weights, with a parity report against Paddle."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _register() -> None:
    from converter import cli_convert, cli_fetch, cli_info

    for module in (cli_fetch, cli_info, cli_convert):
        for command in module.COMMANDS:
            main.add_command(command)


_register()


if __name__ == "__main__":  # python -m converter.cli
    main()
