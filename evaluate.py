"""Sampling and scoring policies on held-out prompts: used inside every stage's evaluation, and by
launch.sh for the final report:

    python evaluate.py --policies=sft:runs/sft/final,ppo:runs/ppo/final --reference=runs/sft/final \
        --reward_model=runs/rm/final --out=runs/report

The report compares the policies on the same held-out prompts, same sampling temperature and seed:
mean gold reward (default task), mean learned reward, KL to the reference, response length and the
fraction ending with EOS; plus the reward model's held-out accuracy, each stage's wall time, and a
few side-by-side samples. Written as report.md and report.json, and printed.
"""

import contextlib
import json
import os
import time
from dataclasses import dataclass

import torch

import data
from data import pad_left
from model import generate, token_logprobs
from runtime import autocast, init_distributed, load_model, parse_config, unsharded


@torch.no_grad()
def sample_responses(model, tok, prompts: list[str], d, max_new_tokens: int, temperature: float, seed: int,
                     batch_size: int = 64, max_prompt_tokens: int = 512, bf16: bool = True) -> list[dict]:
    """Generate one response per prompt. Returns dicts with the prompt, the response text (EOS
    stripped), whether it ended with EOS, its length in tokens, the token ids (for scoring), and
    prompt_shown: the end of the prompt as the model saw it, at most 160 characters, for printing.

    Every rank generates for every prompt (the model may be sharded, so all ranks take part in each
    forward); the generator is seeded per batch, so results do not depend on the world size."""
    was_training = model.training
    model.eval()
    out = []
    with unsharded(model), autocast(d, bf16):
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            prompt_ids = [tok.encode(p)[-max_prompt_tokens:] for p in chunk]
            ids, mask = pad_left(prompt_ids, tok.eos_id)
            gen = torch.Generator(device=d.device).manual_seed(seed * 100_003 + start)
            seqs, _ = generate(model, ids.to(d.device), mask.to(d.device), max_new_tokens, temperature=temperature,
                               eos_id=tok.eos_id, pad_id=tok.eos_id, generator=gen)
            for p, p_ids, row in zip(chunk, prompt_ids, seqs[:, ids.size(1):].tolist()):
                ended = tok.eos_id in row
                resp = row[:row.index(tok.eos_id) + 1] if ended else row
                text = tok.decode(resp[:-1] if ended else resp)
                seen = tok.decode(p_ids)  # what the model saw: the prompt cut to max_prompt_tokens
                out.append({"prompt": p, "response": text, "ended": ended, "length": len(resp),
                            "prompt_ids": p_ids, "response_ids": resp,
                            "prompt_shown": seen if len(seen) <= 160 else "..." + seen[-157:]})
    model.train(was_training)
    return out


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 mask -> (B,) index of each row's last real token: the EOS of prompt + response, or the last
    kept token of a response cut by truncation or by the length limit.

    The rightmost 1, so it works for right padding (length - 1) and left padding (T - 1) alike, as HF's
    GPT2ForSequenceClassification pools (there from input_ids != pad_token_id; we pad with EOS, so the mask
    must decide). Reading the score at the EOS is OpenRLHF's, verl's and DS-Chat's convention."""
    positions = torch.arange(attention_mask.size(1), device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


def sequence_rewards(scalars: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-position scalars (B, T) of the `score` head -> the raw reward of each sequence (B,), float32, read at
    its last real token. The one read-out of a reward: the reward model trains and normalizes on it,
    reward_scores (PPO's score, the report's learned reward) applies the normalization to it."""
    return scalars.float().gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)


def reward_scores(reward_model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The reward model's normalized score (B,) of each sequence: gain * raw + bias, with the gain and bias that
    reward_model.py stored in the checkpoint's config (mean 0 on the normalization set)."""
    scalars = reward_model(input_ids, attention_mask=attention_mask, head="score")
    raw = sequence_rewards(scalars, attention_mask)
    return reward_model.config.reward_gain * raw + reward_model.config.reward_bias


def reward_model_paths(spec: str) -> list[str]:
    """The reward-model checkpoint(s) that --reward_model names: a run directory with ensemble.json (written by
    reward_model.py --ensemble_size=K) gives its K members' final/ directories; a comma-separated list gives each
    path; anything else is one checkpoint. Every member is a normal RM checkpoint that loads on its own."""
    manifest = os.path.join(spec, "ensemble.json")
    if os.path.isfile(manifest):
        return [os.path.join(spec, m["path"]) for m in json.load(open(manifest))["members"]]
    return [p for p in spec.split(",") if p]


def sequence_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k1 estimate of the sequence KL(pi || ref) of sampled responses: (B, N) token log-probs of the sampled tokens
    under pi and ref, mask (B, N) marking response tokens -> (B,) sum of log pi - log ref over them, float32.
    What ppo.py logs as objective/kl (OpenAI 2019, TRL: k1 summed over the response) and every stage as eval/kl.
    torch.where, not a product, so a non-finite value at a padded position cannot leak in."""
    diff = logp.float() - ref_logp.float()
    return torch.where(mask.bool(), diff, torch.zeros_like(diff)).sum(-1)


@torch.no_grad()
def score_samples(samples, policy, ref, reward_model, tok, temperature, d, batch_size=64, bf16=True, reduce=None,
                  visit=contextlib.nullcontext):
    """Learned reward (normalized) and sequence KL(policy || ref) (sequence_kl, log-probs of logits / T) of
    sampled responses. Without a reward model (DPO), the learned rewards are an empty list. reward_model may be a
    list (an ensemble): reduce maps the members' scores (K, B) to (B,) (ppo.ensemble_reward; default the mean),
    and each member is used inside visit(member) (ppo.py's offloading)."""
    members = reward_model if isinstance(reward_model, (list, tuple)) else [reward_model] if reward_model is not None else []
    reduce = reduce or (lambda s: s.mean(0))
    learned, kls = [], []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        qr, mask = pad_left([s["prompt_ids"] + s["response_ids"] for s in chunk], tok.eos_id)
        qr, mask = qr.to(d.device), mask.to(d.device)
        lengths = [len(s["response_ids"]) for s in chunk]
        n = torch.tensor(lengths, device=d.device)
        response = torch.arange(qr.size(1), device=d.device)[None, :] >= qr.size(1) - n[:, None]  # left-padded
        # Logits only from the position that predicts the longest response's first token (GPT.forward's logits_from).
        first = max(qr.size(1) - max(lengths) - 1, 0)
        with autocast(d, bf16):
            if members:
                member_scores = []
                for member in members:
                    with visit(member):
                        member_scores.append(reward_scores(member, qr, mask).float())
                learned += reduce(torch.stack(member_scores)).tolist()
            logits_p = policy(qr, attention_mask=mask, logits_from=first)[:, :-1]
            logits_r = ref(qr, attention_mask=mask, logits_from=first)[:, :-1]
        kls += sequence_kl(token_logprobs(logits_p, qr[:, first + 1:], temperature),
                           token_logprobs(logits_r, qr[:, first + 1:], temperature), response[:, first + 1:]).tolist()
    return learned, kls


def sample_metrics(samples: list[dict], graded: bool) -> dict:
    """Every stage's eval/ numbers of its samples: mean length (tokens, EOS included), fraction ending with EOS,
    and with graded (the default task, whose programmatic annotator can grade them) the mean gold reward."""
    n = len(samples)
    out = {"eval/response_length": sum(s["length"] for s in samples) / n,
           "eval/eos_fraction": sum(s["ended"] for s in samples) / n}
    if graded:
        out["eval/gold_reward"] = sum(data.gold_reward(s["prompt"], s["response"]) for s in samples) / n
    return out


def show_samples(samples: list[dict], n: int, label: str, graded: bool, learned: list[float] | None = None):
    """Print the first n samples on the console (above the progress bar), with their learned and gold rewards; the
    prompt as the model saw it (cut to its limit, at most 160 characters), not a multi-kilobyte original."""
    from tqdm import tqdm
    for i, s in enumerate(samples[:n]):
        scores = (f" learned={learned[i]:.3f}" if learned else "") + \
            (f" gold={data.gold_reward(s['prompt'], s['response']):.3f}" if graded else "")
        tqdm.write(f"  [{label}] {s['prompt_shown']!r} -> {s['response']!r}{'' if s['ended'] else ' (no EOS)'}{scores}")


# -----------------------------------------------------------------------------
# The report


@dataclass
class Config:
    policies: str = "sft:runs/sft/final,ppo:runs/ppo/final"
    """comma-separated name:checkpoint pairs, evaluated side by side"""
    reference: str = "runs/sft/final"
    """the reference policy for the KL column (the SFT checkpoint)"""
    reward_model: str = "runs/rm/final"
    """the learned reward model (its run directory's metrics.jsonl gives the RM accuracy); an ensemble's run
    directory or a comma list scores with the members' mean (the accuracy shown is member 0's)"""
    dataset: str = "default"
    """held-out prompts: the test split of this dataset (the prompts every stage held out)"""
    eval_dataset: str = ""
    """held-out prompts read whole from here instead (the stages' --eval_dataset)"""
    chat_template: str = "auto"
    """as the stages' --chat_template: "auto" (the tokenizer's own, if any), "none", or a Jinja file"""
    num_prompts: int = 500
    """held-out prompts to evaluate"""
    max_prompt_tokens: int = 0
    """prompts cut from the left to this many tokens; 0 = the limit the policies were trained with, read from
    their checkpoints' run_config.json (all must agree)"""
    response_length: int = 0
    """maximum new tokens; 0 = read from the checkpoints like max_prompt_tokens"""
    temperature: float = 1.0
    """sampling temperature, the same for every policy"""
    seed: int = 1234
    """sampling seed, the same for every policy"""
    num_samples_shown: int = 5
    """side-by-side samples in the report"""
    stage_times: str = ""
    """a JSON file of {stage: seconds} written by launch.sh (optional)"""
    ppo_metrics: str = ""
    """a PPO run's metrics.jsonl to plot (optional; needs matplotlib)"""
    out: str = "runs/report"
    """directory for report.md, report.json and ppo_curves.png"""
    device: str = "auto"
    """auto, cpu or cuda"""
    bf16: bool = True
    """bf16 weights and compute on CUDA (runtime.precision); false: float32 throughout. Ignored on CPU"""


def evaluate_policy(name, path, ref, reward_model, prompts, cfg, d):
    policy = load_model(path, "policy", d, trainable=False, bf16=cfg.bf16)
    tok = data.get_tokenizer(policy.config.tokenizer)
    samples = sample_responses(policy, tok, prompts, d, cfg.response_length, cfg.temperature, cfg.seed,
                               max_prompt_tokens=cfg.max_prompt_tokens, bf16=cfg.bf16)
    learned, kls = score_samples(samples, policy, ref, reward_model, tok, cfg.temperature, d, bf16=cfg.bf16)
    n = len(samples)
    mean = sum(learned) / n
    standard_error = (sum((r - mean) ** 2 for r in learned) / max(n - 1, 1) / n) ** 0.5
    row = {"learned_reward": mean, "learned_reward_se": standard_error, "kl_to_reference": sum(kls) / n,
           "response_length": sum(s["length"] for s in samples) / n, "eos_fraction": sum(s["ended"] for s in samples) / n}
    if cfg.dataset == "default":
        golds = [data.gold_reward(s["prompt"], s["response"]) for s in samples]
        row["gold_reward"] = sum(golds) / n
        for s, g in zip(samples, golds):
            s["gold"] = g
    for s, r in zip(samples, learned):
        s["learned"] = r
    return row, samples


def last_eval(metrics_path: str) -> dict:
    """The last line of a metrics.jsonl that has eval/ keys."""
    if not os.path.exists(metrics_path):
        return {}
    rows = [json.loads(line) for line in open(metrics_path) if line.strip()]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    return evals[-1] if evals else {}


def format_report(report: dict) -> str:
    lines = ["# RLHF pipeline report", ""]
    cols = ["gold_reward", "learned_reward", "kl_to_reference", "response_length", "eos_fraction"]
    cols = [c for c in cols if any(c in row for row in report["policies"].values())]
    lines += ["| policy | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in report["policies"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + " |")
    rm = report.get("reward_model", {})
    if rm:
        lines += ["", "Reward model (held-out): " + ", ".join(f"{k} {v:.3f}" for k, v in rm.items())]
    if report.get("stage_seconds"):
        lines += ["", "Wall time per stage: " + ", ".join(f"{k} {v:.0f}s" for k, v in report["stage_seconds"].items())]
    if report.get("stage_peak_mb"):
        lines += ["", "Peak resident memory per stage: " + ", ".join(f"{k} {v} MB" for k, v in report["stage_peak_mb"].items())]
    lines += ["", f"Held-out prompts: {report['num_prompts']}, temperature {report['temperature']}, seed {report['seed']}.", "",
              "## Samples", ""]
    for sample in report["samples"]:
        lines.append(f"- prompt `{sample['prompt']}`")
        for name, s in sample["responses"].items():
            gold = f" gold {s['gold']:.2f}" if "gold" in s else ""
            lines.append(f"  - {name}: `{s['response']}`{'' if s['ended'] else ' (no EOS)'} - learned {s['learned']:.2f}{gold}")
    if report.get("plot"):
        lines += ["", report["plot"]]
    return "\n".join(lines) + "\n"


def plot_ppo(metrics_path: str, out_png: str) -> str:
    """Learned reward, gold reward and KL against PPO updates, if matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "No plot: `pip install matplotlib` to get ppo_curves.png."
    rows = [json.loads(line) for line in open(metrics_path) if line.strip()]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for key, label in (("objective/scores", "learned reward (rollouts)"), ("eval/learned_reward", "learned reward (held-out)"),
                       ("eval/gold_reward", "gold reward (held-out)")):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            axes[0].plot(*zip(*pts), label=label)
    kl = [(r["step"], r["objective/kl"]) for r in rows if "objective/kl" in r]
    if kl:
        axes[1].plot(*zip(*kl), color="tab:red")
    axes[0].set_xlabel("PPO update"), axes[0].legend(), axes[1].set_xlabel("PPO update"), axes[1].set_ylabel("KL to reference (nats/seq)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    return f"![PPO curves]({os.path.basename(out_png)})"


def trained_limits(checkpoint: str) -> tuple[int, int] | None:
    """(max prompt tokens, max response tokens) a stage trained with, from its final/run_config.json, or None."""
    path = os.path.join(checkpoint, "run_config.json")
    if not os.path.exists(path):
        return None
    run = json.load(open(path))
    return run["max_prompt_tokens"], run.get("response_length", run.get("max_response_tokens"))


def resolve_limits(cfg: Config):
    """Fill limits left at 0 from the checkpoints, so the report scores the prompts the stages saw (an RM's
    learned reward is only normalized, mean 0 on SFT samples, at the lengths it was normalized at)."""
    found = {}
    for item in cfg.policies.split(",") + [f"reference:{cfg.reference}"]:
        name, path = item.split(":", 1)
        if (limits := trained_limits(path)) is not None:
            found[name] = limits
    for i, flag in enumerate(("max_prompt_tokens", "response_length")):
        if getattr(cfg, flag):
            continue
        values = {limits[i] for limits in found.values()}
        if len(values) != 1:
            raise SystemExit(f"evaluate: --{flag} not given and the checkpoints disagree or say nothing "
                             f"({ {n: l[i] for n, l in found.items()} }); pass --{flag}")
        setattr(cfg, flag, values.pop())
    print(f"evaluate: prompts cut to {cfg.max_prompt_tokens} tokens, up to {cfg.response_length} new tokens")


def main(argv=None):
    cfg = parse_config(Config, argv)
    d = init_distributed(cfg.device)
    os.makedirs(cfg.out, exist_ok=True)
    ref = load_model(cfg.reference, "policy", d, trainable=False, bf16=cfg.bf16)
    # An ensemble's learned reward in the report is the mean of its members (Coste et al.'s "mean").
    reward_model = [load_model(p, "reward", d, trainable=False, bf16=cfg.bf16) for p in reward_model_paths(cfg.reward_model)]
    resolve_limits(cfg)
    _, source, split = data.heldout_sources(cfg.dataset, cfg.eval_dataset)
    records = data.load_records(source, "prompt", split, max_records=cfg.num_prompts, seed=0)
    data.save_prompt_manifest(os.path.join(cfg.out, "prompts.json"), [], records)
    prompts = [r["prompt"] for r in data.apply_chat_template(records, data.get_tokenizer(ref.config.tokenizer),
                                                             cfg.chat_template)]
    report = {"num_prompts": len(prompts), "temperature": cfg.temperature, "seed": cfg.seed, "policies": {}, "samples": []}
    all_samples = {}
    policies = cfg.policies.split(",")
    for i, item in enumerate(policies, 1):
        name, path = item.split(":", 1)
        start = time.time()
        print(f"evaluate: [{i}/{len(policies)}] {name} ({path}) on {len(prompts)} held-out prompts ...", flush=True)
        report["policies"][name], all_samples[name] = evaluate_policy(name, path, ref, reward_model, prompts, cfg, d)
        print(f"evaluate: [{i}/{len(policies)}] {name} done in {time.time() - start:.0f}s", flush=True)
    for i in range(min(cfg.num_samples_shown, len(prompts))):
        keep = ("response", "ended", "learned", "gold")
        report["samples"].append({"prompt": prompts[i], "responses": {
            name: {k: s[i][k] for k in keep if k in s[i]} for name, s in all_samples.items()}})
    rm_dir = os.path.dirname(os.path.normpath(reward_model_paths(cfg.reward_model)[0]))  # an ensemble: member 0
    rm_eval = last_eval(os.path.join(rm_dir, "metrics.jsonl"))
    report["reward_model"] = {k.removeprefix("eval/"): v for k, v in rm_eval.items() if k.startswith("eval/")}
    if cfg.stage_times and os.path.exists(cfg.stage_times):
        report["stage_seconds"] = json.load(open(cfg.stage_times))
        memory = os.path.join(os.path.dirname(cfg.stage_times), "stage_peak_mb.json")  # launch.sh, with GNU time
        if os.path.exists(memory):
            report["stage_peak_mb"] = json.load(open(memory))
    if cfg.ppo_metrics and os.path.exists(cfg.ppo_metrics):
        report["plot"] = plot_ppo(cfg.ppo_metrics, os.path.join(cfg.out, "ppo_curves.png"))
    text = format_report(report)
    with open(os.path.join(cfg.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(cfg.out, "report.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
