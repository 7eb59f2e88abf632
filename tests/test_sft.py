"""sft.py: the masked loss by hand, where its gradient goes, overfitting a tiny set, bit-exact resume,
and clear errors for unusable data. Multi-process runs are in test_distributed.py."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import data
import sft
from model import GPT, config_for, generate
from runtime import load_train_state

TOK = data.get_tokenizer("char")
V = TOK.vocab_size  # 28: a..z, "=", EOS
PAIRS = [("abc=", "cba"), ("hello=", "olleh"), ("ab=", "ba")]  # different lengths: the batch is right-padded


def encode(pairs, max_prompt_tokens=12, max_response_tokens=16):
    stats = data.TruncationStats()
    return [data.encode_pair(TOK, p, r, max_prompt_tokens, max_response_tokens, stats) for p, r in pairs]


def tiny_model(seed=0):
    model = GPT(config_for("tiny", vocab_size=V, tokenizer="char"))
    model.init_weights(seed=seed)
    return model


def logit_grad(batch, seed=0):
    """d sft_loss sum / d logits, (B, T, V), for a tiny model's logits on `batch`."""
    with torch.no_grad():
        logits = tiny_model(seed)(batch["input_ids"], attention_mask=batch["attention_mask"])
    logits.requires_grad_(True)
    loss_sum, _ = sft.sft_loss(logits, batch["input_ids"], batch["loss_mask"])
    (grad,) = torch.autograd.grad(loss_sum, logits)
    return grad


def predicts(pairs, T, first_target):
    """(B, T) bool, by hand: position t carries loss iff the token it predicts, t + 1, is a target, i.e.
    lies in [first_target(P), P + R) of its row (P, R = prompt and response lengths with EOS)."""
    out = torch.zeros(len(pairs), T, dtype=torch.bool)
    for b, (prompt, response) in enumerate(pairs):
        P, R = len(prompt), len(response)
        for t in range(T):
            out[b, t] = first_target(P) <= t + 1 < P + R
    return out


# -----------------------------------------------------------------------------
# The loss


def test_prompt_and_padding_positions_get_exactly_zero_gradient():
    pairs = encode(PAIRS)
    batch = data.collate_sft(pairs, TOK.eos_id)
    grad = logit_grad(batch)
    response_targets = predicts(pairs, batch["input_ids"].size(1), first_target=lambda P: P)
    assert response_targets.sum() == sum(len(r) for _, r in pairs)  # every response token, EOS included
    assert torch.all(grad[~response_targets] == 0), "a prompt or padding target leaks into the loss"
    assert torch.all(grad[response_targets].abs().amax(-1) > 0), "a response target carries no loss"


def test_train_on_prompt_puts_gradient_on_prompt_targets_but_not_padding():
    pairs = encode(PAIRS)
    batch = data.collate_sft(pairs, TOK.eos_id, train_on_prompt=True)
    grad = logit_grad(batch)
    # every real token but the first (nothing predicts it) is a target
    all_targets = predicts(pairs, batch["input_ids"].size(1), first_target=lambda P: 1)
    assert torch.all(grad[~all_targets] == 0), "a padding target leaks into the loss"
    assert torch.all(grad[all_targets].abs().amax(-1) > 0), "a prompt target carries no loss"


def test_uniform_logits_give_log_vocab_per_response_token():
    # ("abc=", "cba") -> 3 letters + EOS = 4 targets; ("ab=", "ba") -> 2 + EOS = 3 targets; 7 in all
    batch = data.collate_sft(encode([("abc=", "cba"), ("ab=", "ba")]), TOK.eos_id)
    logits = torch.zeros(*batch["input_ids"].shape, V)
    loss_sum, count = sft.sft_loss(logits, batch["input_ids"], batch["loss_mask"])
    assert count.item() == 7
    assert loss_sum.item() == pytest.approx(7 * math.log(V), rel=1e-6)
    assert (loss_sum / count).item() == pytest.approx(math.log(V), rel=1e-6)


def test_hand_worked_loss():
    # "a=" -> "b": ids [a, =, b, EOS] = [0, 26, 1, 27]; targets are b (predicted at t=1) and EOS (at t=2).
    batch = data.collate_sft(encode([("a=", "b")]), TOK.eos_id)
    assert batch["input_ids"].tolist() == [[0, 26, 1, 27]] and batch["loss_mask"].tolist() == [[0, 0, 1, 1]]
    logits = torch.zeros(1, 4, V)
    logits[0, 0] = torch.randn(V) * 10  # predicts "=", a prompt token: must not matter
    logits[0, 1, 1] = 2.0  # the right token b gets +2: nll = log(e^2 + 27) - 2
    logits[0, 2, 5] = 3.0  # a wrong token gets +3 where EOS is the target: nll = log(e^3 + 27) - 0
    logits[0, 3] = torch.randn(V) * 10  # predicts past the end: must not matter
    loss_sum, count = sft.sft_loss(logits, batch["input_ids"], batch["loss_mask"])
    expected = (math.log(math.exp(2) + 27) - 2) + math.log(math.exp(3) + 27)
    assert count.item() == 2
    assert loss_sum.item() == pytest.approx(expected, rel=1e-6)


def test_loss_matches_cross_entropy_with_ignored_targets():
    batch = data.collate_sft(encode(PAIRS), TOK.eos_id)
    logits = torch.randn(*batch["input_ids"].shape, V, generator=torch.Generator().manual_seed(0)) * 3
    loss_sum, count = sft.sft_loss(logits, batch["input_ids"], batch["loss_mask"])
    targets = batch["input_ids"][:, 1:].masked_fill(batch["loss_mask"][:, 1:] == 0, -100)
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, V), targets.reshape(-1), ignore_index=-100, reduction="sum")
    assert count.item() == (targets != -100).sum().item()
    torch.testing.assert_close(loss_sum, reference, rtol=1e-6, atol=1e-5)


# -----------------------------------------------------------------------------
# Whole runs of sft.main, in this process (one process: shard_model is a no-op)

# 16 reverse-task demonstrations of 3 to 5 letters.
WORDS = ["gaeh", "ehfd", "cecbe", "cebbf", "bfgf", "dhhea", "abgah", "dfbd",
         "ddchb", "fhb", "ebfd", "ehbgf", "decdc", "ehb", "cca", "ged"]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def run_sft(run_dir, **overrides):
    args = dict(run_dir=run_dir, model_size="tiny", dataset="default", max_train_examples=48, batch_size=8,
                micro_batch_size=8, max_steps=12, lr=1e-2, warmup_steps=3, eval_every=1000, save_every=1000,
                log_every=1, eval_examples=8, seed=0, device="cpu", profile="toy")
    args.update(overrides)
    sft.main([f"--{k}={v}" for k, v in args.items()])


def metric_rows(run_dir):
    with open(f"{run_dir}/metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_overfits_sixteen_examples(tmp_path):
    path = write_jsonl(tmp_path / "rev16.jsonl", [{"prompt": w + "=", "response": w[::-1]} for w in WORDS])
    run_dir = str(tmp_path / "run")
    run_sft(run_dir, dataset=path, eval_dataset=path, max_train_examples=0, batch_size=16, micro_batch_size=16,
            max_steps=150, lr=3e-3, warmup_steps=10, log_every=10, eval_examples=16)
    rows = metric_rows(run_dir)
    train = [r["train/loss"] for r in rows if "train/loss" in r]
    # Measured: starts near log(28) = 3.3, ends at 0.045-0.052 over seeds 0-3 (cosine decay to 0).
    assert train[0] > 2.0 and train[-1] < 0.1, train
    assert [r["eval/loss"] for r in rows if "eval/loss" in r][-1] < 0.1
    # Memorized: greedy decoding of the published policy reproduces every demonstration, then stops.
    policy = GPT.from_pretrained(str(tmp_path / "run" / "final" / "policy")).eval()
    ids, mask = data.pad_left([TOK.encode(w + "=") for w in WORDS], TOK.eos_id)
    seqs, _ = generate(policy, ids, mask, 8, temperature=0, eos_id=TOK.eos_id, pad_id=TOK.eos_id)
    got = [TOK.decode(row).split(data.EOS_TEXT)[0] for row in seqs[:, ids.size(1):].tolist()]
    assert got == [w[::-1] for w in WORDS]


def assert_same_tree(a, b, where="state"):
    """Equal structure, equal plain values, torch.equal tensors. A list equals a tuple (a resumed AdamW's
    betas come back as a list)."""
    seq = (list, tuple)
    assert type(a) is type(b) or (isinstance(a, seq) and isinstance(b, seq)), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, seq):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


TIMING = ("tokens_per_s", "mfu")


def test_resume_is_bit_exact(tmp_path):
    # 48 examples / batch 8 = 6 steps per epoch: 12 steps cross an epoch boundary; micro 4 = 2 accumulated
    # micro-batches; eval at 4, 8, 12 also exercises the sampler's seeding across the interruption.
    common = dict(micro_batch_size=4, eval_every=4)
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    run_sft(straight, **common)
    run_sft(split, stop_after=5, **common)
    with open(f"{split}/latest") as f:
        assert f.read().strip() == "ckpt_000005"
    assert load_train_state(f"{split}/ckpt_000005")["step"] == 5
    run_sft(split, resume=True, **common)

    a, b = (load_file(f"{r}/final/policy/model.safetensors") for r in (straight, split))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa, sb = (load_train_state(f"{r}/ckpt_000012") for r in (straight, split))
    assert sa["step"] == sb["step"] == 12
    assert_same_tree(sa["optimizers"], sb["optimizers"], "optimizers")
    assert len(sa["optimizers"]["policy"]["state"]) > 0  # not trivially equal
    ra, rb = ([{k: v for k, v in r.items() if k not in TIMING} for r in metric_rows(d)] for d in (straight, split))
    assert [r["step"] for r in ra if "train/loss" in r] == list(range(1, 13))
    assert ra == rb


# -----------------------------------------------------------------------------
# Unusable data stops the run with a message, not a stack trace from deep inside


def test_too_few_usable_examples_is_a_clear_error(tmp_path):
    path = write_jsonl(tmp_path / "few.jsonl", [{"prompt": "abc=", "response": "cba"}, {"prompt": "ab=", "response": ""},
                                                {"prompt": "hello=", "response": "olleh"}])
    with pytest.warns(UserWarning, match="empty response"), pytest.raises(SystemExit, match="2 usable training examples"):
        run_sft(str(tmp_path / "run"), dataset=path, eval_dataset=path, max_train_examples=0, batch_size=8)


def empty_responses_file(tmp_path):
    return write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "abc=", "response": ""},
                                                  {"prompt": "ab=", "response": "  "}])


@pytest.mark.filterwarnings("ignore:.*skipped 2 of 2 records")
def test_zero_usable_examples_names_the_file_and_the_reason(tmp_path):
    path = empty_responses_file(tmp_path)
    with pytest.raises((SystemExit, data.DataError)) as err:
        run_sft(str(tmp_path / "run"), dataset=path, eval_dataset=path, max_train_examples=0)
    message = str(err.value)
    assert path in message and "empty response" in message and "2 skipped" in message, message
    assert not (tmp_path / "run" / "latest").exists()


@pytest.mark.filterwarnings("ignore:.*skipped 2 of 2 records")
def test_zero_usable_examples_is_a_system_exit(tmp_path):
    path = empty_responses_file(tmp_path)
    with pytest.raises(SystemExit, match="empty response"):
        run_sft(str(tmp_path / "run"), dataset=path, eval_dataset=path, max_train_examples=0)


def test_resume_at_the_last_step_republishes_a_missing_final(tmp_path):
    """A copy to final/ that failed (full disk) leaves the last checkpoint complete; --resume publishes it."""
    import shutil
    run_dir = str(tmp_path / "run")
    run_sft(run_dir, max_steps=3)
    expected = load_file(f"{run_dir}/final/policy/model.safetensors")
    shutil.rmtree(f"{run_dir}/final")
    run_sft(run_dir, max_steps=3, resume=True)
    again = load_file(f"{run_dir}/final/policy/model.safetensors")
    assert all(torch.equal(expected[k], again[k]) for k in expected)


def test_limits_beyond_the_context_are_refused_before_any_work(tmp_path):
    # docs/gpus.md's GPU flags on cpu-small (block_size 64) used to fail with an AssertionError in the first forward.
    with pytest.raises(SystemExit, match=r"--max_prompt_tokens \+ --max_response_tokens = 384 \+ 128 tokens do not fit "
                                         r"the model's context of 64"):
        run_sft(str(tmp_path / "run"), max_prompt_tokens=384, max_response_tokens=128)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_scratch_model_is_sized_by_flags(tmp_path):
    run_sft(str(tmp_path / "run"), n_layer=3, n_head=3, n_embd=24, block_size=40, max_steps=1)
    config = json.load(open(tmp_path / "run" / "final" / "policy" / "config.json"))
    assert (config["n_layer"], config["n_head"], config["n_embd"], config["n_positions"]) == (3, 3, 24, 40)


def test_char_tokenizer_on_real_text_says_how_to_choose_another():
    with pytest.raises(data.DataError, match="--tokenizer=gpt2"):
        data.get_tokenizer("char").encode("Human: hi\n")


def test_report_to_tensorboard_writes_the_metrics(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is a dev dependency (requirements-dev.txt)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_sft(str(tmp_path / "run"), max_steps=3, report_to="tensorboard")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    jsonl = [r["train/loss"] for r in metric_rows(str(tmp_path / "run")) if "train/loss" in r]
    assert losses == pytest.approx(jsonl, rel=1e-6) and len(losses) == 3


def test_report_to_typo_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="--report_to='tensorbord'"):
        run_sft(str(tmp_path / "run"), report_to="tensorbord")


def test_report_to_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is a dev dependency (requirements-dev.txt)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_sft(str(tmp_path / "run"), max_steps=2, report_to="wandb")
    import wandb
    wandb.finish()
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))  # the offline run's log file


def test_real_data_profile_replaces_toy_defaults_and_says_so(capsys):
    from runtime import parse_config
    toy = parse_config(sft.Config, [], {"real": sft.REAL_DATA})
    assert (toy.profile, toy.lr, toy.max_prompt_tokens, toy.packing) == ("toy", 2e-3, 12, True)
    real = parse_config(sft.Config, ["--dataset=hh.jsonl", "--lr=5e-5"], {"real": sft.REAL_DATA})
    assert (real.profile, real.lr, real.max_prompt_tokens, real.max_response_tokens) == ("real", 5e-5, 384, 128)
    assert not real.packing
    assert parse_config(sft.Config, ["--dataset=hh.jsonl", "--packing"], {"real": sft.REAL_DATA}).packing
    assert "profile 'real' in force (max_prompt_tokens=384" in capsys.readouterr().out
    forced = parse_config(sft.Config, ["--dataset=hh.jsonl", "--profile=toy"], {"real": sft.REAL_DATA})
    assert (forced.profile, forced.lr) == ("toy", 2e-3)
    with pytest.raises(SystemExit, match="--profile='rael'"):
        parse_config(sft.Config, ["--profile=rael"], {"real": sft.REAL_DATA})
