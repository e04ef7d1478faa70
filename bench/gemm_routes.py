"""Which ATen GEMM route is fastest for the CPU backend's shapes (issue 3: measure, keep the best).

    OMP_WAIT_POLICY=PASSIVE python bench/gemm_routes.py

Compares torch.mm (MKL), torch.ops.mkldnn._linear_pointwise (oneDNN) and MKL's packed-weight
linear (torch.ops.mkl._mkl_linear) on the per-step and whole-sequence GEMM shapes of the
benchmark, float32, 2 threads, and the two operand orders for a weight gradient a^T b over all rows
(a = d(gates) [rows, G*H], b = the layer input or h_prev [rows, N]). Prints GFLOP/s per route.
"""
import time

import torch

torch.set_num_threads(2)

# (rows, G*H, N) of each seed shape's weight gradients: dW_hh (N = H) and dW_ih (N = I)
WEIGHT_GRAD_SHAPES = [(2560, 2000, 500), (2560, 2000, 100), (25600, 256, 64), (1408, 256, 64),
                      (3584, 512, 128), (3584, 512, 28), (500, 800, 200)]

# (M, K, N): rows x input width x output width
SHAPES = [(128, 64, 256), (64, 64, 256), (128, 500, 2000), (1, 100, 400), (128, 128, 512),
          (20, 200, 800), (25600, 64, 256), (2560, 100, 2000), (1024, 1024, 1024)]


def seconds(fn, reps=100):
    for _ in range(10):
        fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def main():
    for m, k, n in SHAPES:
        a, w, out = torch.randn(m, k), torch.randn(n, k), torch.empty(m, n)
        flops = 2 * m * k * n
        routes = {"torch.mm (MKL)": lambda: torch.mm(a, w.t(), out=out),
                  "mkldnn._linear_pointwise (oneDNN)":
                      lambda: torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "")}
        packed = torch.ops.mkl._mkl_reorder_linear_weight(w, m)
        routes["mkl packed weight"] = lambda: torch.ops.mkl._mkl_linear(a, packed, w, None, m)
        reps = max(3, min(200, int(2e9 / flops)))
        cells = [f"{name} {flops / seconds(fn, reps) / 1e9:.0f}" for name, fn in routes.items()]
        print(f"M={m} K={k} N={n}: " + " | ".join(cells) + " GFLOP/s", flush=True)
    for rows, gh, n in WEIGHT_GRAD_SHAPES:
        a, b = torch.randn(rows, gh), torch.randn(rows, n)
        flops = 2 * rows * gh * n
        routes = {"a^T b": lambda: a.t() @ b, "(b^T a)^T": lambda: (b.t() @ a).t().contiguous()}
        reps = max(3, min(200, int(2e9 / flops)))
        cells = [f"{name} {flops / seconds(fn, reps) / 1e9:.0f}" for name, fn in routes.items()]
        print(f"weight gradient [{gh},{rows}]x[{rows},{n}]: " + " | ".join(cells) + " GFLOP/s",
              flush=True)


if __name__ == "__main__":
    main()
