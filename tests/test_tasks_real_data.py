"""The harness on real data and its new tasks (report 002): the IDX loader, the recall and
binary-addition generators, fused == torch.nn at step one, data-parallel training and
mid-epoch resume of a dataset task."""
import gzip
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from tasks import binary_add, harness, recall, smnist
from tasks.data import DataError, data_file, text
from tasks.data.mnist import load_split, read_idx

from conftest import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_idx(path, array, compress=False):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture
def tiny_mnist(tmp_path, rng):
    """A 96-image training and 40-image test set in the IDX format (uncompressed: the
    public .gz files' checksums do not apply), in tmp_path/mnist."""
    gen = np.random.default_rng(rng.randrange(2**31))
    (tmp_path / "mnist").mkdir()
    for split, n in (("train", 96), ("t10k", 40)):
        write_idx(tmp_path / "mnist" / f"{split}-images-idx3-ubyte", gen.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / "mnist" / f"{split}-labels-idx1-ubyte", gen.integers(0, 10, (n,)))
    return tmp_path


# ---- the IDX loader -----------------------------------------------------------------------

@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path, rng, compress):
    array = np.random.default_rng(rng.randrange(2**31)).integers(0, 256, (5, 3, 4))
    path = tmp_path / ("x.idx.gz" if compress else "x.idx")
    write_idx(path, array, compress)
    assert np.array_equal(read_idx(path), array)


@pytest.mark.parametrize("damage", ["magic", "short", "long", "not_gzip"])
def test_idx_damage_is_a_clear_error(tmp_path, damage):
    path = tmp_path / ("x.gz" if damage == "not_gzip" else "x")
    write_idx(tmp_path / "x", np.zeros((4, 2), dtype=np.uint8))
    raw = (tmp_path / "x").read_bytes()
    raw = {"magic": b"\x01" + raw[1:], "short": raw[:-3], "long": raw + b"\x00",
           "not_gzip": raw}[damage]
    path.write_bytes(raw)
    with pytest.raises(DataError, match=str(path)):
        read_idx(path)


def test_missing_and_corrupt_files_name_the_file_and_checksum(tmp_path):
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz is missing.*SHA-256 3552534a"):
        data_file(tmp_path, "mnist/train-labels-idx1-ubyte.gz")
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "train-labels-idx1-ubyte.gz").write_bytes(b"not mnist")
    with pytest.raises(DataError, match="corrupt.*expected 3552534a"):
        data_file(tmp_path, "mnist/train-labels-idx1-ubyte.gz")
    with pytest.raises(DataError, match="no data directory"):
        data_file(tmp_path / "nowhere", "mnist/x")


def test_the_real_mnist_files(data_dir):
    if not (data_dir / "mnist").is_dir():
        pytest.skip("no MNIST in the data directory")
    images, labels = load_split(data_dir, "test")
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    images, labels = load_split(data_dir, "train")
    assert images.shape == (60000, 28, 28) and labels[:5].tolist() == [5, 0, 4, 1, 9]


def test_the_real_ptb_and_shakespeare(data_dir):
    if not (data_dir / "ptb").is_dir():
        pytest.skip("no PTB in the data directory")
    vocab, ids = text.ptb(data_dir)
    assert len(vocab) == 10000 and "<eos>" in vocab
    assert {s: t.numel() for s, t in ids.items()} == {"train": 929589, "valid": 73760,
                                                     "test": 82430}
    chars, stream = text.characters(data_dir)
    assert len(chars) == 65 and stream.numel() == 1115394
    rows = text.batchify(stream, 20)
    assert rows.shape == (1115394 // 20, 20) and torch.equal(rows[:, 1], stream[55769:2 * 55769])


# ---- generators ---------------------------------------------------------------------------

def test_recall_labels_are_the_digit_at_the_position(rng):
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    length, position = rng.randint(2, 12), None
    position = rng.randint(1, length)
    b = recall.make_batch(gen, length, position, 50)
    assert b["x"].shape == (length, 50) and torch.equal(b["y"], b["x"][position - 1])
    # the report's example: [3, 5, 8, 6, 8] -> 5 at the default position 2
    assert int(torch.tensor([3, 5, 8, 6, 8])[recall.RecallTask.defaults["position"] - 1]) == 5
    with pytest.raises(ValueError, match="position"):
        recall.make_batch(gen, 5, 6, 3)


def test_binary_addition_labels_are_the_sums(rng):
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    bits = rng.randint(1, 20)
    b = binary_add.make_batch(gen, bits, 64)
    assert b["x"].shape == (bits + 1, 64, 2) and b["y"].shape == (bits + 1, 64)
    for j in range(64):
        a, c = (binary_add.bits_to_int(b["x"][:, j, k].long()) for k in (0, 1))
        assert a < 2 ** bits and c < 2 ** bits
        assert a + c == binary_add.bits_to_int(b["y"][:, j].long())
    # by hand: 6 (LSB first 0,1,1) + 3 (1,1,0) = 9 = 1,0,0,1
    hand = torch.tensor([[0, 1], [1, 1], [1, 0], [0, 0]], dtype=torch.float32)
    assert binary_add.bits_to_int(torch.tensor([1, 0, 0, 1])) == 9
    assert binary_add.bits_to_int(hand[:, 0].long()) == 6 and binary_add.bits_to_int(hand[:, 1].long()) == 3


# ---- the tasks on the harness ---------------------------------------------------------------

def _cfg(task, argv, tmp_path):
    return harness.resolve_config(task, [*argv, "--out", str(tmp_path), "--threads", "1"])


@pytest.mark.parametrize("task,argv", [
    (smnist.TASK, ["--preset", "quick", "--train-size", "256", "--test-size", "64",
                   "--bidirectional", "--cell", "gru"]),
    (recall.TASK, ["--preset", "quick"]),
    (binary_add.TASK, ["--preset", "quick", "--loss", "bce", "--test-bits", "5,9"]),
])
def test_fused_and_torch_nn_give_the_same_first_step(task, argv, tmp_path, tiny_mnist):
    cfg = _cfg(task, [*argv, "--iters", "2", "--eval-every", "2", "--no-plot",
                      "--data-dir", str(tiny_mnist)], tmp_path)
    runs = {f: harness.train(task, {**cfg, "fused": f, "out": str(tmp_path / str(f))})
            for f in (False, True)}
    assert runs[False]["backends"] == ["torch.nn"] and runs[True]["backends"] != ["torch.nn"]
    assert_close(torch.tensor(runs[True]["first_loss"]), torch.tensor(runs[False]["first_loss"]),
                 torch.float32, "first-step loss")
    for name in runs[False]["test"]:
        assert_close(torch.tensor(runs[True]["test"][name]["loss"]),
                     torch.tensor(runs[False]["test"][name]["loss"]), torch.float32, name)


@pytest.mark.parametrize("task", [smnist.TASK, recall.TASK, binary_add.TASK],
                         ids=["smnist", "recall", "binary_add"])
def test_quick_presets_learn_and_list_their_presets(task, tmp_path, data_dir, capsys):
    if task is smnist.TASK and not (data_dir / "mnist").is_dir():
        pytest.skip("no MNIST in the data directory")
    results = harness.main(task, ["--preset", "quick", "--fused", "--out", str(tmp_path)])
    assert results["status"] == "finished"
    (name, final), *_ = results["test"].items()
    headline = task.test_metrics[0].name
    assert final[headline] > 0.6, (name, final)
    assert (tmp_path / "curves.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        harness.main(task, ["--help"])
    out = capsys.readouterr().out
    assert all(preset in out for preset in task.presets)


def test_resume_of_a_dataset_task_mid_epoch_continues_exactly(tmp_path, tiny_mnist):
    """12 steps per epoch; stopped at step 9 (mid-epoch) and resumed to 20, the losses equal
    an uninterrupted run's."""
    argv = ["--preset", "quick", "--fused", "--train-size", "96", "--batch-size", "8",
            "--eval-every", "3", "--log-every", "1", "--no-plot", "--data-dir", str(tiny_mnist),
            "--threads", "1"]
    whole = harness.main(smnist.TASK, [*argv, "--iters", "20", "--out", str(tmp_path / "whole")])
    harness.main(smnist.TASK, [*argv, "--iters", "9", "--out", str(tmp_path / "split")])
    split = harness.main(smnist.TASK, [*argv, "--iters", "20", "--resume",
                                       "--out", str(tmp_path / "split")])
    assert split["steps"] == whole["steps"] == 20

    def losses(name):
        return [(r["kind"], r["step"], r["loss"]) for r in
                map(json.loads, open(tmp_path / name / "metrics.jsonl"))]

    assert [r[:2] for r in losses("split")] == [r[:2] for r in losses("whole")]
    torch.testing.assert_close(torch.tensor([r[2] for r in losses("split")]),
                               torch.tensor([r[2] for r in losses("whole")]), rtol=1e-6, atol=0)


def test_compare_writes_an_overlay_plot(tmp_path):
    harness.main(recall.TASK, ["--preset", "quick", "--iters", "20", "--eval-every", "10",
                               "--compare", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "compare.json").read_text())
    assert summary["speed_ratio_fused_over_torch"] > 0
    assert (tmp_path / "compare.png").stat().st_size > 0


@pytest.mark.parametrize("fused", [False, True], ids=["torch.nn", "fused"])
def test_data_parallel_step_equals_one_process_on_the_combined_batch(tmp_path, tiny_mnist, fused):
    """Two gloo processes under torchrun, each on half of a batch of 8, take the same SGD step
    (lr 1: the weights move by the gradient) as one process on all 8: float64, 1e-12."""
    argv = ["--preset", "quick", "--train-size", "96", "--batch-size", "8", "--iters", "1",
            "--eval-every", "1", "--optimizer", "sgd", "--lr", "1", "--dtype", "float64",
            "--no-plot", "--no-progress", "--data-dir", str(tiny_mnist), "--threads", "1",
            "--cell", "gru", "--layers", "2"] + (["--fused"] if fused else [])
    harness.main(smnist.TASK, [*argv, "--out", str(tmp_path / "one")])
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", "-m", "tasks.smnist", *argv,
                          "--out", str(tmp_path / "two")],
                         env=env, cwd=ROOT, timeout=300, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = (torch.load(tmp_path / name / "checkpoint.pt", weights_only=False)["model"]
                for name in ("one", "two"))
    torch.manual_seed(0)  # the harness builds the model under the run's seed
    start = smnist.TASK.build(harness.resolve_config(smnist.TASK, argv)).double()
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-12, atol=1e-12, msg=key)
    assert not all(torch.equal(one[k], v) for k, v in start.state_dict().items())  # it moved
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["processes"] == 2


class _CarryTask(harness.Task):
    """A dataset task whose loss sees the previous batch's state: records what it is given."""
    name = "carry"
    dataset = True
    carries_state = True
    train_metrics = ()
    test_metrics = ()
    defaults = dict(hidden=3, iters=7, batch_size=4, eval_every=7, plot=False)
    presets = {"quick": {}}

    def __init__(self):
        self.seen, self.returned = [], []

    def build(self, cfg):
        return harness.make_rnn({**cfg, "cell": "gru", "layers": 1}, 2)

    def train_size(self, cfg):
        return 12  # 3 steps per epoch

    def train_batch(self, cfg, index, device):
        return {"x": torch.randn(5, len(index), 2, generator=torch.Generator().manual_seed(int(index[0])))}

    def loss(self, model, batch, state):
        self.seen.append(state)
        y, state = model(batch["x"], state)
        self.returned.append(state.detach().clone())
        return y.pow(2).mean(), {}, state

    def test_sets(self, cfg, gen, device):
        return {}


def test_truncated_bptt_carries_the_state_detached_and_resets_each_epoch(tmp_path):
    task = _CarryTask()
    harness.main(task, ["--out", str(tmp_path), "--no-progress"])
    assert len(task.seen) == 7
    starts = [0, 3, 6]  # the first step of each epoch starts from a zero state
    for step, state in enumerate(task.seen):
        if step in starts:
            assert state is None, step
        else:
            assert state.grad_fn is None and not state.requires_grad  # detached
            torch.testing.assert_close(state, task.returned[step - 1], rtol=0, atol=0)


def test_language_model_ties_weights_and_carries_its_state():
    from tasks.models import LanguageModel
    cfg = {"cell": "lstm", "hidden": 8, "layers": 2, "embed": 8, "dropout": 0.0,
           "tie_weights": True}
    model = LanguageModel(cfg, vocab=11)
    assert model.out.weight is model.embed.weight
    tokens = torch.randint(0, 11, (6, 3))
    whole, _ = model(tokens)
    first, state = model(tokens[:4])
    second, _ = model(tokens[4:], state)  # the carried state continues the stream exactly
    torch.testing.assert_close(torch.cat([first, second]), whole)
    with pytest.raises(ValueError, match="--embed"):
        LanguageModel(dict(cfg, embed=4), vocab=11)


class _Scripted(harness.Task):
    """A generated task whose validation perplexity at each evaluation is scripted."""
    name = "scripted"
    train_metrics = ()
    test_metrics = (harness.Metric("perplexity", "perplexity"),)
    best_by = ("valid", "perplexity")
    defaults = dict(hidden=3, iters=40, batch_size=2, eval_every=4, plot=False, optimizer="sgd",
                    lr=0.1)
    presets = {"quick": {}}
    SCRIPT = [9.0, 5.0, 6.0, 4.0, 4.5, 4.2, 4.1, 7.0, 8.0, 9.0]

    def __init__(self):
        self.evaluations = 0

    def build(self, cfg):
        return harness.make_rnn({**cfg, "cell": "rnn", "layers": 1}, 2)

    def sample(self, cfg, gen, device):
        return {"x": torch.randn(3, cfg["batch_size"], 2, generator=gen)}

    def loss(self, model, batch):
        return model(batch["x"])[0].pow(2).mean(), {}

    def test_sets(self, cfg, gen, device):
        return {"valid": None}

    def evaluate(self, model, cfg, data):
        value = self.SCRIPT[min(self.evaluations, len(self.SCRIPT) - 1)]
        self.evaluations += 1
        return {"loss": 0.0, "perplexity": value}


def test_best_weights_early_stop_and_plateau_on_the_validation_metric(tmp_path):
    task = _Scripted()
    results = harness.main(task, ["--stop-after", "3", "--lr-schedule", "plateau", "--plateau-on",
                                  "best", "--patience", "1", "--factor", "0.5", "--min-lr", "0",
                                  "--log-every", "4", "--out", str(tmp_path), "--no-progress"])
    # best 4.0 at the 4th evaluation (step 16); 4.5, 4.2, 4.1 do not beat it: stop at step 28
    assert results["steps"] == 28 and results["status"].startswith("stopped early at step 28")
    assert results["best"]["step"] == 16 and results["best"]["value"] == 4.0
    saved = torch.load(tmp_path / "best.pt")
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert not all(torch.equal(saved[k], v) for k, v in checkpoint["model"].items())
    # the plateau schedule (patience 1) watched the scripted values: 6.0 was one evaluation
    # without a better value, 4.5 and 4.2 were two, so the lr was halved after 4.2 (step 24);
    # on the train loss, which falls, it would not have been
    lrs = [r["lr"] for r in map(json.loads, open(results["metrics_log"])) if r["kind"] == "train"]
    assert lrs == [0.1] * 6 + [0.05]
