"""The word-level language model on Penn Treebank (report 004): the loader, the batchifier,
the carried state, perplexity, dropout only off the recurrent path, DropConnect, tied weights,
fused == torch.nn, and an exact resume."""
import copy
import json
import math

import pytest
import torch
import torch.nn as nn

import fusedrnn
from tasks import harness, ptb
from tasks.data import text
from tasks.models import LanguageModel

from conftest import assert_close


# ---- data ----------------------------------------------------------------------------------

def test_the_ptb_loader_puts_eos_at_every_line_end(data_dir):
    if not (data_dir / "ptb").is_dir():
        pytest.skip("no PTB in the data directory")
    vocab, ids = text.ptb(data_dir)
    assert len(vocab) == 10000 and len(set(vocab)) == 10000
    eos = vocab.index("<eos>")
    for split, lines in (("train", 42068), ("valid", 3370), ("test", 3761)):
        assert int((ids[split] == eos).sum()) == lines and int(ids[split][-1]) == eos
    first = (data_dir / "ptb" / "ptb.valid.txt").read_text().splitlines()[0].split()
    assert [vocab[i] for i in ids["valid"][:len(first) + 1]] == first + ["<eos>"]
    assert {s: t.numel() for s, t in ids.items()} == {"train": 929589, "valid": 73760,
                                                     "test": 82430}


def test_twenty_streams_and_windows_that_continue_their_stream(rng):
    ids = torch.arange(rng.randrange(2000, 3000))  # each id is its position in the text
    reader = text.TextStreams(ids, 20, 25)
    assert reader.rows.shape == (ids.numel() // 20, 20)
    steps, previous = len(reader) // 20, None
    stream_len = ids.numel() // 20
    for step in range(steps):
        batch = reader.batch(reader.order("order", 1, torch.Generator())[step * 20:(step + 1) * 20],
                             "order", 1)
        for b in range(20):
            begin = b * stream_len + step * 25  # stream b is the b-th 20th of the text
            assert batch["x"][:, b].tolist() == list(range(begin, begin + 25))
            assert batch["y"][:, b].tolist() == list(range(begin + 1, begin + 26))
            if step:  # the next window starts where the last one's targets ended
                assert int(batch["x"][0, b]) == int(previous["y"][-1, b])
        previous = batch


# ---- perplexity ----------------------------------------------------------------------------

class _Fixed(nn.Module):
    """Over a vocabulary of 4 where each next word is the last plus 1 (mod 4): probability 1/2
    for it at even positions of the stream (its logit log 3 against three zeros), 1/4 at odd
    ones (uniform). The state is the stream position."""

    def forward(self, x, state=None):
        position = 0 if state is None else state
        logits = torch.zeros(*x.shape, 4, dtype=torch.float64)
        for i in range(x.shape[0]):
            if (position + i) % 2 == 0:
                logits[i, torch.arange(x.shape[1]), (x[i] + 1) % 4] = math.log(3.0)
        return logits, position + x.shape[0]


def test_perplexity_is_exp_of_the_mean_cross_entropy_on_a_hand_case():
    stream = torch.tensor([[0], [1], [2], [3], [0], [1], [2]])  # each next word is +1 mod 4
    got = ptb.perplexity(_Fixed(), stream, bptt=4)
    # six predictions, alternately p = 1/2 and p = 1/4: exp(-(3 ln 1/2 + 3 ln 1/4) / 6)
    assert got["perplexity"] == pytest.approx(math.sqrt(8), rel=1e-12)
    assert got["loss"] == pytest.approx(math.log(math.sqrt(8)), rel=1e-12)
    assert ptb.perplexity(_Fixed(), stream, bptt=2)["perplexity"] == pytest.approx(math.sqrt(8))
    # five predictions in windows of 4 and 1: p = 1/2, 1/4, 1/2, 1/4 | 1/2, so 2 ** (7 / 5)
    # (a mean of the windows' means would give 2 ** 1.25)
    assert ptb.perplexity(_Fixed(), stream[:6], bptt=4)["perplexity"] == pytest.approx(2 ** 1.4)


# ---- the model -----------------------------------------------------------------------------

def _cfg(**over):
    return {"cell": "lstm", "hidden": 12, "layers": 2, "embed": 12, "dropout": 0.4,
            "tie_weights": False, "locked_dropout": False, "weight_drop": 0.0, **over}


@pytest.mark.parametrize("over", [{}, {"locked_dropout": True}, {"cell": "gru", "weight_drop": 0.3}],
                         ids=["dropout", "locked", "gru-weight-drop"])
def test_eval_mode_fused_equals_torch_nn(over):
    model = LanguageModel(_cfg(**over), vocab=17).double().eval()
    fused = fusedrnn.convert(copy.deepcopy(model))
    assert isinstance(fused.rnns[0], (fusedrnn.LSTM, fusedrnn.GRU))
    tokens = torch.randint(0, 17, (9, 3))
    a, sa = model(tokens)
    b, sb = fused(tokens)
    torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
    a2, _ = model(tokens, sa)  # the carried state continues the stream
    b2, _ = fused(tokens, sb)
    torch.testing.assert_close(b2, a2, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("locked", [False, True])
def test_dropout_is_off_the_recurrent_path(locked):
    """In train mode each recurrent module, replayed in eval mode on the input and state it
    was given, returns exactly what it returned: no mask inside the recurrence. The inputs
    themselves were dropped."""
    cfg = _cfg(locked_dropout=locked, layers=2 if locked else 1)
    for fused in (False, True):
        model = LanguageModel(cfg, vocab=17).double().train()
        if fused:
            model = fusedrnn.convert(model)
        seen = []
        hooks = [rnn.register_forward_hook(lambda m, args, out: seen.append((m, args, out)))
                 for rnn in model.rnns]
        model(torch.randint(0, 17, (30, 4)))
        for hook in hooks:
            hook.remove()
        assert len(seen) == len(model.rnns)
        for rnn, (x, *state), (y, final) in seen:
            assert (x == 0).float().mean() > 0.2  # the input was dropped (p = 0.4)
            rnn.eval()
            y2, final2 = rnn(x, *state)
            torch.testing.assert_close(y2, y, rtol=0, atol=0)
            rnn.train()
        if locked:  # one mask per sequence: a dropped feature is zero at every step
            x = seen[1][1][0]
            zero = x == 0
            assert torch.equal(zero, zero[:1].expand_as(zero))


def test_drop_connect_masks_the_recurrent_weights_once_per_forward():
    model = LanguageModel(_cfg(weight_drop=0.5, dropout=0.0), vocab=17).double()
    fused = fusedrnn.convert(copy.deepcopy(model))
    tokens = torch.randint(0, 17, (8, 3))
    torch.manual_seed(5)
    a, _ = model(tokens)
    torch.manual_seed(5)
    b, _ = fused(tokens)
    torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)  # the same mask, the same output
    assert not torch.allclose(model(tokens)[0], a)  # a new mask each forward
    a.sum().backward()
    assert all(p.grad is not None for p in model.rnns[0].parameters())
    model.eval()
    plain = LanguageModel(_cfg(dropout=0.0), vocab=17).double().eval()
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(tokens)[0], plain(tokens)[0], rtol=0, atol=0)


def test_tied_weights_are_one_parameter_fused_too():
    model = LanguageModel(_cfg(tie_weights=True), vocab=17)
    fused = fusedrnn.convert(model)
    for m in (model, fused):
        assert m.out.weight is m.embed.weight
        assert sum(p is m.embed.weight for p in m.parameters()) == 1


# ---- training ------------------------------------------------------------------------------

class _Spy(ptb.PennTreebank):
    def __init__(self):
        self.seen = []

    def loss(self, model, batch, state):
        loss, stats, new = super().loss(model, batch, state)
        self.seen.append((state, new))
        return loss, stats, new


def _argv(*extra):
    return ["--preset", "quick", "--no-plot", "--no-progress", "--threads", "1", "--embed", "8",
            "--hidden", "8", "--train-words", "3000", "--eval-words", "500", "--batch-size", "4",
            "--bptt", "10", *extra]


def test_the_state_is_carried_detached_across_batches(tmp_path, data_dir):
    if not (data_dir / "ptb").is_dir():
        pytest.skip("no PTB in the data directory")
    spy = _Spy()
    harness.main(spy, _argv("--epochs", "2", "--out", str(tmp_path)))
    per_epoch = len(spy.train_text) // 4
    assert len(spy.seen) == 2 * per_epoch
    for step, (given, _) in enumerate(spy.seen):
        if step % per_epoch == 0:
            assert given is None
            continue
        previous = spy.seen[step - 1][1]
        for g, p in zip(given, previous):
            for gt, pt in zip(g, p):  # LSTM: (h, c) per module
                assert not gt.requires_grad
                torch.testing.assert_close(gt, pt.detach(), rtol=0, atol=0)


def test_fused_and_torch_nn_give_the_same_first_step(tmp_path, data_dir):
    if not (data_dir / "ptb").is_dir():
        pytest.skip("no PTB in the data directory")
    cfg = harness.resolve_config(ptb.TASK, _argv("--iters", "2", "--eval-every", "2",
                                                 "--out", str(tmp_path)))
    runs = {f: harness.train(ptb.TASK, {**cfg, "fused": f, "out": str(tmp_path / str(f))})
            for f in (False, True)}
    assert runs[False]["backends"] == ["torch.nn"] and runs[True]["backends"] != ["torch.nn"]
    assert_close(torch.tensor(runs[True]["first_loss"]), torch.tensor(runs[False]["first_loss"]),
                 torch.float32, "first-step loss")
    for name in ("valid", "test"):
        assert_close(torch.tensor(runs[True]["test"][name]["loss"]),
                     torch.tensor(runs[False]["test"][name]["loss"]), torch.float32, name)


def test_the_quick_preset_prints_perplexities(tmp_path, data_dir, capsys):
    if not (data_dir / "ptb").is_dir():
        pytest.skip("no PTB in the data directory")
    results = harness.main(ptb.TASK, ["--preset", "quick", "--fused", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert results["status"] == "finished" and "valid perplexity" in out
    best = results["best"]
    assert best["test"]["valid"]["perplexity"] == pytest.approx(best["value"])
    assert results["best_train_perplexity"] < best["test"]["valid"]["perplexity"] < 1000
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_the_decay_schedule_holds_then_decays_each_epoch(tmp_path, data_dir):
    if not (data_dir / "ptb").is_dir():
        pytest.skip("no PTB in the data directory")
    results = harness.main(ptb.TASK, _argv("--epochs", "5", "--decay-start", "2", "--factor",
                                           "0.5", "--log-every", "1", "--out", str(tmp_path)))
    per_epoch = len(ptb.TASK.train_text) // 4
    lrs = {r["step"]: r["lr"] for r in map(json.loads, open(results["metrics_log"]))
           if r["kind"] == "train"}
    # epochs 1-2 at lr 1, then 0.5, 0.25, 0.125 (lr logged after the step's update)
    expected = [1.0, 1.0, 0.5, 0.25, 0.125]
    for epoch, lr in enumerate(expected):
        assert lrs[epoch * per_epoch + 1] == pytest.approx(lr), epoch


def test_help_lists_every_preset(capsys):
    with pytest.raises(SystemExit):
        harness.main(ptb.TASK, ["--help"])
    out = capsys.readouterr().out
    assert all(preset in out for preset in ptb.TASK.presets)


def test_resume_continues_exactly_with_dropout_decay_and_carried_state(tmp_path, data_dir):
    """Stopped mid-epoch at a checkpoint (step 84: in epoch 2 of 74 steps each, after the
    first decay, the state carried) and resumed: the same losses, lrs and best weights as one
    uninterrupted run."""
    if not (data_dir / "ptb").is_dir():
        pytest.skip("no PTB in the data directory")
    argv = _argv("--dropout", "0.3", "--decay-start", "1", "--factor", "0.5", "--log-every", "5",
                 "--eval-every", "7")
    whole = harness.main(ptb.TASK, [*argv, "--iters", "160", "--out", str(tmp_path / "whole")])
    harness.main(ptb.TASK, [*argv, "--iters", "84", "--out", str(tmp_path / "split")])
    split = harness.main(ptb.TASK, [*argv, "--iters", "160", "--resume",
                                    "--out", str(tmp_path / "split")])
    assert len(ptb.TASK.train_text) // 4 == 74

    def records(name):
        return [(r["kind"], r["step"], r["loss"], r.get("lr")) for r in
                map(json.loads, open(tmp_path / name / "metrics.jsonl"))]

    assert records("split") == records("whole")
    assert split["best"] == whole["best"]
    assert split["best_train_perplexity"] == whole["best_train_perplexity"]
