#!/usr/bin/env python
"""CPU inference speed of the converted PyTorch models against Paddle Inference, per architecture family.

For each family the inference model of its reference fixture row (``../shared/fixtures``, random weights with the
release architecture; graph rows are materialized once) is converted with ``converter.rules.convert`` (deploy
form) and timed next to Paddle Inference running the same program with its default CPU optimisations (IR passes,
oneDNN). Same thread count on both sides (1 and 2 by default), the same input, warm-up (>= 3 calls and >= 1 s
per side) excluded, median of ``--runs`` timed calls (``--server-runs`` for the server models); PyTorch and
Paddle take turns in blocks of runs so that both see the same background load.

Inputs: det 1x3x640x640; rec 1x3xHx320 and 8x3xHx320 (H = 32 for the CRNN v2.0 / PP-OCRv2 families, else 48);
cls 8x3x48x192. PyTorch runs under ``torch.inference_mode()``; ``--channels-last`` converts model and input. Each
family runs in a fresh process; ``--processes N`` runs it in N of them (in rounds over the families, so that a slow
spell of the machine does not hit one family only) and reports the median ratio with its range.

Memory: Paddle Inference keeps freed memory in its own allocator; PyTorch's CPU tensors come from malloc, which
hands large blocks back to the kernel, so every call pays page faults on its fresh feature maps (up to ~15% of a
det model's time). ``--huge-pages`` sets PyTorch's ``THP_MEM_ALLOC_ENABLE=1`` (2 MB-aligned allocations with
transparent huge pages, 512x fewer faults) before torch is imported; ``--keep-freed-memory`` runs each family with
glibc tunables that serve every block from the heap and never hand freed memory back (the process keeps its peak,
as Paddle's allocator does). The JSON records both settings.

    python scripts/bench_infer.py                       # every family
    python scripts/bench_infer.py --processes 3         # each family in 3 fresh processes
    python scripts/bench_infer.py --family PP-OCRv4_mobile_rec --threads 1 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if "--huge-pages" in sys.argv:  # read once by PyTorch's CPU allocator: must be set before torch is imported
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
# glibc serves every block from the heap (no mmap, whose blocks go back to the kernel when freed, however large)
# and never trims it: read by glibc at process start, so it is set for the per-family child processes
KEEP_FREED_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647"

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import fixture_data  # noqa: E402

import architectures  # noqa: E402
from converter import paddle_io, parity  # noqa: E402
from converter.rules import convert  # noqa: E402

# family -> fixture row whose inference model has that family's architecture
FAMILY_ROWS = {
    "ppocr_mobile_v2.0_det": "ch_ppocr_mobile_v2.0_det",
    "ppocr_server_v2.0_det": "ch_ppocr_server_v2.0_det",
    "PP-OCRv2_det": "ch_PP-OCRv2_det",
    "PP-OCRv3_det": "ch_PP-OCRv3_det",
    "PP-OCRv4_mobile_det": "ch_PP-OCRv4_det",
    "PP-OCRv4_server_det": "ch_PP-OCRv4_server_det",
    "ppocr_mobile_v2.0_rec": "ch_ppocr_mobile_v2.0_rec",
    "ppocr_server_v2.0_rec": "ch_ppocr_server_v2.0_rec",
    "PP-OCRv2_rec": "ch_PP-OCRv2_rec",
    "PP-OCRv3_rec": "ch_PP-OCRv3_rec",
    "PP-OCRv4_mobile_rec": "ch_PP-OCRv4_rec",
    "PP-OCRv4_server_rec": "ch_PP-OCRv4_server_rec",
    "ppocr_mobile_v2.0_cls": "ch_ppocr_mobile_v2.0_cls",
}
SERVER_FAMILIES = {"ppocr_server_v2.0_det", "PP-OCRv4_server_det", "ppocr_server_v2.0_rec", "PP-OCRv4_server_rec"}


def input_shapes(config: dict) -> list[tuple[int, ...]]:
    """The benchmark input shapes of a family."""
    task = config["task"]
    if task == "det":
        return [(1, 3, 640, 640)]
    if task == "cls":
        return [(8, 3, 48, 192)]
    height = int(config["preprocess"]["image_shape"][1])
    return [(1, 3, height, 320), (8, 3, height, 320)]


def inference_tar(row: str) -> Path:
    """The row's inference tar: shipped for full and hybrid rows, materialized (cached) for graph rows."""
    info = fixture_data.row_info(row)
    shipped = fixture_data.FIXTURES / row / f"{info['infer_dirname']}.tar"
    return shipped if shipped.is_file() else fixture_data.infer_tar(row)


class PaddlePredictor:
    """Paddle Inference with its default CPU configuration (IR optimisation and oneDNN on)."""

    def __init__(self, prefix: Path, threads: int):
        parity.import_paddle()  # keeps Paddle's import from reconfiguring the root logger
        from paddle import inference

        config = inference.Config(str(prefix) + ".pdmodel", str(prefix) + ".pdiparams")
        config.disable_gpu()
        config.disable_glog_info()
        config.set_cpu_math_library_num_threads(threads)
        self.optimisations = {"ir_optim": config.ir_optim(), "mkldnn": config.mkldnn_enabled()}
        self.predictor = inference.create_predictor(config)
        self.input = self.predictor.get_input_handle(self.predictor.get_input_names()[0])
        self.outputs = [self.predictor.get_output_handle(n) for n in self.predictor.get_output_names()]

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        self.input.reshape(list(x.shape))
        self.input.copy_from_cpu(x)
        self.predictor.run()
        return [out.copy_to_cpu() for out in self.outputs]


def _median_seconds(fns, warmup: int, runs: int, blocks: int = 4, warmup_s: float = 1.0) -> list[float]:
    """Median wall time of each callable. The callables take turns in ``blocks`` blocks of consecutive runs, so
    that both see the same background load; a pause before each block lets the other runtime's OpenMP worker
    threads stop spinning (interleaving single calls makes two multi-threaded runtimes fight for the cores).
    Warm-up: at least ``warmup`` calls and ``warmup_s`` seconds per callable (oneDNN kernel generation, thread
    pools and allocator caches settle; a fixed count was too short for the first measurement of a run)."""
    for fn in fns:
        start, count = time.perf_counter(), 0
        while count < warmup or time.perf_counter() - start < warmup_s:
            fn()
            count += 1
    times: list[list[float]] = [[] for _ in fns]
    per_block = [runs // blocks + (1 if i < runs % blocks else 0) for i in range(blocks)]
    for count in per_block:
        for fn, bucket in zip(fns, times):
            time.sleep(0.3)
            fn()  # re-warm caches after the pause, untimed
            for _ in range(count):
                start = time.perf_counter()
                fn()
                bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket) for bucket in times]


def bench_family(family: str, threads: list[int], runs: int, warmup: int, channels_last: bool,
                 workdir: Path) -> list[dict]:
    """Time one family at every input shape and thread count; one result dict per measurement. The inference
    program is unpacked under ``workdir``."""
    row = FAMILY_ROWS[family]
    tar = inference_tar(row)
    weights = paddle_io.load(tar)
    conversion = convert(weights, family)
    model = conversion.model.eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    prefix = _unpack(tar, workdir / row)
    results = []
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        predictor = PaddlePredictor(prefix, n_threads)
        for shape in input_shapes(conversion.config):
            x = np.random.RandomState(0).uniform(0, 1, shape).astype(np.float32)
            tensor = torch.from_numpy(x)
            if channels_last:
                tensor = tensor.contiguous(memory_format=torch.channels_last)

            def run_torch():
                with torch.inference_mode():
                    model(tensor)

            paddle_s, torch_s = _median_seconds([lambda: predictor(x), run_torch], warmup, runs)
            results.append({"family": family, "row": row, "shape": "x".join(map(str, shape)), "threads": n_threads,
                            "runs": runs, "torch_ms": torch_s * 1e3, "paddle_ms": paddle_s * 1e3,
                            "ratio": torch_s / paddle_s, "channels_last": channels_last,
                            "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE") == "1",
                            "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
                            "paddle_config": predictor.optimisations})
            print(f"{family:24s} {results[-1]['shape']:>12s} threads={n_threads} torch {torch_s * 1e3:9.2f} ms  "
                  f"paddle {paddle_s * 1e3:9.2f} ms  ratio {torch_s / paddle_s:5.2f}", file=sys.stderr, flush=True)
    return results


def _unpack(tar: Path, dest: Path) -> Path:
    from converter.unpack import safe_extract

    safe_extract(tar, dest)
    return next(dest.rglob("inference.pdmodel")).with_suffix("")


def table(results: list[dict]) -> str:
    """The results as a fixed-width text table (ratio = PyTorch time / Paddle time; < 1 means PyTorch is faster)."""
    lines = [f"{'family':24s} {'input':>12s} {'thr':>3s} {'runs':>4s} {'torch ms':>10s} {'paddle ms':>10s} "
             f"{'ratio':>6s}"]
    for r in results:
        spread = f"  ({min(r['ratios']):.2f}-{max(r['ratios']):.2f} over {r['processes']})" if "ratios" in r else ""
        lines.append(f"{r['family']:24s} {r['shape']:>12s} {r['threads']:3d} {r['runs']:4d} {r['torch_ms']:10.2f} "
                     f"{r['paddle_ms']:10.2f} {r['ratio']:6.2f}{spread}")
    return "\n".join(lines)


def _code_version() -> str | None:
    """``git describe --always --dirty`` of the checkout whose modules were timed (None outside git)."""
    import subprocess

    found = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return found.stdout.strip() or None


def combine_processes(measurements: list[dict]) -> dict:
    """One measurement (family, input, threads) taken in several processes: median times and ratio, every
    process's ratio kept in ``ratios``."""
    combined = dict(measurements[0])
    for key in ("torch_ms", "paddle_ms", "ratio"):
        combined[key] = statistics.median(m[key] for m in measurements)
    combined["ratios"] = [m["ratio"] for m in measurements]
    combined["processes"] = len(measurements)
    return combined


def _family_in_subprocess(family: str, argv: list[str]) -> list[dict]:
    """Run one family in a fresh process: Paddle predictors, their thread pools and PyTorch's caches of the
    families measured before would otherwise stay alive and slow down later measurements (both sides, unevenly;
    the cls model ran 3x slower as the last of 13 families in one process than on its own)."""
    import subprocess

    kept, skip = [], False
    for arg in argv:  # every option but --family / --json / --processes, which are set per process
        if skip:
            skip = False
        elif arg in ("--family", "--json", "--processes"):
            skip = True
        elif not arg.startswith(("--family=", "--json=", "--processes=")):
            kept.append(arg)
    with tempfile.TemporaryDirectory(prefix="bench_infer_") as tmp:
        out = Path(tmp) / "family.json"
        env = dict(os.environ)
        if "--keep-freed-memory" in kept:
            env["GLIBC_TUNABLES"] = KEEP_FREED_TUNABLES
        subprocess.run([sys.executable, __file__, *kept, "--family", family, "--json", str(out)], check=True,
                       stdout=subprocess.DEVNULL, env=env)
        return json.loads(out.read_text())["results"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", action="append", choices=sorted(FAMILY_ROWS),
                        help="family to time (repeatable; default: every family with rules)")
    parser.add_argument("--threads", type=int, action="append", help="thread counts (default: 1 and 2)")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per measurement (median; default 20)")
    parser.add_argument("--server-runs", type=int, default=10, help="timed runs for server models (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up runs (default 3)")
    parser.add_argument("--channels-last", action="store_true", help="run PyTorch in channels_last memory format")
    parser.add_argument("--huge-pages", action="store_true",
                        help="PyTorch allocations with transparent huge pages (THP_MEM_ALLOC_ENABLE=1)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help=f"run each family with GLIBC_TUNABLES={KEEP_FREED_TUNABLES} (freed feature maps "
                             f"stay in the heap: no page faults on them at the next call)")
    parser.add_argument("--processes", type=int, default=1,
                        help="fresh processes per family, in rounds over the families (median ratio and its range)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error("--processes must be at least 1")

    from converter.rules import RULES

    families = args.family or [f for f in FAMILY_ROWS if f in RULES and f in architectures.FAMILIES]
    threads = args.threads or [1, 2]
    results = []
    if len(families) > 1 or args.processes > 1:
        rounds = [[result for family in families
                   for result in _family_in_subprocess(family, argv if argv is not None else sys.argv[1:])]
                  for _ in range(args.processes)]
        results = [combine_processes(list(same)) for same in zip(*rounds)]
    else:
        runs = args.server_runs if families[0] in SERVER_FAMILIES else args.runs
        with tempfile.TemporaryDirectory(prefix="bench_infer_") as workdir:
            results += bench_family(families[0], threads, runs, args.warmup, args.channels_last, Path(workdir))
    print(table(results))
    if args.json:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps({"torch": torch.__version__, "code": _code_version(), "results": results}, indent=1))
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
