"""Click option callbacks shared by the ``ocrconv`` commands: values are refused before any work starts."""
from __future__ import annotations

import math
from urllib.parse import urlparse

import click

MIRROR_SCHEMES = ("http", "https")


def mirror_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Accept a mirror base URL only when it is an http(s) URL with a host (empty: no mirror)."""
    if not value:
        return value
    parsed = urlparse(value)
    if parsed.scheme not in MIRROR_SCHEMES or not parsed.netloc:
        raise click.BadParameter(f"{value!r} is not an http:// or https:// URL with a host "
                                 f"(e.g. http://127.0.0.1:8000)", ctx=ctx, param=param)
    return value


def finite_tolerance(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """Accept a tolerance only when it is a finite number (the option's FloatRange refuses negatives)."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number", ctx=ctx, param=param)
    return value
