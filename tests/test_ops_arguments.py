"""Every ``torch.ops.fusedrnn`` op, called directly with each argument wrong in turn, raises a
RuntimeError and does not touch memory it does not own.

The ops are public through ``torch.ops``, so they check their own arguments in C++; before
they did, a short ``grad_cn`` wrote past its buffer. ``tests/run_under_asan.sh`` runs this
file against an AddressSanitizer build of the extension, where an out-of-bounds access aborts
the process instead of passing silently.
"""
import pytest
import torch

from fusedrnn.backend.cpu import BACKEND
from fusedrnn.cells import CELLS

pytestmark = pytest.mark.skipif(BACKEND.unavailable_reason() is not None,
                                reason=f"cpu backend: {BACKEND.unavailable_reason()}")
ops = torch.ops.fusedrnn if BACKEND.unavailable_reason() is None else None

STEPS = torch.tensor([3, 2, 2])  # 7 rows, batch 3
ROWS, B, I, H, P = 7, 3, 5, 4, 2


def forward_args(cell, proj=False, dtype=torch.float64):
    g = CELLS[cell].gates
    out = P if proj else H
    t = lambda *shape: torch.randn(*shape, dtype=dtype)  # noqa: E731
    return dict(cell=cell, xp=t(ROWS, g * H), batch_sizes=STEPS.clone(), h0=t(B, out),
                c0=t(B, H) if cell == "lstm" else None, w_hh=t(g * H, out), b_ih=t(g * H),
                b_hh=t(g * H), w_hr=t(out, H) if proj else None, reverse=False, train=True)


def backward_args(cell, proj=False, dtype=torch.float64):
    f = forward_args(cell, proj, dtype)
    y, h_n, c_n, *saved = ops.sequence_forward(*f.values())
    return dict(cell=cell, batch_sizes=f["batch_sizes"], w_hh=f["w_hh"], w_hr=f["w_hr"],
                reverse=False, saved=saved, grad_y=torch.randn_like(y),
                grad_hn=torch.randn_like(h_n),
                grad_cn=torch.randn_like(c_n) if cell == "lstm" else None)


def _variants(t):
    """Ways a tensor argument can be wrong: each is (name, replacement). (A meta tensor is not
    among them: it routes the call to the shape-only kernel, as for any op.)"""
    out = [("short", t[:-1] if t.dim() and t.shape[0] > 0 else t.new_empty(1)),
           ("long", torch.cat([t, t[:1]]) if t.dim() and t.shape[0] > 0 else t.new_empty(2)),
           ("float32" if t.dtype == torch.float64 else "float64",
            t.to(torch.float32 if t.dtype == torch.float64 else torch.float64)),
           ("3d", t.unsqueeze(0))]
    if t.dim() != 1:
        out.append(("flat", t.reshape(-1)))
    if t.dim() == 2 and t.shape[1] > 1:
        out += [("narrow", t[:, :-1]), ("wide", torch.cat([t, t[:, :1]], 1))]
        if t.numel():  # (an empty tensor is contiguous whatever its strides)
            out.append(("noncontiguous", torch.cat([t, t], 1)[:, ::2]))
    if t.dim() == 2 and t.shape[0] > 1 and t.shape[1] > 1:
        out.append(("transposed", t.t().contiguous().t()) if t.shape[0] == t.shape[1]
                   else ("strided", t.t().contiguous().t()))
    return out


def _bad_calls(args):
    """(what, args) for every tensor argument (and every saved tensor) made wrong in turn."""
    for key, value in args.items():
        if key == "saved":
            for i, s in enumerate(value):
                for name, bad in _variants(s):
                    yield f"saved[{i}] {name}", dict(args, saved=[*value[:i], bad, *value[i + 1:]])
            yield "saved (3 tensors)", dict(args, saved=value[:3])
        elif isinstance(value, torch.Tensor):
            for name, bad in _variants(value):
                if key == "batch_sizes" and name in ("float32", "float64", "noncontiguous"):
                    continue  # int64 counts: dtype variants below
                yield f"{key} {name}", dict(args, **{key: bad})
    if "batch_sizes" in args:
        for name, bs in [("increasing", torch.tensor([2, 3, 2])), ("sum short", torch.tensor([3, 2, 1])),
                         ("sum long", torch.tensor([3, 3, 2])), ("negative", torch.tensor([3, 5, -1])),
                         ("int32", STEPS.int()), ("float", STEPS.double()), ("empty", STEPS[:0]),
                         ("huge", torch.tensor([2**62, 2**62]))]:
            yield f"batch_sizes {name}", dict(args, batch_sizes=bs)
    yield "unknown cell", dict(args, cell="lstm2")


CASES = [(cell, proj) for cell in CELLS for proj in ([False, True] if cell == "lstm" else [False])]


@pytest.mark.parametrize("cell,proj", CASES, ids=[f"{c}{'-proj' if p else ''}" for c, p in CASES])
def test_sequence_forward_rejects_each_bad_argument(cell, proj):
    args = forward_args(cell, proj)
    ops.sequence_forward(*args.values())  # the unchanged call works
    bad = list(_bad_calls(args))
    if cell != "lstm":
        bad.append(("c0 given", dict(args, c0=torch.randn(B, H, dtype=torch.float64))))
        bad.append(("w_hr given", dict(args, w_hr=torch.randn(H, H, dtype=torch.float64))))
    for what, call in bad:
        with pytest.raises(RuntimeError):
            ops.sequence_forward(*call.values())
            pytest.fail(f"accepted {what}")


@pytest.mark.parametrize("cell,proj", CASES, ids=[f"{c}{'-proj' if p else ''}" for c, p in CASES])
def test_sequence_backward_rejects_each_bad_argument(cell, proj):
    args = backward_args(cell, proj)
    ops.sequence_backward(*args.values())
    bad = list(_bad_calls(args))
    if cell != "lstm":
        bad.append(("grad_cn given", dict(args, grad_cn=torch.randn(B, H, dtype=torch.float64))))
    else:
        bad.append(("grad_cn missing", dict(args, grad_cn=None)))
    for what, call in bad:
        with pytest.raises(RuntimeError):
            ops.sequence_backward(*call.values())
            pytest.fail(f"accepted {what}")


def test_inference_saves_cannot_feed_the_backward():
    """A forward run with train=False saves nothing; its empty saves must be refused."""
    f = forward_args("gru")
    f["train"] = False
    y, h_n, _, *saved = ops.sequence_forward(*f.values())
    with pytest.raises(RuntimeError, match="saved"):
        ops.sequence_backward("gru", f["batch_sizes"], f["w_hh"], None, False, saved,
                              torch.randn_like(y), torch.randn_like(h_n), None)


@pytest.mark.parametrize("op", ["mm_rows", "mm_tn"])
def test_gemm_ops_reject_bad_arguments(op):
    a = torch.randn(6, 4, dtype=torch.float64)
    b = torch.randn(4, 3, dtype=torch.float64) if op == "mm_rows" else torch.randn(6, 3, dtype=torch.float64)
    getattr(ops, op)(a, b)
    mismatch = (a[:, :-1], b) if op == "mm_rows" else (a[:-1], b)
    for bad_a, bad_b in [mismatch, (a, b[:-1]), (a.reshape(-1), b), (a, b.unsqueeze(0)),
                         (a.float(), b), (a.long(), b.long()), (a.half(), b.half())]:
        with pytest.raises(RuntimeError):
            getattr(ops, op)(bad_a, bad_b)


def stack_args(cell, layers=2, bidirectional=True):
    """stack_forward's arguments for a stack of `layers` layers of H units on I inputs."""
    g, D = CELLS[cell].gates, 2 if bidirectional else 1
    t = lambda *shape: torch.randn(*shape, dtype=torch.float64)  # noqa: E731
    weights = []
    for layer in range(layers):
        for _ in range(D):
            weights += [t(g * H, I if layer == 0 else D * H), t(g * H, H), t(g * H), t(g * H),
                        None]
    count = layers * D
    return dict(cell=cell, x=t(ROWS, I), batch_sizes=STEPS.clone(),
                h0=[t(B, H) for _ in range(count)],
                c0=[t(B, H) if cell == "lstm" else None for _ in range(count)],
                weights=weights, bidirectional=bidirectional, train=False, masks=[])


@pytest.mark.parametrize("op,train", [("stack_forward", False), ("stack_forward", True),
                                      ("stack_train", None)])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_stack_forward_rejects_bad_arguments(cell, op, train):
    """The stack ops check their lists; each layer's tensors are then checked by the ops they
    run (mm_rows, sequence_forward), as above. stack_train (stack_forward with its autograd
    node) gets inputs that require grad, so that its autograd kernel runs."""
    args = dict(stack_args(cell), train=train)
    if op == "stack_train":
        del args["train"]
        args["x"].requires_grad_()
    run = getattr(ops, op)
    run(*args.values())
    t = lambda *shape: torch.randn(*shape, dtype=torch.float64)  # noqa: E731
    w = args["weights"]
    bad = [("one h0 too few", dict(args, h0=args["h0"][:-1], c0=args["c0"][:-1])),
           ("odd count for two directions", dict(args, h0=args["h0"][:3], c0=args["c0"][:3],
                                                 weights=w[:15])),
           ("a c0 too few", dict(args, c0=args["c0"][:-1])),
           ("a weight too few", dict(args, weights=w[:-1])),
           ("no w_ih", dict(args, weights=[None] + w[1:])),
           ("layer 2's w_ih sized for the input", dict(args, weights=w[:10] + [w[0]] + w[11:])),
           ("a short w_hh", dict(args, weights=w[:1] + [w[1][:-1]] + w[2:])),
           ("a float32 h0", dict(args, h0=[args["h0"][0].float()] + args["h0"][1:])),
           ("no state", dict(args, h0=[], c0=[], weights=[])),
           ("a mask per layer", dict(args, masks=[t(ROWS, 2 * H)] * 2)),
           ("a mask of other rows", dict(args, masks=[t(ROWS - 1, 2 * H)])),
           ("a float32 mask", dict(args, masks=[t(ROWS, 2 * H).float()])),
           ("a 1-D mask", dict(args, masks=[t(ROWS * 2 * H)]))]
    run(*dict(args, masks=[t(ROWS, 2 * H)]).values())
    for what, call in bad:
        with pytest.raises(RuntimeError):
            run(*call.values())
            pytest.fail(f"accepted {what}")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_stack_backward_rejects_bad_arguments(cell):
    """stack_backward checks its lists and grad_hn; each layer's saved tensors and gradients
    are then checked by sequence_backward and the GEMM ops, as above."""
    args = dict(stack_args(cell), train=True)
    y, h_n, c_n, *saved = ops.stack_forward(*args.values())
    has_c = cell == "lstm"
    good = dict(cell=cell, batch_sizes=args["batch_sizes"], x=args["x"], weights=args["weights"],
                bidirectional=True, saved=saved, grad_y=torch.randn_like(y),
                grad_hn=torch.randn_like(h_n), grad_cn=torch.randn_like(c_n) if has_c else None,
                need_dx=True, masks=[torch.rand(ROWS, 2 * H, dtype=torch.float64)])
    dx, dh0, dc0, *dweights = ops.stack_backward(*good.values())
    assert dx.shape == args["x"].shape and dh0.shape == h_n.shape and len(dweights) == 20
    w = args["weights"]
    bad = [("a saved tensor too few", dict(good, saved=saved[:-1])),
           ("saved tensors swapped", dict(good, saved=saved[1:2] + saved[:1] + saved[2:])),
           ("a weight too few", dict(good, weights=w[:-1])),
           ("no w_hh", dict(good, weights=w[:1] + [None] + w[2:])),
           ("odd count for two directions", dict(good, weights=w[:15])),
           ("grad_y one row short", dict(good, grad_y=good["grad_y"][:-1])),
           ("grad_y 1-D", dict(good, grad_y=good["grad_y"].reshape(-1))),
           ("grad_hn of one layer", dict(good, grad_hn=good["grad_hn"][:2])),
           ("grad_hn 2-D", dict(good, grad_hn=good["grad_hn"][0])),
           ("float32 grad_y", dict(good, grad_y=good["grad_y"].float())),
           ("x of other rows", dict(good, x=args["x"][:-1])),
           ("grad_cn " + ("of one layer" if has_c else "for a cell without c"),
            dict(good, grad_cn=torch.randn(2 if has_c else 4, B, H, dtype=torch.float64))),
           ("an unknown cell", dict(good, cell="nope")),
           ("two masks for two layers", dict(good, masks=good["masks"] * 2)),
           ("a mask of other rows", dict(good, masks=[good["masks"][0][:-1]])),
           ("a float32 mask", dict(good, masks=[good["masks"][0].float()]))]
    for what, call in bad:
        with pytest.raises(RuntimeError):
            ops.stack_backward(*call.values())
            pytest.fail(f"accepted {what}")
