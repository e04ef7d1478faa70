"""One command for a GPU machine: build, test and benchmark every GPU path, and report.

    python bench/gpu_check.py [--out DIR] [--budget SECONDS] [--parts a,b,...]

Runs in the repository root with torch, Triton and nvcc preinstalled and no network:

1. the machine: GPU, SMs, driver, torch / Triton / nvcc versions;
2. builds the CUDA kernel library in place (nvcc, sm_80 + sm_90; fusedrnn/backend/cuda_library.py);
3. the test suite's GPU tests (tests/test_gpu.py): every backend on CUDA tensors against the
   float64 reference and against torch.nn (cuDNN);
4. benchmarks, forward and forward+backward, torch.nn (cuDNN) time / ours (> 1: we are faster):
   FlashRNN's setting (B=16, T=1024, H=768; fp32 and bf16) and the seed shapes (fp32);
5. per-step latency against the hidden size (LSTM, B=16, T=256, fp32 and bf16);
6. compute-sanitizer's racecheck, memcheck and synccheck on a persistent forward and backward.

Each timed part records the SM clock nvidia-smi reads during it (the card's clocks are left
as they are found; a GEMM warm-up runs before the benchmarks).

Writes ``gpu_check.md`` and ``gpu_check.json`` to --out and prints progress. It fails soft: a
part that fails is reported with its error and the rest still runs; parts left when the
time budget (default 360 s) runs out are reported as skipped. Without a CUDA device it writes
a report saying so and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

# Real kernels, not the interpreter or the emulation. Triton's autotuner is off (one fixed
# config, BB=16 and 4 warps): its 4 configs per kernel and shape cost more compile time than
# a GPU lease allows.
os.environ["TRITON_INTERPRET"] = "0"
os.environ["FUSEDRNN_CUDA_EMULATE"] = "0"
os.environ["FUSEDRNN_TRITON_AUTOTUNE"] = "0"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

BACKENDS = ["cuda:persistent", "cuda:pointwise", "triton:persistent", "triton:alternating"]
FLASHRNN = (1024, 16, 768, 768, 1)  # (T, B, I, H, layers): FlashRNN's published setting


class Report:
    def __init__(self, out_dir: str, budget: float):
        self.out_dir, self.deadline, self.start = out_dir, time.time() + budget, time.time()
        self.data = {"sections": {}}
        self.md = ["# GPU check", ""]

    def log(self, msg: str) -> None:
        print(f"[{time.time() - self.start:6.1f}s] {msg}", flush=True)

    def section(self, name: str, fn) -> None:
        """Runs one part; records its result, its error, or that the budget ran out."""
        self.md += [f"## {name}", ""]
        if time.time() > self.deadline:
            self.log(f"{name}: skipped (time budget spent)")
            self.data["sections"][name] = {"status": "skipped: time budget spent"}
            self.md += ["Skipped: the time budget was spent.", ""]
            return
        self.log(f"{name} ...")
        t0 = time.time()
        sampler = ClockSampler()
        try:
            result = fn(self)
            status = "ok"
        except Exception as exc:  # fail soft: report and go on
            result, status = traceback.format_exc(limit=4), f"failed: {exc!r}"[:400]
            self.md += [f"**Failed:** `{status}`", "", "```", result, "```", ""]
        clocks = sampler.stop()
        if clocks:
            self.md += [f"SM clock during this part (nvidia-smi, MHz): min {clocks['min']}, "
                        f"median {clocks['median']}, max {clocks['max']} "
                        f"({clocks['samples']} samples).", ""]
        self.data["sections"][name] = {"status": status, "seconds": round(time.time() - t0, 1),
                                       "sm_clock_mhz": clocks, "result": result}
        self.log(f"{name}: {status} ({time.time() - t0:.1f} s; SM clock {clocks})")

    def write(self) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        self.data["wall_s"] = round(time.time() - self.start, 1)
        with open(os.path.join(self.out_dir, "gpu_check.json"), "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        with open(os.path.join(self.out_dir, "gpu_check.md"), "w") as f:
            f.write("\n".join(self.md + [f"Wall time: {self.data['wall_s']} s", ""]))
        self.log(f"wrote {self.out_dir}/gpu_check.md and gpu_check.json")


class ClockSampler:
    """nvidia-smi reading the SM clock every 200 ms while a part runs."""

    def __init__(self):
        try:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=clocks.sm", "--format=csv,noheader,nounits",
                 "-lms", "200"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self.proc = None

    def stop(self):
        if self.proc is None:
            return None
        self.proc.terminate()
        out, _ = self.proc.communicate()
        values = [int(v) for v in out.split() if v.strip().isdigit()]
        if not values:
            return None
        return {"min": min(values), "median": int(statistics.median(values)),
                "max": max(values), "samples": len(values)}


def _run(cmd, timeout=60):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout.strip()
    except Exception as exc:  # a missing tool is a fact for the report
        return f"({cmd[0]}: {exc})"


def machine(report: Report):
    props = torch.cuda.get_device_properties(0)
    info = {"gpu": props.name, "sms": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2 ** 30, 1),
            "capability": f"{props.major}.{props.minor}", "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "python": platform.python_version(),
            "driver": _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
            "nvcc": _run(["nvcc", "--version"]).splitlines()[-1:],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    report.md += [f"- {k}: {v}" for k, v in info.items()] + [""]
    return info


def build(report: Report):
    from fusedrnn.backend import cuda_library
    t0 = time.time()
    path = cuda_library.build(emulate=False)
    lib = cuda_library.Library(path)
    out = {"library": path, "mode": lib.mode, "seconds": round(time.time() - t0, 1),
           "backends": __import__("fusedrnn").backends()}
    report.md += [f"Built `{os.path.basename(path)}` ({lib.mode}) in {out['seconds']} s.", "",
                  "| backend | status |", "|---|---|"]
    report.md += [f"| {k} | {v} |" for k, v in out["backends"].items()] + [""]
    return out


def tests(report: Report):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    remaining = max(30, int(report.deadline - time.time() - 150))  # leave time for benches
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider",
           "tests/test_gpu.py", *(["-k", report.tests_k] if report.tests_k else []),
           *([f"--timeout={remaining}"] if _has_timeout() else [])]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=remaining)
        output, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        output, code = f"timed out after {remaining} s\n{exc.stdout or ''}", "timeout"
    tail = output[-6000:]
    summary = [line for line in output.splitlines() if " passed" in line or " failed" in line]
    report.md += [f"`{' '.join(cmd[2:])}`: exit {code}; {summary[-1] if summary else ''}", "",
                  "```", tail, "```", ""]
    print(tail)
    return {"exit": code, "summary": summary[-1:] if summary else None, "tail": tail}


def _has_timeout() -> bool:
    import importlib.util
    return importlib.util.find_spec("pytest_timeout") is not None


def warm_up(report: Report):
    """Two seconds of large GEMMs, so that the benchmarks start at the clocks a busy card runs."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    end, n = time.time() + 2.0, 0
    while time.time() < end:
        a @ a
        n += 1
        if n % 10 == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    return {"gemms": n}


def _time_ms(fn, min_ms=60.0, max_reps=200):
    """Median over repetitions of fn's CUDA-event time, after warm-up calls (the first
    compiles) for at least 20 ms."""
    fn()
    torch.cuda.synchronize()
    end = time.time() + 0.02
    while time.time() < end:
        fn()
    torch.cuda.synchronize()
    times = []
    start_all = time.time()
    while len(times) < max_reps and (len(times) < 3 or (time.time() - start_all) * 1e3 < min_ms):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def _step(model, x, mode):
    def run():
        if mode == "fwd":
            with torch.no_grad():
                model(x)
        else:
            x.grad = None
            y, _ = model(x)
            y.sum().backward()
    return run


def compare(kind: str, shape, dtype, report: Report, rows: list):
    import fusedrnn
    steps, batch, inputs, hidden, layers = shape
    torch.manual_seed(0)
    ref = getattr(nn, kind)(inputs, hidden, layers).to("cuda", dtype)
    x = torch.randn(steps, batch, inputs, device="cuda", dtype=dtype, requires_grad=True)
    for mode in ("fwd", "fwdbwd"):
        row = {"kind": kind, "shape": list(shape), "dtype": str(dtype)[6:], "mode": mode}
        row["cudnn_ms"] = base = _time_ms(_step(ref, x, mode))
        for name in BACKENDS:
            if time.time() > report.deadline:
                row[name] = "skipped (budget)"
                continue
            ours = getattr(fusedrnn, kind)(inputs, hidden, layers, backend=name).to("cuda", dtype)
            try:
                fusedrnn.resolved_backend(ours, x)
            except fusedrnn.BackendUnavailableError:
                row[name] = "n/a"
                continue
            ours.load_state_dict(ref.state_dict())
            try:
                t = _time_ms(_step(ours, x, mode))
                row[name] = {"ms": round(t, 4), "ratio": round(base / t, 3)}
            except Exception as exc:  # one failing path must not stop the table
                row[name] = f"error: {exc!r}"[:200]
        rows.append(row)
        report.log(f"  {kind} {shape} {row['dtype']} {mode}: cudnn {base:.3f} ms; " + "; ".join(
            f"{n} {r['ratio']}x" if isinstance(r, dict) else f"{n} {r}"
            for n, r in ((n, row.get(n)) for n in BACKENDS)))


def _table(rows):
    head = "| layer | (T, B, I, H, L) | dtype | pass | cuDNN ms | " + " | ".join(BACKENDS) + " |"
    lines = [head, "|" + "---|" * (5 + len(BACKENDS))]
    for r in rows:
        cells = []
        for n in BACKENDS:
            v = r.get(n)
            cells.append(f"{v['ms']:.3f} ms ({v['ratio']:.2f}x)" if isinstance(v, dict) else str(v))
        lines.append(f"| {r['kind']} | {tuple(r['shape'])} | {r['dtype']} | {r['mode']} | "
                     f"{r['cudnn_ms']:.3f} | " + " | ".join(cells) + " |")
    return lines + [""]


def bench_flashrnn(report: Report):
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        compare("LSTM", FLASHRNN, dtype, report, rows)
    report.md += ["cuDNN time / ours (> 1: ours faster); median CUDA-event time. FlashRNN "
                  "reported cuDNN at 2.01 ms fwd and 5.19 ms fwd+bwd at this setting on an "
                  "H100.", ""]
    report.md += _table(rows)
    return rows


def bench_seed_shapes(report: Report):
    from shapes import SEED_SHAPES
    rows = []
    for name, shape in SEED_SHAPES.items():
        for kind in ("LSTM", "GRU"):
            if time.time() > report.deadline:
                break
            compare(kind, shape, torch.float32, report, rows)
    report.md += _table(rows)
    return rows


def bench_step_latency(report: Report):
    """Forward time per step of one LSTM layer, B=16, T=256: where each path stops scaling."""
    import fusedrnn
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for hidden in (128, 256, 512, 768, 1024):
            if time.time() > report.deadline:
                break
            torch.manual_seed(0)
            ref = nn.LSTM(hidden, hidden).to("cuda", dtype)
            x = torch.randn(256, 16, hidden, device="cuda", dtype=dtype)
            row = {"dtype": str(dtype)[6:], "hidden": hidden,
                   "cudnn_us": round(_time_ms(_step(ref, x, "fwd")) * 1e3 / 256, 3)}
            for name in ("cuda:persistent", "triton:persistent", "cuda:pointwise"):
                ours = fusedrnn.LSTM(hidden, hidden, backend=name).to("cuda", dtype)
                try:
                    fusedrnn.resolved_backend(ours, x)
                    ours.load_state_dict(ref.state_dict())
                    row[name] = round(_time_ms(_step(ours, x, "fwd")) * 1e3 / 256, 3)
                except Exception as exc:
                    row[name] = f"n/a ({type(exc).__name__})"
            rows.append(row)
            report.log(f"  step latency {row}")
    names = ("cuda:persistent", "triton:persistent", "cuda:pointwise")
    report.md += ["Forward microseconds per step (one LSTM layer, B=16, T=256).", "",
                  "| dtype | H | cuDNN | " + " | ".join(names) + " |",
                  "|" + "---|" * (3 + len(names))]
    report.md += [f"| {r['dtype']} | {r['hidden']} | {r['cudnn_us']} | "
                  + " | ".join(str(r[n]) for n in names) + " |" for r in rows] + [""]
    return rows


SANITIZED = """
import torch
from fusedrnn.backend import cuda
from fusedrnn.cells import CELLS
from fusedrnn.backend.base import LayerArgs
for cell in ("lstm", "gru"):
    c = CELLS[cell]
    sizes = torch.tensor([6, 6, 5, 3, 2])
    H, B, rows = 96, 6, 22
    g = lambda *s: (0.3 * torch.randn(*s, device="cuda")).requires_grad_()
    args = LayerArgs(c, sizes, g(B, H), g(B, H) if c.has_cell_state else None, None,
                     g(c.gates * H, H), None, g(c.gates * H), None, cell == "gru")
    y, h, cc = cuda.PERSISTENT.sequence(g(rows, c.gates * H), args)
    (y.sum() + h.sum()).backward()
torch.cuda.synchronize()
print("sanitized run done")
"""


def sanitizer(report: Report):
    """compute-sanitizer's racecheck (shared-memory hazards), memcheck (out-of-bounds and
    misaligned accesses) and synccheck (barrier misuse) over one persistent LSTM and GRU
    forward and backward (hidden 96 over several blocks, a packed batch, the GRU reversed)."""
    out = {}
    for tool in ("racecheck", "memcheck", "synccheck"):
        cmd = ["compute-sanitizer", f"--tool={tool}", "--kernel-name", "kns=persistent",
               sys.executable, "-c", SANITIZED]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
            text = proc.stdout + proc.stderr
            summary = [l for l in text.splitlines() if "ERROR SUMMARY" in l or "RACECHECK" in l]
            out[tool] = {"exit": proc.returncode, "summary": summary[-3:], "tail": text[-1500:]}
        except Exception as exc:  # not installed, timed out: say so
            out[tool] = {"error": repr(exc)}
        report.md += [f"- `{tool}`: {out[tool].get('summary', out[tool].get('error'))} "
                      f"(exit {out[tool].get('exit')})"]
        report.log(f"  {tool}: {out[tool].get('summary', out[tool].get('error'))}")
    report.md.append("")
    return out


PARTS = {"machine": ("Machine", machine), "build": ("Build", build), "tests": ("Tests", tests),
         "warmup": ("GEMM warm-up", warm_up), "flashrnn": ("FlashRNN setting", bench_flashrnn),
         "seed": ("Seed shapes", bench_seed_shapes),
         "latency": ("Per-step latency", bench_step_latency),
         "sanitizer": ("compute-sanitizer", sanitizer)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--budget", type=float, default=360.0,
                        help="seconds; parts left after it are reported as skipped")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"which parts, in order (default all: {','.join(PARTS)})")
    parser.add_argument("--tests-k", default="", help="pytest -k expression for the tests part")
    args = parser.parse_args(argv)
    report = Report(args.out, args.budget)
    report.tests_k = args.tests_k
    report.data["threads_per_block"] = os.environ.get("FUSEDRNN_CUDA_THREADS", "256")
    if not torch.cuda.is_available():
        report.log("no CUDA device: nothing to check here")
        report.md += ["No CUDA device on this machine (torch.cuda.is_available() is False): "
                      "nothing was built, tested or timed.", ""]
        report.data["status"] = "no CUDA device"
        report.write()
        return 0
    for part in args.parts.split(","):
        report.section(*PARTS[part])
        report.write()  # after each part: a killed run still leaves what it had
    return 0


if __name__ == "__main__":
    sys.exit(main())
