"""The task harness and the copy/adder tasks: data generators, masking, fused == torch.nn at
step one, and each quick preset learning."""
import json

import pytest
import torch

from tasks import adder, copy, copy_positions, harness
from tasks.data import find_data_dir

from conftest import assert_close


def _cfg(task, argv, tmp_path):
    return harness.resolve_config(task, [*argv, "--out", str(tmp_path), "--threads", "1"])


# ---- data generators -------------------------------------------------------------------

@pytest.mark.parametrize("reverse", [False, True])
def test_copy_batch_targets_are_the_inputs(rng, reverse):
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    lengths = torch.tensor([rng.randint(1, 12) for _ in range(9)])
    vocab = rng.randint(2, 20)
    b = copy.make_batch(gen, lengths, vocab, pad_to=15, reverse_source=reverse)
    assert b["src"].shape == (15, 9)
    go = vocab + 1
    for j, n in enumerate(lengths.tolist()):
        seq = b["target"][:n, j]
        src = b["src"][:n, j]
        assert torch.equal(src.flip(0) if reverse else src, seq)
        assert seq.min() >= 1 and seq.max() <= vocab
        assert (b["target"][n:, j] == copy.PAD).all() and (b["src"][n:, j] == copy.PAD).all()
        assert b["dec_in"][0, j] == go and torch.equal(b["dec_in"][1:n, j], seq[:-1])
        assert b["mask"][:, j].sum() == n


@pytest.mark.parametrize("reverse", [False, True])
def test_copy_lead_pads_come_before_the_source(rng, reverse):
    seed = rng.randrange(2**31)
    lengths = torch.tensor([rng.randint(1, 12) for _ in range(9)])
    pads = torch.tensor([rng.randint(0, 6) for _ in range(9)])
    plain = copy.make_batch(torch.Generator().manual_seed(seed), lengths, 7, reverse_source=reverse)
    padded = copy.make_batch(torch.Generator().manual_seed(seed), lengths, 7, reverse_source=reverse,
                             lead_pads=pads)
    assert padded["src"].size(0) == int((lengths + pads).max())
    assert torch.equal(padded["src_lengths"], lengths + pads)
    for key in ("target", "dec_in", "mask"):
        assert torch.equal(padded[key], plain[key])
    for j, (n, p) in enumerate(zip(lengths.tolist(), pads.tolist())):
        assert (padded["src"][:p, j] == copy.PAD).all()
        assert torch.equal(padded["src"][p:p + n, j], plain["src"][:n, j])
        assert (padded["src"][p + n:, j] == copy.PAD).all()


@pytest.mark.parametrize("packed", [False, True])
def test_copy_decoder_reading_go_decodes_as_it_trains(tmp_path, packed):
    """With ``--decoder-input go`` greedy decoding sees what training saw: its symbols are the
    teacher-forced argmax, and feeding back the previous symbol changes them."""
    argv = ["--preset", "quick", "--hidden", "16", "--embed", "8", "--min-length", "3"]
    argv += ["--packed"] if packed else []
    outputs = {}
    for feed in ("go", "previous"):
        cfg = _cfg(copy.TASK, [*argv, "--decoder-input", feed], tmp_path)
        torch.manual_seed(0)
        model = copy.TASK.build(cfg).eval()
        batch = copy.TASK.sample(cfg, torch.Generator().manual_seed(1), "cpu")
        with torch.no_grad():
            forced = copy.TASK.teacher_forced_logits(model, batch).argmax(-1)
            greedy = model.greedy(batch["src"], batch["src"].size(0),
                                  batch["lengths"] if packed else None)
        outputs[feed] = (forced[batch["mask"]], greedy[batch["mask"]])
    assert torch.equal(*outputs["go"])
    assert not torch.equal(*outputs["previous"])


def test_copy_lead_pads_need_packed_sequences(tmp_path):
    cfg = _cfg(copy.TASK, ["--preset", "quick", "--lead-pad", "3"], tmp_path)
    with pytest.raises(ValueError, match="--packed"):
        copy.TASK.sample(cfg, torch.Generator(), "cpu")
    cfg = _cfg(copy.TASK, ["--preset", "quick", "--lead-pad", "3", "--packed",
                           "--min-length", "2"], tmp_path)
    batch = copy.TASK.sample(cfg, torch.Generator().manual_seed(0), "cpu")
    extra = batch["src_lengths"] - batch["lengths"]
    assert extra.min() >= 0 and extra.max() <= 3 and extra.max() > 0
    (test,) = copy.TASK.test_sets({**cfg, "test_lead_pad": 5}, torch.Generator(), "cpu").values()
    assert torch.equal(test["src_lengths"], test["lengths"] + 5)
    with pytest.raises(ValueError, match="--packed"):
        copy.TASK.test_sets({**cfg, "test_lead_pad": 5, "packed": False}, torch.Generator(), "cpu")


def test_adder_batch_targets_are_the_sums(rng):
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    digits = rng.randint(2, 40)
    b = adder.make_batch(gen, digits, 50)
    for j in range(50):
        a, c, s = (adder.digits_to_int(b[k][:, j]) for k in ("a", "b", "target"))
        assert a + c == s
        assert a < 10 ** (digits - 1) and c < 10 ** (digits - 1)
    assert b["target"].min() >= 0 and b["target"].max() <= 9


# ---- masking ---------------------------------------------------------------------------

def _scramble_after(t, lengths, gen, lo, hi, start_offset=0):
    """t with every position >= length + start_offset replaced by random symbols."""
    pos = torch.arange(t.size(0))[:, None]
    noise = torch.randint(lo, hi, t.shape, generator=gen)
    return torch.where(pos >= lengths[None, :] + start_offset, noise, t)


@pytest.mark.parametrize("packed", [True, False])
def test_copy_padding_does_not_leak_into_the_loss(rng, tmp_path, packed):
    argv = ["--preset", "quick", "--hidden", "16", "--embed", "8", "--length", "9",
            "--min-length", "2", "--batch-size", "12", "--seed", str(rng.randrange(1000))]
    cfg = _cfg(copy.TASK, argv + (["--packed"] if packed else ["--pad-to", "14"]), tmp_path)
    torch.manual_seed(cfg["seed"])
    model = copy.TASK.build(cfg)
    with torch.no_grad():  # peaked predictions, so that any leak moves the loss visibly
        model.out.weight.mul_(50)
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    batch = copy.TASK.sample(cfg, gen, "cpu")
    loss, _ = copy.TASK.loss(model, batch)

    noisy = dict(batch)
    lengths, vocab = batch["lengths"], cfg["vocab"]
    noisy["target"] = _scramble_after(batch["target"], lengths, gen, 1, vocab + 1)
    # dec_in[t] is fed before predicting target[t], so positions >= length are padding there too.
    noisy["dec_in"] = _scramble_after(batch["dec_in"], lengths, gen, 1, vocab + 1)
    if packed:  # a packed encoder never reads the source's padding either
        noisy["src"] = _scramble_after(batch["src"], lengths, gen, 1, vocab + 1)
    assert not torch.equal(noisy["target"], batch["target"])
    torch.testing.assert_close(copy.TASK.loss(model, noisy)[0], loss, rtol=0, atol=1e-6)

    # The check can fail: changing the real targets does move the loss (by far more than 1e-6).
    real = dict(batch)
    real["target"] = torch.where(batch["mask"], batch["target"] % vocab + 1, batch["target"])
    assert abs(copy.TASK.loss(model, real)[0].item() - loss.item()) > 1e-4


# ---- harness -----------------------------------------------------------------------------

def test_flags_override_presets_which_override_defaults(tmp_path):
    cfg = _cfg(copy.TASK, ["--preset", "quick", "--hidden", "7", "--optimizer", "rmsprop"], tmp_path)
    assert (cfg["hidden"], cfg["optimizer"]) == (7, "rmsprop")
    assert cfg["length"] == copy.PRESETS["quick"]["length"]
    assert cfg["vocab"] == copy.CopyTask.defaults["vocab"]
    assert harness.resolve_config(copy.TASK, [])["preset"] == "default"
    assert _cfg(adder.TASK, ["--epochs", "3"], tmp_path)["iters"] == 3 * adder.TASK.epoch_iters


@pytest.mark.parametrize("name", harness.OPTIMIZERS)
def test_every_optimizer_builds(name):
    p = torch.nn.Parameter(torch.zeros(3))
    opt = harness.make_optimizer({"optimizer": name, "lr": 0.1}, [p])
    p.grad = torch.ones(3)
    opt.step()
    assert (p < 0).all()


@pytest.mark.parametrize("name", harness.OPTIMIZERS)
def test_weight_decay_shrinks_weights_without_gradient(name):
    p = torch.nn.Parameter(torch.ones(3))
    opt = harness.make_optimizer({"optimizer": name, "lr": 0.1, "weight_decay": 0.5}, [p])
    p.grad = torch.zeros(3)
    opt.step()
    assert ((p > 0) & (p < 1)).all()


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_chrono_init_sets_gate_biases_to_time_scales(cell):
    t_max, hidden = 40.0, 256  # 256 draws: P(no unit below 3 steps) = (36/38)^256 < 1e-6
    rnn = harness.make_rnn({"cell": cell, "hidden": hidden, "layers": 2, "chrono_init": t_max}, 5)
    keep = slice(hidden, 2 * hidden)  # LSTM forget gate, GRU update gate
    for layer in range(2):
        b_ih, b_hh = getattr(rnn, f"bias_ih_l{layer}"), getattr(rnn, f"bias_hh_l{layer}")
        scale = torch.exp(b_ih[keep])  # the drawn time scale of each unit
        assert ((scale >= 1) & (scale <= t_max - 1)).all()
        assert scale.max() > t_max / 2 and scale.min() < 3  # drawn across the range
        assert (b_hh[keep] == 0).all()
        if cell == "lstm":
            assert torch.equal(b_ih[:hidden], -b_ih[keep])
            assert (b_hh[:hidden] == 0).all()
    with pytest.raises(ValueError, match="LSTM and GRU"):
        harness.make_rnn({"cell": "rnn", "hidden": 4, "layers": 1, "chrono_init": t_max}, 5)
    with pytest.raises(ValueError, match="above 2"):
        harness.make_rnn({"cell": cell, "hidden": 4, "layers": 1, "chrono_init": 2}, 5)


def test_find_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEDRNN_DATA", str(tmp_path))
    assert find_data_dir() == tmp_path
    assert find_data_dir(tmp_path / "missing") is None
    monkeypatch.setenv("FUSEDRNN_DATA", str(tmp_path / "missing"))
    assert find_data_dir() is None


@pytest.mark.parametrize("task,argv", [
    (copy.TASK, ["--preset", "quick", "--hidden", "32", "--packed", "--min-length", "3",
                 "--lead-pad", "4", "--shared-rnn"]),
    (copy.TASK, ["--preset", "quick", "--hidden", "32", "--cell", "gru", "--layers", "2",
                 "--chrono-init", "30", "--weight-decay", "0.1"]),
    (adder.TASK, ["--preset", "quick", "--cell", "lstm", "--layers", "3"]),
])
def test_fused_and_torch_nn_give_the_same_first_step(task, argv, tmp_path):
    cfg = _cfg(task, [*argv, "--iters", "2", "--eval-every", "2", "--no-plot"], tmp_path)
    runs = {}
    for fused in (False, True):
        runs[fused] = harness.train(task, {**cfg, "fused": fused, "out": str(tmp_path / str(fused))})
    assert runs[False]["backends"] == ["torch.nn"]
    assert runs[True]["backends"] != ["torch.nn"]
    first = [torch.tensor(runs[f]["first_loss"]) for f in (False, True)]
    assert_close(first[1], first[0], torch.float32, "first-step loss")
    name = next(iter(runs[False]["test"]))
    assert_close(torch.tensor(runs[True]["test"][name]["loss"]),
                 torch.tensor(runs[False]["test"][name]["loss"]), torch.float32, "loss at step 2")


@pytest.mark.parametrize("task", [copy.TASK, adder.TASK], ids=["copy", "adder"])
def test_quick_preset_learns(task, tmp_path, capsys):
    results = harness.main(task, ["--preset", "quick", "--fused", "--threads", "1",
                                  "--out", str(tmp_path)])
    assert results["status"] == "finished"
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train = [r for r in records if r["kind"] == "train"]
    assert train[-1]["loss"] < 0.5 * results["first_loss"]
    assert train[-1]["acc"] > train[0]["acc"] + 0.2
    assert (tmp_path / "curves.png").stat().st_size > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["steps"] == results["config"]["iters"] and saved["steps_per_s"] > 0
    out = capsys.readouterr().out
    assert "iterations: " in out and "test_acc: " in out and "steps/s" in out


def test_copy_positions_reproduce_the_runs_final_accuracy(tmp_path):
    """The per-position tool reloads the run's last weights and, given the harness's test-set
    seed, re-draws its test sequences: its positions average to the run's final test accuracy."""
    results = harness.main(copy.TASK, ["--preset", "quick", "--fused", "--threads", "1",
                                       "--iters", "60", "--no-plot", "--out", str(tmp_path)])
    cfg = results["config"]
    lengths = [int(x) for x in str(cfg["test_lengths"]).split(",")]
    _, acc = copy_positions.position_accuracy(tmp_path, lengths, cfg["test_size"],
                                              seed=cfg["seed"] + 2)
    for length in lengths:
        assert len(acc[length]) == length and all(0 <= a <= 1 for a in acc[length])
        final = results["test"][f"test:{length}/{cfg['length']}"]["acc"]
        assert abs(sum(acc[length]) / length - final) < 1e-6
    copy_positions.main([str(tmp_path), "--lengths", "12"])
    assert (tmp_path / "positions.png").stat().st_size > 0


def test_resume_continues_exactly(tmp_path):
    """A run stopped at a checkpoint and resumed with --resume logs the same losses and test
    metrics as the same run made in one go."""
    argv = ["--preset", "quick", "--fused", "--eval-every", "10", "--log-every", "5", "--no-plot",
            "--threads", "1"]
    whole = harness.main(copy.TASK, [*argv, "--iters", "20", "--out", str(tmp_path / "whole")])
    harness.main(copy.TASK, [*argv, "--iters", "10", "--out", str(tmp_path / "split")])
    split = harness.main(copy.TASK, [*argv, "--iters", "20", "--resume",
                                     "--out", str(tmp_path / "split")])
    assert split["steps"] == whole["steps"] == 20

    def losses(name):
        records = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
        return [(r["kind"], r["step"], r.get("name"), r["loss"]) for r in records]

    assert [r[:3] for r in losses("split")] == [r[:3] for r in losses("whole")]
    torch.testing.assert_close(torch.tensor([r[3] for r in losses("split")]),
                               torch.tensor([r[3] for r in losses("whole")]), rtol=1e-6, atol=0)
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        harness.main(copy.TASK, [*argv, "--resume", "--out", str(tmp_path / "none")])


# ---- comparing runs ----------------------------------------------------------------------

def _fake_run(path, valid):
    path.mkdir()
    records = [{"kind": "train", "step": 5, "epoch": 0.5, "loss": 9.0}]
    for epoch, value in enumerate(valid, 1):
        records += [{"kind": "test", "step": 10 * epoch, "name": "valid", "epoch": float(epoch),
                     "perplexity": value},
                    {"kind": "test", "step": 10 * epoch, "name": "test", "epoch": float(epoch),
                     "perplexity": value + 1000}]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_compare_runs_reads_each_runs_curve_and_draws_the_figure(tmp_path, capsys):
    from tasks import compare_runs
    a = _fake_run(tmp_path / "a", [300.0, 200.0, 150.0])
    b = _fake_run(tmp_path / "b", [250.0, 260.0])
    assert compare_runs.read_curve(a, "valid", "perplexity") == [(1.0, 300.0), (2.0, 200.0),
                                                                  (3.0, 150.0)]
    assert compare_runs.read_curve(b, "test", "perplexity") == [(1.0, 1250.0), (2.0, 1260.0)]
    out = tmp_path / "fig" / "valid.png"
    compare_runs.main([str(a), str(b), "--ref", "a=120", "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "wrote" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no run directory of that name"):
        compare_runs.plot_runs([a], "valid", "perplexity", out, refs={"c": 1.0})
    with pytest.raises(ValueError, match="no 'train' evaluations"):
        compare_runs.read_curve(a, "train", "perplexity")
    with pytest.raises(FileNotFoundError):
        compare_runs.read_curve(tmp_path / "fig", "valid", "perplexity")
    with pytest.raises(SystemExit):
        compare_runs.main([str(a), "--ref", "a120", "--out", str(out)])
