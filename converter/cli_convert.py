"""CLI commands ``convert`` (one model or a batch) and ``check`` (parity against Paddle)."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from converter import OUTPUT_DTYPES
from converter.cli_options import finite_tolerance, mirror_url
from converter.errors import OcrconvError, OutputError

# converter.convert and converter.parity load torch (~1 s): they are imported by the commands that run, so that
# `ocrconv --help`, `list`, `download` and `info` start at once.

# Exit status of a batch stopped by Ctrl-C (128 + SIGINT, as a shell reports it).
EXIT_INTERRUPTED = 130


def _echo_result(result) -> None:
    from converter import convert as pipeline, parity

    for note in pipeline.iter_notes(result):
        click.echo(f"note: {note}", err=True)
    if result.parity:
        click.echo(parity.ParityReport(result.parity).table())
    if result.status == "up-to-date":
        click.echo(f"{result.name}: up to date in {result.out}")
    else:
        click.echo(f"{result.name}: {result.artifact} artifact, family {result.family}, {result.form} form "
                   f"-> {result.out} ({result.seconds:.1f} s)")


def _json_report(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """--report names the JSON report; its Markdown table is written next to it, so it cannot be a .md path."""
    from converter import convert as pipeline

    if value is not None:
        try:
            pipeline.markdown_path(value)
        except OutputError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    return value


@click.command("convert")
@click.argument("target", required=False, metavar="[NAME|PATH]")
@click.option("--artifact", type=click.Choice(["inference", "trained", "pretrained"]), default=None,
              help="Which archive of a manifest row (default: the one a name like *_train names, else inference).")
@click.option("--out", "out", type=click.Path(path_type=Path), default=None,
              help="Output directory (default ./<name>); the root folder for a batch.")
@click.option("--family", default=None, help="Architecture family of a local PATH (default: from its name or weights).")
@click.option("--dict", "dictionary", default=None,
              help="Character dictionary for a rec model: a file or a vendored name (default: the manifest's).")
@click.option("--reference", type=click.Path(exists=True, path_type=Path), default=None,
              help="Inference model to check a trained checkpoint against.")
@click.option("--submodel", default=None, metavar="NAME",
              help="Distillation sub-model of a trained checkpoint to convert, e.g. Student2 or Teacher "
                   "(default: the Student).")
@click.option("--mirror", default=None, envvar="OCRCONV_MIRROR", callback=mirror_url,
              help="Base URL replacing the download host (or OCRCONV_MIRROR).")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              envvar="OCRCONV_CACHE", help="Download cache (or OCRCONV_CACHE; default ~/.cache/ocrconv).")
@click.option("--offline", is_flag=True, help="Use the cache only, never the network.")
@click.option("--train-form", is_flag=True, help="Keep re-parameterisable backbones (PP-OCRv4) in their training form.")
@click.option("--check/--no-check", default=None,
              help="Run the parity check against Paddle (default: on when PaddlePaddle is installed).")
@click.option("--atol", type=click.FloatRange(min=0), default=None, callback=finite_tolerance,
              help="Parity tolerance, absolute, on probabilities.")
@click.option("--dtype", type=click.Choice(OUTPUT_DTYPES), default="float32", help="dtype of the saved weights.")
@click.option("--force", is_flag=True,
              help="Replace an existing output directory that ocrconv wrote (the old one stays until the new is "
                   "complete); anything else is never replaced.")
@click.option("--all", "all_rows", is_flag=True, help="Batch: every manifest row.")
@click.option("--names-from", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Batch: row names from a file, one per line.")
@click.option("--task", type=click.Choice(["det", "rec", "cls"]), default=None,
              help="Batch: only rows of this task (alone: every row of this task).")
@click.option("--jobs", type=click.IntRange(min=1), default=1, help="Batch: parallel conversions.")
@click.option("--keep-going", is_flag=True, help="Batch: continue after a failed row.")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), default=None, callback=_json_report,
              help="Batch: write a JSON report here and a Markdown table next to it (<stem>.md).")
def convert_command(target, artifact, out, family, dictionary, reference, submodel, mirror, cache_dir, offline,
                    train_form, check, atol, dtype, force, all_rows, names_from, task, jobs, keep_going, report):
    """Convert NAME (a manifest row) or PATH (.tar, directory, .pdparams, inference prefix) to PyTorch.

    Writes model.safetensors, config.json, dict.txt (rec) and parity.json (when checked) into the output
    directory. With --all / --names-from / --task it converts a batch into --out/<name>/.
    """
    from converter import convert as pipeline, parity

    if all_rows and names_from is not None:
        raise click.UsageError("give --all or --names-from FILE, not both")
    batch = all_rows or names_from is not None or (task is not None and target is None)
    if batch == (target is not None):
        raise click.UsageError("give either NAME|PATH or a batch (--all / --names-from FILE / --task T)")
    if check is None and not parity.paddle_available():
        click.echo(f"note: PaddlePaddle is not installed, so parity is not checked (install: {parity.INSTALL_HINT})",
                   err=True)
    options = dict(artifact=artifact, mirror=mirror, cache_dir=cache_dir, offline=offline, train_form=train_form,
                   check=check, dtype=dtype, force=force, atol=atol)
    if not batch:
        if task or jobs != 1 or keep_going or report:
            raise click.UsageError("--task, --jobs, --keep-going and --report apply to a batch "
                                   "(--all / --names-from FILE / --task T)")
        result = pipeline.convert(target, out=out, family=family, dictionary=dictionary, reference=reference,
                                  submodel=submodel, progress=lambda m: click.echo(f"... {m}", err=True), **options)
        _echo_result(result)
        if not result.ok:
            raise OcrconvError(f"{result.name}: parity check failed ({pipeline.parity_failure(result.parity)}); "
                               f"the output is in {result.out} with parity.json")
        return
    if family or dictionary or reference or submodel:
        raise click.UsageError("--family, --dict, --reference and --submodel apply to a single NAME|PATH")
    names = pipeline.batch_names(all_rows=all_rows, names_from=names_from, task=task)
    try:
        data = pipeline.convert_batch(names, out or Path.cwd(), jobs=jobs, keep_going=keep_going, report=report,
                                      options=options)
    except pipeline.BatchInterrupted as stop:
        _echo_batch(stop.report, report)
        click.echo(f"interrupted: {stop.report['rows_run']} of {stop.report['rows_requested']} rows done"
                   + (f"; partial report: {report}" if report else ""), err=True)
        sys.exit(EXIT_INTERRUPTED)
    _echo_batch(data, report)
    if data["stopped"]:
        click.echo(f"stopped at the first failure: {data['rows_requested'] - data['rows_run']} rows not run "
                   f"(--keep-going converts them all)", err=True)
    if data["failed"] or data["rows_run"] < data["rows_requested"]:
        sys.exit(1)


def _echo_batch(data: dict, report: Path | None) -> None:
    from converter import convert as pipeline

    for row in data["rows"]:
        diff = row.get("max_abs_diff")
        click.echo(f"{row['status']:>13}  {row['name']:<34} {'' if diff is None else f'max diff {diff:.3g}'}"
                   + (f"  {row['error']}" if row.get("error") else ""))
    counts = ", ".join(f"{v} {k}" for k, v in sorted(data["counts"].items()))
    click.echo(f"{data['rows_run']}/{data['rows_requested']} rows ({counts}) in {data['seconds']:.1f} s"
               + (f"; report: {report} and {pipeline.markdown_path(report)}" if report else ""))


@click.command("check")
@click.argument("target", metavar="NAME|DIR")
@click.option("--reference", type=click.Path(exists=True, path_type=Path), default=None,
              help="Paddle inference model to compare with (default: the one the output was converted from).")
@click.option("--atol", type=click.FloatRange(min=0), default=None, callback=finite_tolerance,
              help="Tolerance, absolute, on probabilities (default 1e-5).")
@click.option("--mirror", default=None, envvar="OCRCONV_MIRROR", callback=mirror_url,
              help="Base URL replacing the download host (or OCRCONV_MIRROR).")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              envvar="OCRCONV_CACHE", help="Download cache (or OCRCONV_CACHE).")
@click.option("--offline", is_flag=True, help="Use the cache only, never the network.")
@click.option("--no-write", is_flag=True, help="Do not rewrite DIR/parity.json.")
def check_command(target, reference, atol, mirror, cache_dir, offline, no_write):
    """Compare a converted DIR (or NAME, converted in memory) with Paddle's own inference program."""
    from converter import convert as pipeline

    report = pipeline.check(target, reference=reference, atol=atol, mirror=mirror, cache_dir=cache_dir,
                            offline=offline, write=not no_write)
    click.echo(report.table())
    if pipeline.parity_failure(report.data):
        sys.exit(1)


COMMANDS = [convert_command, check_command]
