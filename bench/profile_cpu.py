"""Where the time goes: torch.profiler table (grouped by op and input shape) for one layer config.

    OMP_WAIT_POLICY=PASSIVE python bench/profile_cpu.py LSTM adder200 fwdbwd [cpu|nn] [threads]

Shapes and kinds are bench/test_bench_cpu.py's. GEMMs show up as aten::mm / fusedrnn::mm_*;
the fused pointwise passes are the self time of fusedrnn::sequence_forward/backward.
"""
import os
import sys

import torch
from torch.profiler import profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fusedrnn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shapes import KINDS, SEED_SHAPES as SHAPES, run_layer  # noqa: E402


def main(kind="LSTM", shape="adder200", mode="fwdbwd", impl="cpu", threads="2"):
    torch.set_num_threads(int(threads))
    T, B, I, H, L = SHAPES[shape]
    torch.manual_seed(0)
    m = KINDS[kind][0](I, H, L)
    if impl != "nn":
        m = fusedrnn.convert(m, backend=impl)
    x = torch.randn(T, B, I)

    def step():
        run_layer(m, x, mode)

    for _ in range(3):
        step()
    with profile(record_shapes=True) as prof:
        for _ in range(5):
            step()
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total",
                                                            row_limit=15, max_name_column_width=40,
                                                            max_shapes_column_width=60))


if __name__ == "__main__":
    main(*sys.argv[1:])
