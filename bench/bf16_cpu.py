"""bfloat16 on the CPU: fusedrnn's `cpu` backend on a bf16 module against torch.nn's bf16 layers
(oneDNN) and against fusedrnn in float32, on the seed shapes; writes bench/RESULTS_CPU_bf16.md.

    python bench/bf16_cpu.py [KINDS [SHAPES]]     e.g. python bench/bf16_cpu.py LSTM copy,ptb

Times are the best of 7 rounds of two calls, the three implementations interleaved in each
round (2 threads). Ratios > 1: the bf16 fusedrnn module is faster.
"""
import os
import sys
import time

import torch

import fusedrnn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shapes import KINDS, SEED_SHAPES, run_layer  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS_CPU_bf16.md")


def main(kinds, shapes):
    torch.set_num_threads(2)
    info = fusedrnn.cpu_info()
    rows = []
    for kind in kinds:
        for name in shapes:
            T, B, I, H, L = SEED_SHAPES[name]
            layer = KINDS[kind][0]
            models = {"nn_bf16": layer(I, H, L).bfloat16(),
                      "fused_bf16": fusedrnn.convert(layer(I, H, L)).bfloat16(),
                      "fused_fp32": fusedrnn.convert(layer(I, H, L))}
            x = torch.randn(T, B, I)
            inputs = {"nn_bf16": x.bfloat16(), "fused_bf16": x.bfloat16(), "fused_fp32": x}
            for mode in ("fwd", "fwdbwd"):
                best = dict.fromkeys(models, float("inf"))
                for key in models:  # warm: route probes, buffers, oneDNN's JIT
                    run_layer(models[key], inputs[key], mode)
                for _ in range(7):
                    for key, model in models.items():
                        start = time.perf_counter()
                        run_layer(model, inputs[key], mode)
                        run_layer(model, inputs[key], mode)
                        best[key] = min(best[key], (time.perf_counter() - start) / 2)
                rows.append((kind, name, mode, best))
                print(kind, name, mode, {k: f"{v * 1e3:.2f} ms" for k, v in best.items()},
                      flush=True)
    lines = ["# bfloat16 on the CPU: fusedrnn `cpu` vs torch.nn (2 threads)", "",
             f"Command: `python bench/bf16_cpu.py {' '.join(sys.argv[1:])}`. Machine: "
             f"{info['cpu']} (ISA: {info['isa']}), torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average before "
             f"{os.getloadavg()[0]:.2f}. bf16 step GEMMs: "
             f"{torch.ops.fusedrnn.bf16_route_reason() or 'oneDNN brgemm on bf16 operands'}.",
             "", "| cell | shape | mode | torch.nn bf16 ms | fused bf16 ms | fused fp32 ms | "
             "torch.nn bf16 / fused bf16 | fused fp32 / fused bf16 |", "|---|---|---|---|---|---|---|---|"]
    for kind, name, mode, b in rows:
        lines.append(f"| {kind} | {name} | {mode} | {b['nn_bf16'] * 1e3:.2f} | "
                     f"{b['fused_bf16'] * 1e3:.2f} | {b['fused_fp32'] * 1e3:.2f} | "
                     f"{b['nn_bf16'] / b['fused_bf16']:.2f} | "
                     f"{b['fused_fp32'] / b['fused_bf16']:.2f} |")
    with open(OUT, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("written to", OUT)


if __name__ == "__main__":
    main(sys.argv[1].split(",") if len(sys.argv) > 1 else ["LSTM", "GRU", "RNN"],
         sys.argv[2].split(",") if len(sys.argv) > 2 else list(SEED_SHAPES))
