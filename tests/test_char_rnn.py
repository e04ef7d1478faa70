"""The character-level language model (report 003): its samplers, the smooth loss, elementwise
clipping, the carried state, fused == torch.nn at step one, and reproducible sampling."""
import json

import pytest
import torch

from tasks import char_rnn, harness
from tasks.data import text

from conftest import assert_close

LENGTH = 5


@pytest.fixture
def tiny_text(tmp_path, rng):
    """A 403-character random text over 7 characters, as tmp_path/text.txt."""
    (tmp_path / "text.txt").write_text("".join(rng.choice("abcdef\n") for _ in range(403)))
    return tmp_path


def _argv(tiny_text, *extra):
    return ["--data-dir", str(tiny_text), "--text", "text.txt", "--seq-length", str(LENGTH),
            "--hidden", "8", "--no-plot", "--no-progress", "--sample-length", "5",
            "--final-sample-length", "5", "--threads", "1", *extra]


# ---- the samplers -------------------------------------------------------------------------

@pytest.mark.parametrize("streams", [1, 2, 3])
def test_in_order_reading_covers_each_stream_in_order(rng, streams):
    ids = torch.randint(0, 9, (rng.randrange(60, 200),))
    reader = text.TextStreams(ids, streams, LENGTH)
    order = reader.order("order", 4, torch.Generator())
    assert torch.equal(order, torch.arange(len(reader)))
    rows = ids[:ids.numel() // streams * streams].view(streams, -1)
    xs, ys = [], []
    for step in range(len(reader) // streams):
        batch = reader.batch(order[step * streams:(step + 1) * streams], "order", 4)
        assert batch["reset"] == (step == 0)
        xs.append(batch["x"])
        ys.append(batch["y"])
    x, y = torch.cat(xs), torch.cat(ys)  # [windows * LENGTH, streams]
    n = reader.windows * LENGTH
    assert torch.equal(x.t(), rows[:, :n]) and torch.equal(y.t(), rows[:, 1:n + 1])
    assert rows.shape[1] - n <= LENGTH  # only a tail shorter than a window is left out


@pytest.mark.parametrize("streams", [1, 2])
def test_chunks_visit_every_window_once_per_epoch_in_a_random_chunk_order(rng, streams):
    ids = torch.randint(0, 9, (rng.randrange(150, 300),))
    reader = text.TextStreams(ids, streams, LENGTH)
    bounds = reader.chunk_bounds(4)
    assert bounds[0][0] == 0 and bounds[-1][1] == reader.windows
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    chunk_orders = set()
    for _ in range(12):
        order = reader.order("chunks", 4, gen)
        assert torch.equal(order.sort().values, torch.arange(len(reader)))  # each once
        windows = (order // streams).view(-1, streams)
        assert (windows == windows[:, :1]).all()  # a step reads one window of every stream
        firsts = windows[:, 0].tolist()
        resets = [reader.batch(order[s * streams:(s + 1) * streams], "chunks", 4)["reset"]
                  for s in range(len(firsts))]
        starts = {b for b, _ in bounds}
        assert resets == [w in starts for w in firsts]
        chunk_orders.add(tuple(w for w in firsts if w in starts))
        for w, nxt, reset in zip(firsts, firsts[1:], resets[1:]):
            assert nxt == w + 1 or reset  # in order inside a chunk
    assert len(chunk_orders) > 1  # 12 epochs in one order: chance (1/24)**11


def test_random_locations_start_anywhere_from_a_zero_state(rng):
    ids = torch.randint(0, 9, (rng.randrange(40, 60),))
    reader = text.TextStreams(ids, 2, LENGTH)
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    seen = set()
    for _ in range(200):
        order = reader.order("random", 4, gen)
        assert len(order) == len(reader)
        seen.update(order.tolist())
        batch = reader.batch(order[:2], "random", 4)
        assert batch["reset"]
        for j, start in enumerate(order[:2].tolist()):
            assert torch.equal(batch["x"][:, j], ids[start:start + LENGTH])
            assert torch.equal(batch["y"][:, j], ids[start + 1:start + LENGTH + 1])
    assert seen == set(range(ids.numel() - LENGTH))  # every start, and none past the end


def test_text_too_short_and_bad_chunks_are_clear_errors():
    with pytest.raises(ValueError, match="too short"):
        text.TextStreams(torch.zeros(10, dtype=torch.long), 2, LENGTH)
    reader = text.TextStreams(torch.zeros(40, dtype=torch.long), 1, LENGTH)
    with pytest.raises(ValueError, match="--chunks"):
        reader.chunk_bounds(0)


# ---- training ------------------------------------------------------------------------------

def _records(path):
    return [json.loads(line) for line in open(path / "metrics.jsonl")]


def test_smooth_loss_is_the_moving_average_and_survives_resume(tiny_text):
    argv = _argv(tiny_text, "--preset", "quick", "--log-every", "1", "--eval-every", "7")
    harness.main(char_rnn.TASK, [*argv, "--iters", "20", "--out", str(tiny_text / "whole")])
    train = [r for r in _records(tiny_text / "whole") if r["kind"] == "train"]
    assert len(train) == 20
    smooth = train[0]["loss"]  # the first loss starts the average
    for r in train:
        smooth = 0.999 * smooth + 0.001 * r["loss"] if r is not train[0] else smooth
        assert r["smooth_loss"] == pytest.approx(smooth, rel=1e-12)
    assert train[-1]["smooth_loss"] != pytest.approx(train[-1]["loss"], rel=1e-6)
    # stopped at 10 (the checkpoint at 7) and resumed: the same average
    harness.main(char_rnn.TASK, [*argv, "--iters", "10", "--out", str(tiny_text / "split")])
    harness.main(char_rnn.TASK, [*argv, "--iters", "20", "--resume",
                                 "--out", str(tiny_text / "split")])
    split = [r for r in _records(tiny_text / "split") if r["kind"] == "train"]
    assert [r["step"] for r in split] == list(range(1, 21))
    torch.testing.assert_close(torch.tensor([r["smooth_loss"] for r in split]),
                               torch.tensor([r["smooth_loss"] for r in train]), rtol=1e-6, atol=0)
    best = json.loads((tiny_text / "whole" / "results.json").read_text())["best_train"]
    assert best["smooth_loss"]["value"] == min(r["smooth_loss"] for r in train)


def test_each_gradient_element_is_clipped(tiny_text):
    """One SGD step of lr 1 moves each weight by its gradient clipped to [-v, v]."""
    v = 0.02
    argv = _argv(tiny_text, "--preset", "quick", "--optimizer", "sgd", "--lr", "1", "--iters",
                 "1", "--eval-every", "1", "--clip-value", str(v), "--dtype", "float64",
                 "--out", str(tiny_text / "run"))
    cfg = harness.resolve_config(char_rnn.TASK, argv)
    harness.train(char_rnn.TASK, cfg)
    after = torch.load(tiny_text / "run" / "checkpoint.pt", weights_only=False)["model"]
    task = char_rnn.TASK
    task.prepare(cfg)
    torch.manual_seed(cfg["seed"])
    model = task.build(cfg).double()
    gen = torch.Generator().manual_seed(cfg["seed"] + 1)
    batch = task.train_batch(cfg, task.epoch_order(cfg, gen)[:1], "cpu")
    loss, _, _ = task.loss(model, batch, None)
    loss.backward()
    clipped = 0
    for name, p in model.named_parameters():
        clipped += int((p.grad.abs() > v).sum())
        torch.testing.assert_close(after[name], p.detach() - p.grad.clamp(-v, v),
                                   rtol=0, atol=1e-12)
    assert clipped > 0  # the step did clip


class _Spy(char_rnn.CharRNNTask):
    """Records, for every step, the state the task received, the one it returned, and the
    one the model returns from a zero state."""

    def __init__(self):
        self.steps = []

    def loss(self, model, batch, state):
        loss, stats, new = super().loss(model, batch, state)
        with torch.no_grad():
            from_zero = model(batch["x"])[1]
        self.steps.append(dict(reset=batch["reset"], given=state, returned=new,
                               from_zero=from_zero))
        return loss, stats, new


@pytest.mark.parametrize("sampler", ["order", "chunks", "random"])
def test_the_state_is_carried_detached_and_reset_where_the_sampler_says(tiny_text, sampler):
    spy = _Spy()
    argv = _argv(tiny_text, "--preset", "quick", "--sampler", sampler, "--chunks", "3",
                 "--batch-size", "2", "--out", str(tiny_text / sampler))
    cfg = harness.resolve_config(spy, argv)
    spy.prepare(cfg)
    per_epoch = len(spy.train_text) // 2
    harness.main(spy, [*argv, "--iters", str(2 * per_epoch + 3)])
    starts = {b for b, _ in spy.train_text.chunk_bounds(3)}
    for step, seen in enumerate(spy.steps):
        position = step % per_epoch
        if position == 0:
            assert seen["given"] is None  # each pass over the text starts from zero
        else:
            previous = spy.steps[step - 1]["returned"]
            assert not seen["given"].requires_grad and seen["given"].grad_fn is None
            torch.testing.assert_close(seen["given"], previous.detach(), rtol=0, atol=0)
        if seen["reset"] or seen["given"] is None:  # the model starts from zero
            torch.testing.assert_close(seen["returned"], seen["from_zero"], rtol=0, atol=0)
        else:
            assert not torch.equal(seen["returned"], seen["from_zero"])
        if sampler == "random":
            assert seen["reset"]
        elif sampler == "order":
            assert seen["reset"] == (position == 0)
    if sampler == "chunks":
        resets = sum(s["reset"] for s in spy.steps[:per_epoch])
        assert resets == len(starts) == 3


def test_fused_and_torch_nn_give_the_same_first_step(tiny_text):
    cfg = harness.resolve_config(char_rnn.TASK, _argv(
        tiny_text, "--preset", "quick", "--iters", "2", "--eval-every", "2",
        "--out", str(tiny_text / "run")))
    runs = {f: harness.train(char_rnn.TASK, {**cfg, "fused": f, "out": str(tiny_text / str(f))})
            for f in (False, True)}
    assert runs[False]["backends"] == ["torch.nn"] and runs[True]["backends"] != ["torch.nn"]
    assert_close(torch.tensor(runs[True]["first_loss"]), torch.tensor(runs[False]["first_loss"]),
                 torch.float32, "first-step loss")
    assert_close(torch.tensor(runs[True]["test"]["heldout"]["loss"]),
                 torch.tensor(runs[False]["test"]["heldout"]["loss"]), torch.float32, "heldout")


def test_the_quick_preset_on_shakespeare(tmp_path, data_dir, capsys):
    if not (data_dir / "tinyshakespeare").is_dir():
        pytest.skip("no Tiny Shakespeare in the data directory")
    results = harness.main(char_rnn.TASK, ["--preset", "quick", "--fused", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert results["status"] == "finished"
    assert results["best_train"]["smooth_loss"]["value"] < results["first_loss"] - 10
    assert "--- sample at step 1500" in out and len(results["sample_best"]) == 1000
    assert (tmp_path / "samples.txt").read_text().count("--- step") == 3
    assert (tmp_path / "best.pt").exists() and results["best"]["step"] == 1500


# ---- sampling ------------------------------------------------------------------------------

def test_sampling_is_reproducible_with_a_seed(rng):
    chars = list("abc\n")
    cfg = {"cell": "gru", "hidden": 6, "layers": 1, "init": "torch"}
    model = char_rnn.CharModel(cfg, len(chars)).eval()
    seed = rng.randrange(2**31)
    with torch.no_grad():
        texts = [char_rnn.synthesize(model, chars, "ab", 60, 1.0, torch.Generator().manual_seed(s))
                 for s in (seed, seed, seed + 1)]
        assert texts[0] == texts[1] and len(texts[0]) == 60 and set(texts[0]) <= set(chars)
        assert texts[0] != texts[2]
        cold = [char_rnn.synthesize(model, chars, "ab", 30, 1e-4, torch.Generator().manual_seed(s))
                for s in (seed, seed + 1)]
        assert cold[0] == cold[1]  # near zero temperature is greedy: no seed dependence
        with pytest.raises(ValueError, match="prime"):
            char_rnn.synthesize(model, chars, "xyz", 5, 1.0, torch.Generator())
        with pytest.raises(ValueError, match="temperature"):
            char_rnn.synthesize(model, chars, "a", 5, 0.0, torch.Generator())


def test_help_lists_every_preset(capsys):
    with pytest.raises(SystemExit):
        harness.main(char_rnn.TASK, ["--help"])
    out = capsys.readouterr().out
    assert all(preset in out for preset in char_rnn.TASK.presets)
