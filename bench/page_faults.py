"""Minor page faults per layer call, torch.nn against fusedrnn ``cpu``, on the seed shapes.

    python bench/page_faults.py [threads]

A count, not a time, so it is stable on a shared machine. Fresh buffers of several MiB are
mmapped by glibc and fault in page by page on every call; csrc/cpu/buffer_cache.h keeps ours.
"""
import os
import resource
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fusedrnn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shapes import KINDS, SEED_SHAPES, run_layer  # noqa: E402


def faults_per_call(fn, calls=5):
    for _ in range(2):
        fn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def main(threads="2"):
    torch.set_num_threads(int(threads))
    print("| cell | shape | torch.nn fwd | cpu fwd | torch.nn fwd+bwd | cpu fwd+bwd |")
    print("|---|---|---|---|---|---|")
    for kind, (layer_cls, _, _) in KINDS.items():
        for shape, (T, B, I, H, L) in SEED_SHAPES.items():
            torch.manual_seed(0)
            x = torch.randn(T, B, I)
            row = []
            for mode in ("fwd", "fwdbwd"):
                for impl in ("nn", "cpu"):
                    m = layer_cls(I, H, L)
                    if impl == "cpu":
                        m = fusedrnn.convert(m, backend="cpu")
                    row.append(f"{faults_per_call(lambda: run_layer(m, x, mode)):.0f}")
            print(f"| {kind} | {shape} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main(*sys.argv[1:])
