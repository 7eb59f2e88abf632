"""Reward functions in stage 3 (RLVR): a TRL-style function runs unchanged in ppo.py with every estimator, gets the
record's fields as keyword lists, is logged under TRL's names, and a bad one stops the run with an error that names
it and the row, before any optimizer step, so the last checkpoint resumes. TRL's own GRPOTrainer is run on the same
completions with the same functions and weights (None included) for the aggregation parity."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import data
import ppo

ROOT = Path(__file__).resolve().parents[1]

# A TRL user's function, written for GRPOTrainer: keywords, a record field ("answer"), trainer_state, log_metric.
USER_FN = '''
def exact_answer(prompts, completions, completion_ids, answer, trainer_state, log_metric, **kwargs):
    assert len(prompts) == len(completions) == len(completion_ids) == len(answer)
    for p, a, ids in zip(prompts, answer, completion_ids):
        assert a == p.partition("=")[0][::-1], (p, a)  # the field arrives aligned with its row
        assert all(isinstance(i, int) for i in ids)
    log_metric("exact/frac", sum(c == a for c, a in zip(completions, answer)) / len(answer))
    return [float(c == a) + 0.0 * trainer_state.global_step for c, a in zip(completions, answer)]
'''

# Bad functions; each misbehaves from the second update on (trainer_state.global_step is 0-based), so the first
# update's checkpoint exists when it fails.
BAD_FNS = '''
def raises(completion_ids, trainer_state, **kw):  # on the completions whose first token id is even
    return [1.0 / (ids[0] % 2) if trainer_state.global_step >= 1 else 0.0 for ids in completion_ids]

def wrong_count(prompts, trainer_state, **kw):
    return [0.0] * (len(prompts) - (trainer_state.global_step >= 1))

def returns_nan(prompts, trainer_state, **kw):
    return [float("nan") if trainer_state.global_step >= 1 and i == 2 else 0.5 for i in range(len(prompts))]

def returns_inf(prompts, trainer_state, **kw):
    return [float("inf") if trainer_state.global_step >= 1 and i == 1 else 0.5 for i in range(len(prompts))]

def none_on_row_5(prompts, trainer_state, **kw):
    return [None if trainer_state.global_step >= 1 and i == 5 else 0.5 for i in range(len(prompts))]

def fine(prompts, **kw):
    return [0.25] * len(prompts)
'''


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("reward_fns")
    (base / "user_fn.py").write_text(USER_FN)
    (base / "bad_fns.py").write_text(BAD_FNS)
    # A prompt file whose records carry a ground-truth field, as a checkable task's do.
    rng = __import__("random").Random(0)
    with open(base / "prompts.jsonl", "w") as f:
        for _ in range(200):
            p = data.task_prompt(rng)
            f.write(json.dumps({"prompt": p, "answer": data.gold_target(p)}) + "\n")
    return base


def args(checkpoints, run_dir, *extra):
    return [f"--sft={checkpoints / 'sft'}", "--reward_model=none", f"--run_dir={run_dir}", "--num_updates=2",
            "--rollout_batch_size=4", "--micro_batch_size=8", "--response_length=6", "--eval_prompts=8",
            "--eval_every=2", "--log_every=1", "--save_every=1", "--profile=toy", *extra]


GROUP = ["--samples_per_prompt=2", "--advantage_whitening=none"]
ESTIMATORS = {
    "ppo_gae": ["--advantage_estimator=gae"],
    "grpo": ["--advantage_estimator=grpo", "--eval_greedy", *GROUP],
    "dr_grpo": ["--advantage_estimator=grpo", "--group_std_scaling=none", "--loss_aggregation=seq_mean_token_sum_norm",
                *GROUP],
    "rloo": ["--advantage_estimator=rloo", *GROUP],
    "reinforce_pp": ["--advantage_estimator=reinforce_pp", "--advantage_whitening=global"],
}


@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
def test_trl_style_function_with_every_estimator(checkpoints, files, tmp_path, estimator):
    """The user's function unchanged, from a file, on records with an "answer" field, plus data:reverse_reward, weighted."""
    ppo.main(args(checkpoints, tmp_path, f"--dataset={files / 'prompts.jsonl'}", "--reward_weights=1.0,0.5",
                  f"--reward_fn={files / 'user_fn.py'}:exact_answer,data:reverse_reward", *ESTIMATORS[estimator]))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train = [r for r in rows if "objective/scores" in r]
    assert len(train) == 2 and (tmp_path / "final" / "policy" / "model.safetensors").exists()
    for r in train:
        for key in ("rewards/exact_answer/mean", "rewards/exact_answer/std", "rewards/reverse_reward/mean",
                    "rewards/reverse_reward/std", "exact/frac"):
            assert key in r and r[key] == r[key], key  # present and not NaN
        assert r["rewards/exact_answer/mean"] == pytest.approx(r["exact/frac"])  # log_metric reached the metrics
    held_out = [r for r in rows if "eval/rewards/reverse_reward/mean" in r]
    assert len(held_out) == 2  # at the start and at the end
    if estimator == "grpo":  # --eval_greedy: T = 0 answers too, the same for both functions' keys
        assert all("eval/greedy/rewards/reverse_reward/mean" in r for r in held_out)
        # The first held-out answers of each evaluation, sampled and greedy, with the weighted score of each.
        weighted = lambda p, c: float(c == p.partition("=")[0][::-1]) + 0.5 * data.gold_reward(p, c)  # noqa: E731
        for r in held_out:
            assert len(r["eval/samples"]) == 3  # --num_samples_shown's default
            for s in r["eval/samples"]:
                assert s["score"] == pytest.approx(weighted(s["prompt"], s["response"]))
                assert s["greedy_score"] == pytest.approx(weighted(s["prompt"], s["greedy"]))
        # plots.py rlvr sets them before / after in its report.
        import plots
        plots.main(["rlvr", f"--runs=grpo:{tmp_path}", "--metric=reverse_reward", f"--out={tmp_path / 'rlvr'}"])
        report = (tmp_path / "rlvr" / "rlvr.md").read_text()
        first, last = held_out[0]["eval/samples"][0], held_out[-1]["eval/samples"][0]
        assert f"## grpo: the first held-out problems at update 0 and 2 ({tmp_path}; reward in brackets)" in report
        assert f"`{first['greedy']}` ({first['greedy_score']:.0f}) | `{last['greedy']}` ({last['greedy_score']:.0f})" in report


def test_reward_function_alone_equals_its_weighted_score(checkpoints, tmp_path):
    """With the missing-EOS penalty off, objective/scores is exactly weight x the function's mean."""
    ppo.main(args(checkpoints, tmp_path, "--reward_fn=data:reverse_reward", "--reward_weights=2.0",
                  "--missing_eos_mode=none", "--num_updates=1"))
    row = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if "objective/scores" in line][0]
    assert row["objective/scores"] == pytest.approx(2.0 * row["rewards/reverse_reward/mean"], abs=1e-6)


def test_reward_model_plus_function(checkpoints, tmp_path):
    """The RM is one more reward function: score = rm_weight x RM + sum of weighted functions, both logged."""
    ppo.main(args(checkpoints, tmp_path, f"--reward_model={checkpoints / 'rm'}", "--reward_fn=data:reverse_reward",
                  "--reward_model_weight=0.5", "--missing_eos_mode=none", "--num_updates=1"))
    row = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if "objective/scores" in line][0]
    expected = 0.5 * row["rewards/reward_model/mean"] + row["rewards/reverse_reward/mean"]
    assert row["objective/scores"] == pytest.approx(expected, abs=1e-5)


BAD = {  # each bad function's error: it names the function and the row
    "raises": r"'raises' raised ZeroDivisionError: .* \(at update 2, rank 0, row \d+: prompt",
    "wrong_count": r"'wrong_count' returned 15 rewards for 16 completions \(update 2",
    "returns_nan": r"'returns_nan' returned nan for update 2, rank 0, row 2: prompt",
    "returns_inf": r"'returns_inf' returned inf for update 2, rank 0, row 1: prompt",
    "none_on_row_5": r"every reward function \(none_on_row_5\) returned None for update 2, rank 0, row 5: prompt",
}


@pytest.mark.parametrize("fn", ["raises", "none_on_row_5"])
def test_bad_function_stops_the_run_before_the_update_and_the_checkpoint_resumes(checkpoints, files, tmp_path, fn):
    """Through ppo.main: the function misbehaves on update 2; the error names it and the row, and the last
    checkpoint (update 1's) is whole and resumes with a good function."""
    run = args(checkpoints, tmp_path, f"--reward_fn={files / 'bad_fns.py'}:{fn}", "--advantage_estimator=grpo",
               *GROUP, "--num_updates=3", "--eval_at_start=false")
    run = [a if not a.startswith("--rollout_batch_size") else "--rollout_batch_size=8" for a in run]  # 16 rows
    with pytest.raises(ppo.RewardFunctionError, match=BAD[fn]):
        ppo.main(run)
    assert open(tmp_path / "latest").read().strip() == "ckpt_000001"
    assert not (tmp_path / "final").exists()
    ppo.main([a.replace(f"bad_fns.py:{fn}", "bad_fns.py:fine") for a in run] + ["--resume"])
    assert (tmp_path / "final" / "policy" / "model.safetensors").exists()


@pytest.mark.parametrize("fn", sorted(BAD))
def test_bad_function_errors_name_the_function_and_the_row(files, fn):
    """Each bad function on the 16 rows of an update, through the step-2 scorer (ppo.function_rewards)."""
    fns = ppo.load_reward_functions(f"{files / 'bad_fns.py'}:{fn}", "")
    rows = [{"prompt": p} for p in ("abc=", "dd=", "ponm=", "kji=")] * 4
    ids = [[i % 3, 27] for i in range(16)]
    extra = dict(trainer_state=types.SimpleNamespace(global_step=1, max_steps=3), log_metric=lambda *a: None)
    with pytest.raises(ppo.RewardFunctionError, match=BAD[fn]):
        ppo.function_rewards(fns, None, 1.0, rows, ["x"] * 16, ids, extra, "update 2, rank 0, ")
    extra["trainer_state"].global_step = 0  # the same function behaves on the first update
    ppo.function_rewards(fns, None, 1.0, rows, ["x"] * 16, ids, extra, "update 1, rank 0, ")


def test_loading_errors_are_clear(files):
    for spec, message in (("nope_module:f", "cannot import nope_module"), ("data:nope", "data has no function 'nope'"),
                          ("missing.py:f", "no such file"), ("data", "module:function"),
                          ("data:reverse_reward,data:reverse_reward", "two reward functions named")):
        with pytest.raises(SystemExit, match=message):
            ppo.load_reward_functions(spec, "")
    with pytest.raises(SystemExit, match="2 weights for 1"):
        ppo.load_reward_functions("data:reverse_reward", "1,2")
    with pytest.raises(SystemExit, match="needs --reward_fn"):
        ppo.validate(ppo.Config(reward_model="none"))


def test_combine_rewards_by_hand():
    # Row 0: 1*1 + 0.5*4 = 3; row 1: the second function said None -> 1*2 = 2; row 2: all None -> NaN (unscorable).
    per_func = torch.tensor([[1.0, 4.0], [2.0, float("nan")], [float("nan"), float("nan")]])
    out = ppo.combine_rewards(per_func, torch.tensor([1.0, 0.5]))
    assert out[:2].tolist() == [3.0, 2.0] and out[2].isnan()


def test_resume_is_exact_with_a_reward_function(checkpoints, tmp_path):
    extra = ["--reward_fn=data:reverse_reward", "--advantage_estimator=grpo", *GROUP, "--num_updates=4",
             "--save_every=100"]
    ppo.main(args(checkpoints, tmp_path / "a", *extra))
    ppo.main(args(checkpoints, tmp_path / "b", *extra, "--stop_after=2"))
    ppo.main(args(checkpoints, tmp_path / "b", *extra, "--resume"))
    a = load_file(str(tmp_path / "a" / "final" / "policy" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "policy" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda path: [{k: v for k, v in json.loads(l).items() if not k.startswith("time/")} for l in open(path)]
    assert strip(tmp_path / "a" / "metrics.jsonl") == strip(tmp_path / "b" / "metrics.jsonl")


# -----------------------------------------------------------------------------
# Parity with TRL's GRPOTrainer: the same completions, the same two functions and weights, None on some rows.

def test_aggregation_matches_trl_grpo_trainer(tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    import test_parity_trl_grpo as P
    import trl_harness as H
    from model import GPT
    from runtime import Dist

    dirs = H.save_initial_models(str(tmp_path / "models"))
    table = P.reward_table()
    weights = [1.0, 0.5]

    def table_reward(completion_ids, **kw):
        return [table[tuple(ids)] for ids in completion_ids]

    def length_or_none(completion_ids, **kw):  # None for every completion that ends with EOS but is short
        return [None if len(ids) <= 2 else float(len(ids)) for ids in completion_ids]

    # TRL: P.run_trl with our two functions and weights (reward_funcs replaced by patching the GRPOTrainer call).
    import trl
    real_init, made = trl.GRPOTrainer.__init__, []

    def init_with_funcs(self, *a, reward_funcs=None, args=None, **k):
        args.reward_weights = weights
        made.append(self)
        return real_init(self, *a, reward_funcs=[table_reward, length_or_none], args=args, **k)
    trl.GRPOTrainer.__init__ = init_with_funcs
    try:
        trl_out = P.run_trl(dirs, str(tmp_path / "trl"), "grpo", loss_type="dapo", beta=0.0, scale_rewards="group")
    finally:
        trl.GRPOTrainer.__init__ = real_init

    # Ours: make_experience with the same functions as --reward_fn would load them, no reward model.
    cfg = P.our_config("trl_grpo")
    cat = lambda key: torch.cat([x[key] for x in trl_out["inputs"]])  # noqa: E731
    prompt_ids, completion_ids = cat("prompt_ids"), cat("completion_ids")
    policy, ref = GPT.from_pretrained(dirs["policy"]), GPT.from_pretrained(dirs["ref"])
    tok = types.SimpleNamespace(eos_id=H.EOS, decode=lambda ids: " ".join(map(str, ids)))
    fns = [("table_reward", table_reward, weights[0]), ("length_or_none", length_or_none, weights[1])]
    rows = [{"prompt": "p"}] * len(prompt_ids)
    exp = ppo.make_experience(policy, None, ref, None, torch.cat([prompt_ids, completion_ids], 1), prompt_ids != H.PAD,
                              torch.zeros(completion_ids.shape), 0.0, tok, cfg, Dist(), reward_fns=fns, fn_rows=rows)
    trl_adv = torch.cat([x["advantages"] for x in trl_out["inputs"]])
    assert exp["rewards_per_func"][:, 1].isnan().sum() == 2  # two short completions left unscored by the second
    torch.testing.assert_close(exp["advantages"][:, 0], trl_adv.float(), atol=1e-6, rtol=1e-5)
    ours = ppo.reward_function_metrics(exp["rewards_per_func"], exp["reward_names"], Dist())
    logged = made[0].state.log_history[0]
    for key, value in ours.items():
        assert value == pytest.approx(logged[key], abs=1e-5), key
    assert {k for k in logged if k.startswith("rewards/")} == set(ours)


@pytest.mark.slow
def test_each_rank_scores_its_own_rows(checkpoints, files, tmp_path):
    """torchrun, 2 processes (gloo, FSDP2): each rank calls the function on its own rows only, the two ranks' rows
    are the whole rollout, and the logged mean is over both."""
    spy = tmp_path / "spy.py"
    spy.write_text("import json, os\n"
                   "def spy(prompts, completions, **kw):\n"
                   f"    with open(os.path.join({str(tmp_path)!r}, 'rank' + os.environ['RANK'] + '.jsonl'), 'a') as f:\n"
                   "        f.write(json.dumps(prompts) + '\\n')\n"
                   "    return [float(len(c)) for c in completions]\n")
    run = args(checkpoints, tmp_path / "run", f"--reward_fn={spy}:spy", "--advantage_estimator=grpo", *GROUP,
               "--num_updates=1", "--eval_at_start=false", "--rollout_batch_size=8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", str(ROOT / "ppo.py"), *run], env=env,
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    from runtime import batch_at
    prompts = [r["prompt"] for r in data.load_records("default", "prompt", "train")]
    for rank in (0, 1):
        first_call = json.loads(open(tmp_path / f"rank{rank}.jsonl").readline())  # its rollout (then held-out eval)
        mine = [prompts[i] for i in batch_at(list(range(len(prompts))), 4, 0, 0, 0, rank, 2) for _ in range(2)]
        assert first_call == mine, rank  # 4 prompts x 2 samples: this rank's rows and no other's
    row = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl") if "objective/scores" in l][0]
    assert "rewards/spy/mean" in row


# -----------------------------------------------------------------------------
# The built-in checkable task

def test_arithmetic_task_split_answers_and_determinism():
    train, test = data.arithmetic_problems("train"), data.arithmetic_problems("test")
    assert not set(train) & set(test) and len(train) + len(test) == 100 * 100 and 800 < len(test) < 1200
    records = data.load_records("arithmetic", "prompt", "test", max_records=300, seed=3)
    assert records == data.load_records("arithmetic", "prompt", "test", max_records=300, seed=3)  # seeded
    assert records != data.load_records("arithmetic", "prompt", "test", max_records=300, seed=4)
    assert len({r["prompt"] for r in records}) == 300  # without replacement while problems last
    for r in records:
        assert data.is_heldout_prompt(r["prompt"])  # the one split rule of every stage
        a, b = map(int, r["prompt"].split("What is ")[1].split("?")[0].split(" + "))
        assert r["answer"] == str(a + b)
    assert data.text_to_messages(records[0]["prompt"])[0]["role"] == "user"  # renders with a chat template


def test_arithmetic_reward_reads_the_last_number():
    cases = [("The answer is 12.", "12", 1.0), ("7 + 5 = 12", "12", 1.0), ("12, no wait, 13", "12", 0.0),
             ("1,234", "1234", 1.0), ("12.0", "12", 1.0), ("twelve", "12", 0.0), ("", "12", 0.0), ("-3", "-3", 1.0),
             ("112", "12", 0.0)]
    got = data.arithmetic_reward([c for c, _, _ in cases], [a for _, a, _ in cases])
    assert got == [r for _, _, r in cases]
    # TRL's conversational completions run through the same function.
    assert data.arithmetic_reward([[{"role": "assistant", "content": "It is 9"}]], ["9"]) == [1.0]


def test_share_prompts_trains_the_same(checkpoints, tmp_path):
    """--share_prompts (each distinct prompt through the trunk once) with a reference in the loss: the same samples,
    and the weights after two updates equal to float32 rounding."""
    base = ["--reward_fn=data:reverse_reward", "--advantage_estimator=grpo", "--kl_location=loss", "--kl_estimator=k3",
            "--kl_coef=0.1", "--old_logprobs=recompute", "--eval_every=100", "--eval_at_start=false", *GROUP]
    weights, kls = {}, {}
    for share in ("false", "true"):
        run = tmp_path / share
        ppo.main(args(checkpoints, run, *base, f"--share_prompts={share}"))
        weights[share] = load_file(run / "final" / "policy" / "model.safetensors")
        kls[share] = [json.loads(line)["objective/kl"] for line in open(run / "metrics.jsonl") if "objective/kl" in line]
    for k, v in weights["false"].items():
        torch.testing.assert_close(weights["true"][k], v, atol=1e-6, rtol=1e-5, msg=k)
    assert kls["true"] == pytest.approx(kls["false"], abs=1e-5)


def test_skip_unused_reference_trains_the_same(checkpoints, tmp_path):
    """--skip_unused_reference at beta 0 (TRL GRPO's default): no reference forward, the same weights after two
    updates, objective/kl NaN; at beta > 0 the flag changes nothing (the reference is used)."""
    base = ["--reward_fn=data:reverse_reward", "--advantage_estimator=grpo", "--kl_location=loss", "--kl_estimator=k3",
            *GROUP]
    weights, kls, forwards = {}, {}, {}
    for beta in ("0", "0.1"):
        for skip in ("false", "true"):
            run = tmp_path / f"b{beta}_{skip}"
            calls = []
            real = ppo.response_logprobs
            ppo.response_logprobs = lambda model, *a, **k: (calls.append(model), real(model, *a, **k))[1]
            try:
                ppo.main(args(checkpoints, run, *base, f"--kl_coef={beta}", f"--skip_unused_reference={skip}",
                              "--eval_every=100", "--eval_at_start=false"))
            finally:
                ppo.response_logprobs = real
            weights[beta, skip] = load_file(run / "final" / "policy" / "model.safetensors")
            kls[beta, skip] = [json.loads(line)["objective/kl"] for line in open(run / "metrics.jsonl")
                               if "objective/kl" in line]
            forwards[beta, skip] = len(calls)
    assert forwards["0", "true"] == forwards["0", "false"] - 2  # one reference forward per update fewer
    assert forwards["0.1", "true"] == forwards["0.1", "false"]
    for beta in ("0", "0.1"):
        for k, v in weights[beta, "false"].items():
            assert torch.equal(v, weights[beta, "true"][k]), (beta, k)
    assert all(k != k for k in kls["0", "true"]) and all(k == k for k in kls["0", "false"])  # NaN only when skipped
    assert kls["0.1", "true"] == kls["0.1", "false"]
