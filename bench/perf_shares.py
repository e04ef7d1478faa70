"""Where the time goes, by kind of work: `perf` samples of one layer config, bucketed.

    OMP_WAIT_POLICY=PASSIVE python bench/perf_shares.py LSTM copy fwdbwd [cpu|nn] [threads] [secs]

A child process runs the layer in a loop (bench/shapes.py's run_layer); once it is warm,
`perf record` samples it (all threads) for the given seconds, so the import is not counted. The
samples are bucketed by symbol: GEMM compute (MKL/oneDNN kernels), GEMM packing (MKL copying
operands into its panel layout), the fused passes (fusedrnn's sequence loops with the inlined
cell math), memory copies, ATen elementwise ops, the kernel's page faults and memory
bookkeeping, OpenMP and scheduling, Python and dispatch, and the rest. torch.nn's oneDNN RNN
runs JIT code, which perf cannot name: it lands in "JIT (oneDNN)". Needs `perf` and
perf_event_paranoid <= 2.
"""
import collections
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# First match wins; matched against "dso symbol".
BUCKETS = [
    ("fused passes", r"_C\.cpython.*(Kernel<|pointwise)"),
    ("GEMM packing", r"gemm_\w*copy|_pack|oncopy|itcopy"),
    ("GEMM compute", r"gemm|mkl_blas|dnnl|brgemm|libmkl"),
    ("JIT (oneDNN)", r"\[unknown\]|\[JIT\]|perf-\d+\.map"),
    ("memory copy / fill", r"memcpy|memmove|memset"),
    ("ATen elementwise / reductions", r"at::native|at::vec"),
    ("kernel: page faults, memory", r"\[kernel.*(fault|page|mem|map|vma|lru|folio|cgroup|list_)"),
    ("OpenMP / scheduling", r"libgomp|libiomp|\[kernel"),
    ("Python / dispatch",
     r"python3|libpython|libtorch_python|_Py|Py[A-Z]|c10::|torch::autograd|at::_ops"),
]


def loop(kind, shape, mode, impl, threads):
    import torch

    sys.path.insert(0, os.path.dirname(HERE))
    import fusedrnn

    sys.path.insert(0, HERE)
    from shapes import SEED_SHAPES, run_layer

    torch.set_num_threads(threads)
    T, B, I, H, L = SEED_SHAPES[shape]
    torch.manual_seed(0)
    m = getattr(torch.nn, kind)(I, H, L)
    if impl != "nn":
        m = fusedrnn.convert(m, backend=impl)
    x = torch.randn(T, B, I)
    for _ in range(3):
        run_layer(m, x, mode)
    print("ready", flush=True)
    while True:
        run_layer(m, x, mode)


def main(kind="LSTM", shape="copy", mode="fwdbwd", impl="cpu", threads="2", seconds="6"):
    child = subprocess.Popen([sys.executable, __file__, "--loop", kind, shape, mode, impl, threads],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        with tempfile.TemporaryDirectory() as tmp:
            data = os.path.join(tmp, "perf.data")
            subprocess.run(["perf", "record", "-q", "-F", "1999", "-o", data, "-p", str(child.pid),
                            "--", "sleep", seconds], check=True, stderr=subprocess.DEVNULL)
            report = subprocess.run(["perf", "report", "-i", data, "--stdio", "--sort", "dso,sym",
                                     "--percent-limit", "0"], capture_output=True, text=True,
                                    check=True).stdout
    finally:
        child.kill()
    shares = collections.Counter()
    top = []
    for line in report.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(.*?)\s+\[[.kHgu]\]\s+(.*)", line)
        if not m:
            continue
        pct, dso, sym = float(m.group(1)), m.group(2), m.group(3).strip()
        bucket = next((name for name, pat in BUCKETS if re.search(pat, f"{dso} {sym}")), "other")
        shares[bucket] += pct
        if len(top) < 12:
            top.append(f"  {pct:5.1f}%  {bucket:20s} {dso}: {sym[:90]}")
    print(f"{kind} {shape} {mode} {impl}, {threads} threads, {seconds} s of samples "
          f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})")
    for name, pct in shares.most_common():
        print(f"  {name:20s} {pct:5.1f}%")
    print("hottest symbols:")
    print("\n".join(top))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--loop"]:
        loop(*sys.argv[2:6], int(sys.argv[6]))
    else:
        main(*sys.argv[1:])
