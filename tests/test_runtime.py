"""runtime.py's shared plumbing, each piece against what it replaces or a hand-worked case: batch_at is
data.batches' batch, the held-out split, the non-finite guard's bookkeeping, final/ published atomically by
links; and evaluate.py's one sequence KL."""

import json
import os

import pytest
import torch

import data
import sft
from evaluate import sequence_kl
from model import GPT, config_for
from data import split_heldout
from runtime import Dist, batch_at, guarded_step, save_checkpoint, split_batch


# -----------------------------------------------------------------------------
# batch_at: one batch of an epoch, without building the others


def test_batch_at_is_the_batch_data_batches_yields():
    for n in (0, 1, 7, 12, 13, 50):
        items = [f"item{i}" for i in range(n)]
        for batch_size, world_size in ((1, 1), (3, 1), (4, 1), (2, 3), (3, 2), (5, 2)):
            for seed, epoch in ((0, 0), (5, 2), (17, 9)):
                for rank in range(world_size):
                    expected = list(data.batches(items, batch_size, seed=seed, epoch=epoch, rank=rank,
                                                 world_size=world_size))
                    got = [batch_at(items, batch_size, seed, epoch, i, rank, world_size) for i in range(len(expected))]
                    assert got == expected, (n, batch_size, world_size, seed, epoch, rank)
                    with pytest.raises(IndexError):  # the incomplete last batch does not exist, as with drop_last
                        batch_at(items, batch_size, seed, epoch, len(expected), rank, world_size)


def test_batch_at_refuses_a_bad_rank_or_batch_size():
    with pytest.raises(ValueError, match="rank=2 world_size=2"):
        batch_at(list(range(10)), 2, 0, 0, 0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size=0"):
        batch_at(list(range(10)), 0, 0, 0, 0)


def test_split_batch():
    assert split_batch(64, 16, 1000, 0, Dist(world_size=2)) == (32, 16, 15, 15)  # max_steps 0: one epoch
    assert split_batch(64, 64, 1000, 40, Dist(world_size=2)) == (32, 32, 15, 40)  # micro capped at 32 per process
    with pytest.raises(SystemExit, match="batch_size 10 must be world_size 4"):
        split_batch(10, 2, 100, 0, Dist(world_size=4))
    with pytest.raises(SystemExit, match="micro_batch_size 24"):  # 64 per process is not a multiple of 24
        split_batch(64, 24, 100, 0, Dist())


# -----------------------------------------------------------------------------
# The held-out split


def test_split_heldout_reads_the_train_and_test_split_or_the_eval_dataset(tmp_path):
    calls = []
    load = lambda source, split, n: calls.append((source, split, n)) or [{"prompt": f"{source}/{split}"}]
    assert split_heldout(load, "default", "", 100, 8, "x") == ([{"prompt": "default/train"}], [{"prompt": "default/test"}])
    assert calls == [("default", "train", 100), ("default", "test", 8)]
    calls.clear()
    split_heldout(load, "data.jsonl", "other.jsonl", 0, 8, "x", manifest=str(tmp_path / "prompts.json"))
    assert calls == [("data.jsonl", "all", None), ("other.jsonl", "all", 8)]  # an explicit eval set: both whole
    manifest = json.load(open(tmp_path / "prompts.json"))
    assert len(manifest["train"]) == len(manifest["heldout"]) == 1 and manifest["train"] != manifest["heldout"]


def test_split_heldout_of_a_local_file_is_prompt_disjoint(tmp_path):
    import data
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i % 50}", "chosen": f"a{i}", "rejected": "b"}) + "\n"
                            for i in range(200)))  # 4 pairs per prompt
    load = lambda source, split, n: data.load_records(source, "preference", split, max_records=n)
    train, held = split_heldout(load, str(path), "", 0, 1000, "x")
    assert len(train) + len(held) == 200 and held
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}


# -----------------------------------------------------------------------------
# The non-finite guard's bookkeeping


def test_guarded_step_counts_skips_and_streaks(capsys):
    layer = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = layer.weight.detach().clone()

    def step(loss_value, skipped, streak):
        loss = layer(torch.ones(1, 2)).sum() * loss_value
        loss.backward()
        grad_norm, *counts = guarded_step(layer, optimizer, loss, 0.0, skipped, streak, 7, Dist())
        assert torch.isfinite(grad_norm).item() == (loss_value == 1.0)  # the norm is returned, non-finite too
        return tuple(counts)

    assert step(float("nan"), 2, 0) == (3, 1)
    assert torch.equal(layer.weight, before) and layer.weight.grad is None  # no update, gradients dropped
    assert "step 7: non-finite loss or gradient norm; update skipped (1 in a row)" in capsys.readouterr().out
    assert step(float("inf"), 3, 1) == (4, 2)
    assert step(1.0, 4, 2) == (4, 0)  # a good step ends the streak, the run's count stays
    assert not torch.equal(layer.weight, before)


# -----------------------------------------------------------------------------
# final/ is published atomically, by links to the last checkpoint's files


def tiny_gpt():
    model = GPT(config_for("tiny", vocab_size=30, tokenizer="char"))
    model.init_weights(seed=0)
    return model


@pytest.mark.parametrize("links", [True, False])
def test_final_is_the_last_checkpoint_without_its_train_state(tmp_path, monkeypatch, links):
    if not links:  # a file system without hard links gets copies
        monkeypatch.setattr(os, "link", lambda src, dst: (_ for _ in ()).throw(OSError(1, "Operation not permitted")))
    model, d, run_dir = tiny_gpt(), Dist(), str(tmp_path)
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(run_dir, 1, {"policy": model}, {"policy": (model, optimizer)}, {}, sft.Config(), d)
    assert not os.path.exists(tmp_path / "final")  # only the last step publishes
    ckpt = save_checkpoint(run_dir, 2, {"policy": model}, {"policy": (model, optimizer)}, {}, sft.Config(), d, final=True)
    final = tmp_path / "final"
    assert sorted(os.listdir(final)) == ["manifest.json", "policy", "run_config.json"]  # no train_state.pt
    assert sorted(os.listdir(tmp_path)) == ["ckpt_000001", "ckpt_000002", "final", "latest"]  # no final.tmp
    for name in ("policy/model.safetensors", "policy/config.json", "run_config.json"):
        same_inode = os.stat(final / name).st_ino == os.stat(os.path.join(ckpt, name)).st_ino
        assert same_inode == links, name
    loaded = GPT.from_pretrained(str(final / "policy"))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    # The checkpoint rotated away later leaves final/ whole (a link keeps the file).
    for step in (3, 4):
        save_checkpoint(run_dir, step, {"policy": model}, {"policy": (model, optimizer)}, {}, sft.Config(), d)
    assert not os.path.exists(ckpt)
    GPT.from_pretrained(str(final / "policy"))


# -----------------------------------------------------------------------------
# The sequence KL every stage logs


def test_sequence_kl_hand_worked():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -0.2, -0.3]])
    ref = torch.tensor([[-1.5, -1.0, float("nan")], [-0.4, -0.2, -0.1]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # row 0: (-1 + 1.5) + (-2 + 1) = -0.5, the NaN at the padded position left out; row 1: 0.3 + 0 - 0.2 = 0.1
    torch.testing.assert_close(sequence_kl(logp, ref, mask), torch.tensor([-0.5, 0.1]))


@pytest.mark.parametrize("raised,code", [(None, 0), (SystemExit(143), 143), (SystemExit("bad --flag"), 1),
                                         (SystemExit(None), 0)])
def test_run_main_under_torchrun_closes_loggers_and_keeps_the_exit_code(monkeypatch, capsys, raised, code):
    """A distributed rank leaves through os._exit (gloo's abort at exit, runtime.run_main): the loggers that
    atexit would close are closed first, and a SystemExit's code (preemption, a flag error) survives."""
    import runtime
    exits, closed = [], []

    def stage():
        if raised is not None:
            raise raised

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(runtime, "_TRACKER_CLOSERS", [lambda: closed.append("tb"), lambda: closed.append("wandb")])
    monkeypatch.setattr(runtime.os, "_exit", exits.append)
    runtime.run_main(stage)
    assert exits == [code] and closed == ["tb", "wandb"]
    assert ("bad --flag" in capsys.readouterr().err) == (code == 1)


def test_run_main_in_one_process_exits_as_usual(monkeypatch):
    import runtime
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(runtime.os, "_exit", lambda code: pytest.fail("os._exit in one process"))

    def preempted_stage():
        raise SystemExit(143)
    with pytest.raises(SystemExit) as e:
        runtime.run_main(preempted_stage)
    assert e.value.code == 143
