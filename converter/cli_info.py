"""CLI command ``ocrconv info``: what a Paddle weight file, directory, tar or manifest model holds."""
from __future__ import annotations

import json
from pathlib import Path

import click

from converter.cli_options import mirror_url
from converter.manifest import local_path_exists
from converter.paddle_io import PaddleWeights, load


def key_prefixes(keys, depth: int) -> dict[str, int]:
    """Counts of the first ``depth`` dotted components of the keys that have more than ``depth`` of them."""
    counts: dict[str, int] = {}
    for key in keys:
        parts = key.split(".")
        if len(parts) > depth:
            prefix = ".".join(parts[:depth]) + "."
            counts[prefix] = counts.get(prefix, 0) + 1
    return counts


def version_hints(weights: PaddleWeights) -> list[str]:
    """What the file says about the Paddle / numpy that wrote it."""
    meta = weights.meta
    hints = []
    if weights.kind == "inference":
        if meta.get("paddle_version"):
            hints.append(f"program written by Paddle {meta['paddle_version']}")
        return hints
    if meta.get("pickle_protocol") is not None:
        hints.append(f"pickle protocol {meta['pickle_protocol']}")
    for module in meta.get("numpy_module", []):
        hints.append("arrays pickled under numpy " + ("2.x" if module.startswith("numpy._core") else "1.x"))
    if meta.get("name_table"):
        hints.append("paddle.save state dict (StructuredToParameterName@@ table)")
    if "tuple(name, ndarray)" in meta.get("forms", []):
        hints.append("tensors saved as (name, ndarray) tuples (Paddle 2.1 _pickle_save)")
    if meta.get("big_params_joined"):
        hints.append(f"{len(meta['big_params_joined'])} big parameters re-joined from UnpackBigParamInfor@@ slices")
    return hints


def describe(weights: PaddleWeights) -> dict:
    """Everything ``info`` reports, as JSON-ready data."""
    data = {
        "kind": weights.kind,
        "format": weights.meta.get("format"),
        "source": str(weights.source),
        "file": weights.meta.get("file"),
        "sha256": weights.sha256,
        "file_bytes": weights.meta.get("size"),
        "tensors": len(weights),
        "tensor_bytes": weights.nbytes,
        "version_hints": version_hints(weights),
        "candidates": weights.meta.get("candidates", []),
        "other_files": weights.meta.get("other_files", []),
        "prefixes": key_prefixes(weights, 1),
        "prefixes_2": key_prefixes(weights, 2),
        "keys": [{"key": k, "shape": list(v.shape), "dtype": v.dtype.name,
                  "paddle_name": weights.param_names.get(k)} for k, v in weights.items()],
    }
    if weights.meta.get("values"):
        data["values"] = {k: _shown_value(v) for k, v in weights.meta["values"].items()}
    program = weights.program
    if program is not None:
        data["feeds"] = [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in program.feeds]
        data["fetches"] = [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in program.fetches]
        data["ops"] = program.op_types()
        data["info_only"] = weights.info_only
    return data


_SHOWN_CHARACTERS = 200


def _shown_value(value):
    """A checkpoint's non-tensor value as ``info`` shows it: numbers, booleans and short texts as they are, anything
    long or huge (a 10**5000 epoch, a megabyte of text) described instead of printed."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"<int of {value.bit_length()} bits>"
    if isinstance(value, (int, float, bool, type(None))):
        return value
    text = value if isinstance(value, str) else repr(value)
    if len(text) > _SHOWN_CHARACTERS:
        return f"{text[:_SHOWN_CHARACTERS]}... ({len(text)} characters)"
    return text


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def _print_text(data: dict, limit: int | None) -> None:
    click.echo(f"source:   {data['source']}")
    click.echo(f"file:     {data['file']} ({data['file_bytes']} bytes, sha256 {data['sha256']})")
    click.echo(f"format:   {data['kind']} ({data['format']})")
    for hint in data["version_hints"]:
        click.echo(f"hint:     {hint}")
    if len(data["candidates"]) > 1 or data["other_files"]:
        click.echo(f"files:    {', '.join(data['candidates'] + data['other_files'])}")
    click.echo(f"tensors:  {data['tensors']} ({data['tensor_bytes']} bytes)")
    if data["prefixes"]:
        click.echo("prefixes: " + ", ".join(f"{p} ({n})" for p, n in data["prefixes"].items()))
        click.echo("          " + ", ".join(f"{p} ({n})" for p, n in data["prefixes_2"].items()))
    for label, io_name in (("feed:", "feeds"), ("fetch:", "fetches")):
        for spec in data.get(io_name, []):
            click.echo(f"{label:<10}{spec['name']} {spec['shape']} {spec['dtype']}")
    if "ops" in data:
        click.echo(f"ops:      {sum(data['ops'].values())} ({len(data['ops'])} types)")
        click.echo(f".info entries not in the program: {len(data['info_only'])}")
    for key, value in data.get("values", {}).items():
        click.echo(f"value:    {key} = {value}")
    keys = data["keys"] if limit is None else data["keys"][:limit]
    if keys:
        click.echo("")
        rows = [("key", "shape", "dtype")] + [(k["key"], "x".join(map(str, k["shape"])) or "()", k["dtype"])
                                              for k in keys]
        for line in _table(rows):
            click.echo(line)
        if len(keys) < len(data["keys"]):
            click.echo(f"... {len(data['keys']) - len(keys)} more (--limit 0 shows all)")


def _load_named(name: str, artifact: str | None, mirror: str | None, cache: str | None, offline: bool) -> Path:
    from converter.download import fetch_artifact
    from converter.manifest import resolve_target

    entry, implied = resolve_target(name)
    return fetch_artifact(entry, artifact or implied or "inference", cache_dir=cache, mirror=mirror,
                          offline=offline)


@click.command("info")
@click.argument("target")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--prefer", help="Which file to read when there are several (e.g. student.pdparams).")
@click.option("--kind", type=click.Choice(["trained", "inference"]), help="Read this kind when both are present.")
@click.option("--limit", type=click.IntRange(min=0), default=40, show_default=True,
              help="Rows of the key table (0: all).")
@click.option("--artifact", type=click.Choice(["inference", "trained", "pretrained"]),
              help="For a model NAME: which archive (default: inference, or what the name implies).")
@click.option("--mirror", envvar="OCRCONV_MIRROR", callback=mirror_url,
              help="For a model NAME: base URL of a mirror.")
@click.option("--cache", type=click.Path(file_okay=False), envvar="OCRCONV_CACHE", help="Cache directory.")
@click.option("--offline", is_flag=True, help="For a model NAME: use only the cache.")
def info(target: str, as_json: bool, prefer: str | None, kind: str | None, limit: int, artifact: str | None,
         mirror: str | None, cache: str | None, offline: bool) -> None:
    """Show what TARGET holds: a .tar, directory, .pdparams/.pdopt/.states, inference prefix or model NAME.

    Pickles are read with a restricted unpickler: a file asking for anything else is refused and nothing runs.
    """
    path = Path(target)
    if not local_path_exists(path):
        path = _load_named(target, artifact, mirror, cache, offline)
    weights = load(path, prefer=prefer, kind=kind)
    data = describe(weights)
    if as_json:
        click.echo(json.dumps(data, indent=1, ensure_ascii=False))
    else:
        _print_text(data, None if limit == 0 else limit)


COMMANDS = [info]
