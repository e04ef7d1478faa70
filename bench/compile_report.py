"""Compile the Triton kernels for real GPUs without one, and report their resource use.

``python bench/compile_report.py`` compiles each (kernel, arch, cell, dtype, hidden) it is
given (or a default table) with ``triton.compile`` for ``GPUTarget("cuda",
arch, 32)`` and prints one JSON line each: shared memory from Triton's metadata, and REG /
STACK / LOCAL from ``cuobjdump --dump-resource-usage`` of the cubin (Triton's wheel ships
cuobjdump). Run it without TRITON_INTERPRET (the interpreter replaces the compiler). A
compiler crash aborts the process, so callers run it in a subprocess.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

# per-block shared memory limits (bytes) of the targets: sm_80 163 KB, sm_90 227 KB
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

# (kernel, arch, cell, dtype, hidden, num_warps): the largest persistent tiles the on-chip
# budget admits per cell, and the per-step kernels
# (num_warps: 8, except 16 for the fp32 RNN on sm_80, where 8 spills 40 bytes; on a GPU the
# autotuner picks among 4, 8 and 16)
DEFAULT_CONFIGS = [
    (kernel, arch, cell, dtype, hidden, 16 if (arch, cell) == (80, "rnn_tanh") else 8)
    for arch in (80, 90)
    for kernel in ("sequence_fwd", "sequence_bwd")
    for cell, dtype, hidden in (("lstm", "fp32", 64), ("lstm", "bf16", 64),
                                ("gru", "fp16", 128), ("rnn_tanh", "fp32", 128))
] + [
    (kernel, arch, cell, dtype, 256, 4)
    for arch in (80, 90) for kernel in ("step_fwd", "step_bwd")
    for cell, dtype in (("lstm", "fp16"), ("gru", "fp32"))
]


def compile_kernel(kernel, arch, cell, dtype, hidden, num_warps, overrides=None):
    """Resource use of one kernel; ``overrides`` replaces constexprs (e.g. REVERSE)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fusedrnn.cells import CELLS
    from fusedrnn.kernels import persistent, pointwise

    info = CELLS[cell]
    forward, backward = info.triton_math()
    fn = {"sequence_fwd": persistent.sequence_fwd_kernel,
          "sequence_bwd": persistent.sequence_bwd_kernel,
          "step_fwd": pointwise.step_fwd_kernel, "step_bwd": pointwise.step_bwd_kernel}[kernel]
    common = dict(G=info.gates, HAS_C=info.has_cell_state)
    if kernel.endswith("bwd"):
        common.update(BWD=backward, READS_H=info.reads_h, SPLIT_HG=info.split_hidden_grad)
    else:
        common.update(FWD=forward)
        if kernel == "step_fwd":
            common.update(READS_H=info.reads_h)
    if kernel.startswith("sequence"):
        hp = max(16, 1 << (hidden - 1).bit_length())
        constexprs = dict(common, REVERSE=False, BB=16, HP=hp,
                          DOT_DTYPE={"fp32": tl.float32, "fp16": tl.float16,
                                     "bf16": tl.bfloat16}[dtype],
                          FP32_PRECISION=persistent.fp32_precision(arch // 10))
        if kernel == "sequence_fwd":
            constexprs.update(HAS_BIAS=True, SAVE=True)
    else:
        constexprs = dict(common, BR=16, BH=min(64, 1 << (hidden - 1).bit_length()))
        constexprs.update(dict(WRITE_H=True, SAVE=True) if kernel == "step_fwd"
                          else dict(HAS_DY=True))
    constexprs.update(overrides or {})
    fp32_state = {"c_ptr", "c_save_ptr", "hg_save_ptr", "dc_ptr", "c_prev_ptr"}
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("sizes_ptr", "offsets_ptr"):
            signature[name] = "*i32"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in fp32_state or name == "dh_ptr" else f"*{dtype}"
        else:
            signature[name] = "i32"
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps))
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], check=True,
                               capture_output=True, text=True).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
    return dict(kernel=kernel, arch=arch, cell=cell, dtype=dtype, hidden=hidden,
                num_warps=num_warps, **(overrides or {}), shared=compiled.metadata.shared,
                **{k.lower(): int(v) for k, v in fields.items()})


def main(argv):
    configs = [json.loads(a) for a in argv] or DEFAULT_CONFIGS
    for config in configs:
        print(json.dumps(compile_kernel(*config)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
