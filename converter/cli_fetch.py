"""CLI commands ``ocrconv list`` and ``ocrconv download``."""
from __future__ import annotations

import json

import click

from converter.cli_options import mirror_url
from converter.download import fetch_artifact
from converter.manifest import ARTIFACT_KINDS, TASKS, load_manifest


def _entry_dict(entry) -> dict:
    return {
        "name": entry.name, "task": entry.task, "family": entry.family, "language": entry.language,
        "dict": entry.dict, "dict_sha256": entry.dict_sha256, "size_hint": entry.size_hint,
        "section": entry.section, "aliases": list(entry.aliases), "same_language_as": entry.same_language_as,
        "artifacts": {kind: {"url": a.url, "alt_urls": list(a.alt_urls), "filename": a.filename}
                      for kind, a in entry.artifacts.items()},
    }


@click.command("list")
@click.option("--task", type=click.Choice(TASKS), help="Only detection, recognition or angle-classification models.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (every manifest field).")
def list_models(task: str | None, as_json: bool) -> None:
    """List every model of the manifest with its archives and family."""
    entries = load_manifest().by_task(task)
    if as_json:
        click.echo(json.dumps([_entry_dict(e) for e in entries], indent=1, ensure_ascii=False))
        return
    width = max(len(e.name) for e in entries)
    fam_width = max(len(e.family) for e in entries)
    lang_width = max(len("language"), *(len(e.language) for e in entries))
    click.echo(f"{'name':<{width}}  task  {'family':<{fam_width}}  {'language':<{lang_width}}  {'size':>6}  artifacts")
    for e in entries:
        click.echo(f"{e.name:<{width}}  {e.task:<4}  {e.family:<{fam_width}}  {e.language:<{lang_width}}  "
                   f"{e.size_hint:>6}  {','.join(e.artifacts)}")


@click.command("download")
@click.argument("names", nargs=-1, required=True)
@click.option("--artifact", type=click.Choice((*ARTIFACT_KINDS, "all")), default=None,
              help="Which archive (default: inference, or the one a file stem like *_train names).")
@click.option("--mirror", envvar="OCRCONV_MIRROR", callback=mirror_url,
              help="Base URL serving the same paths as paddleocr.bj.bcebos.com.")
@click.option("--cache", "cache", type=click.Path(file_okay=False), envvar="OCRCONV_CACHE",
              help="Cache directory (default ~/.cache/ocrconv).")
@click.option("--offline", is_flag=True, help="Use only the cache; fail naming what is missing.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def download(names: tuple[str, ...], artifact: str | None, mirror: str | None, cache: str | None, offline: bool,
             quiet: bool) -> None:
    """Download and unpack models (NAME: table name, alias or archive stem); prints the unpacked paths."""
    manifest = load_manifest()
    jobs = []
    for name in names:  # resolve everything first: a typo fails before any download
        entry, implied = manifest.resolve(name)
        if artifact == "all":
            kinds = list(entry.artifacts)
        else:
            kind = artifact or implied or "inference"
            entry.artifact(kind)
            kinds = [kind]
        jobs.extend((entry, kind) for kind in kinds)
    for entry, kind in jobs:
        path = fetch_artifact(entry, kind, cache_dir=cache, mirror=mirror, offline=offline,
                              quiet=True if quiet else None)
        click.echo(str(path))


COMMANDS = [list_models, download]
