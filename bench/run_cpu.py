"""One command for the CPU speed table: runs bench/test_bench_cpu.py, writes bench/RESULTS_CPU.md.

    python bench/run_cpu.py [extra pytest args, e.g. -k LSTM]

With pytest arguments (a subset) it writes bench/RESULTS_CPU_subset.md instead, so the
committed full table is only ever replaced by a full run.

Ratios are torch.nn's time over the other implementation's time, both minimum over rounds of
the same run (the minimum is the least disturbed by other processes on a shared machine).
"""
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
JSON = os.path.join(HERE, "cpu.json")
THREADS = os.environ.get("FUSEDRNN_BENCH_THREADS", "2")


def output_path(args, wait_policy):
    """RESULTS_CPU.md is the full suite at 2 threads with passive OpenMP waiting; other thread
    counts, wait policies (``OMP_WAIT_POLICY=`` empty: libgomp's default, spinning a while
    before sleeping, what a user gets) and any run given pytest arguments (a subset,
    ``-k LSTM``) write their own file, never over the full table."""
    name = "RESULTS_CPU" + ("" if THREADS == "2" else f"_{THREADS}thread")
    if wait_policy != "PASSIVE":
        name += f"_omp-{wait_policy.lower() or 'default'}"
    if args:
        name += "_subset"
    return os.path.join(HERE, name + ".md")


def main(args):
    cmd = [sys.executable, "-m", "pytest", "-q", os.path.join(HERE, "test_bench_cpu.py"),
           f"--benchmark-json={JSON}", "--benchmark-disable-gc", *args]
    # Spinning OpenMP workers wreck every 2-thread run once another process holds a core (seen:
    # nn.LSTM 10x slower, fusedrnn 1.4x); passive waiting keeps the comparison about the kernels
    # on a shared machine. It also slows oneDNN's per-step parallel regions more than the cpu
    # backend's one region per layer: on a quiet machine run `OMP_WAIT_POLICY= python
    # bench/run_cpu.py` too (libgomp's default, what users get; its own results file).
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    load_before = os.getloadavg()[0]
    start = time.time()
    subprocess.run(cmd, check=True, env=env)
    wall = time.time() - start
    with open(JSON) as f:
        data = json.load(f)
    prefix = [] if THREADS == "2" else [f"FUSEDRNN_BENCH_THREADS={THREADS}"]
    if env["OMP_WAIT_POLICY"] != "PASSIVE":
        prefix.append(f"OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}")
    render(data, wall, " ".join([*prefix, "python bench/run_cpu.py", *args]),
           env["OMP_WAIT_POLICY"], load_before, output_path(args, env["OMP_WAIT_POLICY"]))


def cpu_model_and_flags():
    """The CPU's model name, its vector and matrix ISA flags and how the float32 pointwise pass
    runs, as fusedrnn.cpu_info() says."""
    from fusedrnn import cpu_info
    info = cpu_info()
    return info["cpu"], info["isa"], info.get("pointwise", "unknown")


def render(data, wall, command, wait_policy, load_before, out_path):
    best = {}
    peak, routes = None, []
    for b in data["benchmarks"]:
        info = b["extra_info"]
        if info["impl"] == "gemm":
            peak = info["flops"] / b["stats"]["min"] / 1e9
            routes = info.get("routes", [])
            continue
        best[(info["kind"], info["shape"], info["mode"], info["impl"])] = (b["stats"]["min"],
                                                                           info["flops"])
    threads = data["benchmarks"][0]["extra_info"]["threads"]
    model, flags, pointwise = cpu_model_and_flags()
    import torch
    lines = [f"# CPU speed: fusedrnn `cpu` vs torch.nn ({threads} threads, float32)", "",
             f"Command: `{command}` (wall {wall:.0f} s). Machine: {model}, "
             f"{os.cpu_count()} CPUs (vector and matrix ISA: {flags}), "
             f"torch {torch.__version__}, {data['datetime']}; "
             f"load average before the run {load_before:.2f} (2 cores: anything near 1 or more "
             "means other jobs shared the machine and absolute times are noisy): read the "
             "ratios (min over rounds of one run; a round is one call, or a ~10 ms loop of calls "
             "for a layer faster than that). "
             f"OMP_WAIT_POLICY={wait_policy or '(unset: libgomp default)'}. Forward GEMM route: "
             f"FUSEDRNN_CPU_GEMM={os.environ.get('FUSEDRNN_CPU_GEMM') or 'auto'} "
             "(auto: measured per layer shape at first use). float32 pointwise pass: "
             f"{pointwise} (FUSEDRNN_CPU_AVX512={os.environ.get('FUSEDRNN_CPU_AVX512') or 'unset'}).",
             "",
             f"Measured GEMM peak (torch.mm 1024^3, MKL): **{peak:.0f} GFLOP/s**." if peak else "", "",
             "Ratio = torch.nn time / implementation time (>1: faster than torch.nn). "
             "Packed columns: packed input with lengths spread over 50-100 % of T, against the padded "
             "torch.nn time. GFLOP/s: GEMM flops of the layers (fwd+bwd counted 3x) over the "
             "fusedrnn cpu time (padded). Ceiling x: the ratio a kernel would reach if all its "
             "GEMMs ran at the measured peak and nothing else took any time (torch.nn time over "
             "flops / peak); a target above it cannot be met with this BLAS at that peak.", ""]
    shapes = []
    for (kind, shape, mode, impl) in best:
        if (kind, shape) not in shapes:
            shapes.append((kind, shape))
    for mode in ("fwd", "fwdbwd"):
        lines += [f"## {'forward only (no_grad)' if mode == 'fwd' else 'forward + backward'}", "",
                  "| cell | shape | torch.nn ms | cpu ms | cpu x | Cell-loop x | reference x "
                  "| cpu packed x | nn packed x | cpu GFLOP/s | ceiling x |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for kind, shape in shapes:
            get = lambda impl: best.get((kind, shape, mode, impl))  # noqa: E731
            nn_t = get("nn")
            if nn_t is None:
                continue
            cells = [kind, shape, f"{nn_t[0] * 1e3:.2f}"]
            cpu = get("cpu")
            cells.append(f"{cpu[0] * 1e3:.2f}" if cpu else "-")
            for impl in ("cpu", "cell_loop", "reference", "cpu_packed", "nn_packed"):
                r = get(impl)
                cells.append(f"{nn_t[0] / r[0]:.2f}" if r else "-")
            cells.append(f"{cpu[1] / cpu[0] / 1e9:.0f}" if cpu else "-")
            cells.append(f"{nn_t[0] / (cpu[1] / (peak * 1e9)):.2f}" if cpu and peak else "-")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if routes:
        lines += ["## Forward GEMM routes the cpu backend chose (measured at first use)", "",
                  *[f"- {r}" for r in routes], ""]
    text = "\n".join(lines)
    with open(out_path, "w") as f:
        f.write(text)
    print(text)
    print(f"written to {os.path.relpath(out_path)}")


if __name__ == "__main__":
    main(sys.argv[1:])
