"""Direct Preference Optimization (Rafailov et al. 2023): the policy learns from preference pairs directly.

No reward model and no sampling during training. DPO's observation is that the optimum of the KL-regularized
RL objective that PPO optimizes, max E[r] - beta KL(pi || ref), is pi*(y|x) ~ ref(y|x) exp(r(x, y) / beta), so
r = beta log pi(y|x) / ref(y|x) + beta log Z(x). Put that reward into the Bradley-Terry likelihood the reward
model is fit with and Z(x) cancels: the loss on {prompt, chosen, rejected} is a logistic loss on the log-ratio
margin of the two responses (paper, eq. 7). The policy and a frozen copy of it (the reference) both start from
the SFT checkpoint; each step costs one forward+backward of the policy and one forward of the reference over
chosen and rejected together. Ranked data is used as all its K-choose-2 pairs (data.load_records).

Evaluation puts DPO on PPO's axes: on held-out prompts, samples from the policy, their KL to the reference
(`eval/kl`, k1 summed over the response: evaluate.sequence_kl, as ppo.py logs it) and on the default task their gold reward
(`eval/gold_reward`), with the same prompts and sampling seed as ppo.py's evaluation. Training metrics use TRL's
DPO names (rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies, logps/chosen, logps/rejected).

Why the samples are evaluated: the loss only sees the dataset's responses, so it can keep improving on held-out
pairs while the policy's own samples get worse. On the default task with beta 0.1 it happened within 250 steps on
4 of the 5 runs we made (lr 1e-4, seeds 0-2; lr 3e-4, seeds 0-1): every response ends in EOS, and pushing the
rejected ones down pushed EOS down everywhere (after an exactly right answer, P(EOS) 0.96 -> 0.38), with the mass
going to letters q-z that occur in no response. The samples stop ending, eval/eos_fraction falls first, then the
gold reward drops below the SFT policy's while the KL to the reference jumps from ~1 to 50-150 nats. beta 0.5
(the default here) was stable on seeds 0-2.

    python dpo.py --sft=runs/sft/final              # the built-in default task, CPU, 1-2 minutes
    python dpo.py --sft=runs/sft/final --loss_type=ipo --beta=0.1   # IPO: margin target 1 / (2 beta) = 5 nats
    python dpo.py --sft=runs/sft_hh/final --dataset=Anthropic/hh-rlhf:harmless-base \\
        --max_prompt_tokens=384 --max_response_tokens=128 --lr=1e-6 --beta=0.05 --max_steps=0 --eval_prompts=64
    torchrun --nproc_per_node=8 dpo.py ...          # FSDP2, bf16 autocast on CUDA
"""

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import data
from evaluate import sample_metrics, sample_responses, score_samples, show_samples
from model import BaseModel, lora_flags, token_logprobs
from runtime import (Dist, all_reduce_sum, apply_preset, autocast, batch_at, check_context, check_nonfinite_streak,
                     check_writable, exit_preempted, guarded_step, init_distributed, load_model, lr_at, make_adamw,
                     parse_config, preempted, progress_bar, save_checkpoint, seed_all, set_lr, shard_model,
                     run_main, shutdown_distributed, speed_metrics, split_batch, start_or_resume, watch_preemption)


@dataclass
class Config:
    run_dir: str = "runs/dpo"
    """where checkpoints, metrics.jsonl and final/ go (final/policy is what evaluate.py compares)"""
    sft: str = "runs/sft/final"
    """the SFT checkpoint: the initial policy and the frozen reference; its tokenizer is used"""
    dataset: str = "default"
    """"default" (built-in task), a local .jsonl/.json(.gz) file, or a hub name (Anthropic/hh-rlhf:harmless-base, ...)"""
    profile: str = "auto"
    """"toy": the defaults below, tuned for the built-in task; "real": REAL_DATA (limits and learning rates for
    real text and pretrained models); "auto": real unless dataset is "default". Explicit flags always win"""
    eval_dataset: str = ""
    """held-out data; empty = the test split of `dataset` (a local file has none: eval_examples of its pairs are held out)"""
    chat_template: str = "auto"
    """prompts rendered by a chat template: "auto" = the tokenizer's own if it has one (instruct models; GPT-2 and
    the char tokenizer have none), "none" = plain text, or a Jinja file (data.apply_chat_template)"""
    max_train_examples: int = 0
    """use at most this many training pairs (0 = all)"""
    max_prompt_tokens: int = 12
    """prompts longer than this are cut from the left (counted)"""
    max_response_tokens: int = 16
    """responses (with EOS) longer than this are cut from the right (counted); pairs that become identical are dropped"""
    beta: float = 0.5
    """strength of the implicit KL penalty: smaller lets the policy move further (DPO paper and TRL: 0.1; N+ TL;DR: 0.05).
    0.5 for the default task: with 0.1, 4 of 5 runs stopped ending their samples within 250 steps (see the docstring)"""
    loss_type: str = "sigmoid"
    """"sigmoid": DPO (Rafailov et al. 2023); "ipo": IPO (Azar et al. 2023) on sequence-summed log-probs, or per-token averaged with --ipo_average; see dpo_loss"""
    label_smoothing: float = 0.0
    """assumed probability that a label is flipped (conservative DPO; OpenRLHF --label_smoothing); sigmoid only"""
    ipo_average: bool = False
    """loss_type=ipo on per-token AVERAGED log-probs (TRL PR #1265, after consulting the IPO authors; --preset=trl) instead of summed (OpenRLHF). The same beta means L times more with sums"""
    preset: str = ""
    """"trl": TRL 1.12 DPOConfig's defaults (beta 0.1, IPO on per-token averages); explicit flags win"""
    batch_size: int = 64
    """global batch in pairs per optimizer step, whatever the number of processes"""
    micro_batch_size: int = 64
    """pairs per forward pass per process (2x as many rows); batch_size / (world_size * micro) steps are accumulated"""
    max_steps: int = 250
    """optimizer steps; 0 = one epoch over the data (TRL's default; the N+ DPO runs are one epoch)"""
    lr: float = 3e-4
    """peak learning rate (AdamW); for 1B+ models 5e-7 to 1e-6 is usual (DPO paper, N+, TRL)"""
    weight_decay: float = 0.0
    """AdamW decay on 2-D weights only (TRL's default is 0)"""
    warmup_steps: int = 20
    """linear warmup steps"""
    lr_schedule: str = "linear"
    """cosine, linear or constant after warmup"""
    grad_clip: float = 1.0
    """max global gradient norm (0 = no clipping)"""
    max_nonfinite_steps: int = 3
    """a step whose loss or gradient is inf/NaN is skipped (no update) and counted; this many in a row stop the run (0 = never stop)"""
    dropout: float = 0.0
    """dropout in the policy (off by default, as all stages: with it, the policy differs from the reference at step 0)"""
    lora_rank: int = 0
    """LoRA rank r (0 = full fine-tuning): trainable low-rank adapters on the block projections, base frozen (model.LoRALinear)"""
    lora_alpha: float = 16.0
    """LoRA scale: the update is B A x * lora_alpha / lora_rank (PEFT's scaling, not rsLoRA)"""
    lora_dropout: float = 0.0
    """dropout on the adapters' input (PEFT's lora_dropout)"""
    lora_targets: str = "all"
    """projections with adapters: "all" (attention q, k, v, o and the MLP), or HF names: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj (Llama family), c_attn,c_proj,c_fc (GPT-2)"""
    packing: bool = False
    """padding-free packing of each micro-batch's 2B sequences (data.pack_sft): positions restart and attention is
    block-diagonal per sequence; the same sequence log-probs as padded (tests/test_packing.py)"""
    gradient_checkpointing: bool = False
    """recompute each block's activations in backward to save memory"""
    eval_every: int = 50
    """steps between evaluations (held-out pairs; samples: gold reward, KL to the reference)"""
    eval_examples: int = 500
    """held-out pairs"""
    eval_prompts: int = 256
    """held-out prompts to sample from (ppo.py's eval_prompts)"""
    eval_temperature: float = 1.0
    """sampling temperature of evaluation samples; the KL uses logits / T, as ppo.py (use ppo.py's --temperature)"""
    num_samples_shown: int = 3
    """sampled responses printed at each evaluation"""
    save_every: int = 500
    """steps between checkpoints (and one at the end)"""
    resume: bool = False
    """continue from run_dir's latest checkpoint"""
    keep_last: int = 2
    """checkpoints kept in run_dir (0: all); the newest is never deleted, older ones only once it checks out"""
    preempt_signals: str = "SIGTERM,SIGUSR1"
    """on these signals, finish the step, save a checkpoint and exit with code 75 (launch.sh: "preempted"); "" = off"""
    stop_after: int = 0
    """stop (with a checkpoint) after this many steps of this invocation: for tests of resume (0 = off)"""
    seed: int = 0
    """seeds data order and sampling"""
    device: str = "auto"
    """auto, cpu or cuda"""
    bf16: bool = True
    """bf16 autocast on CUDA (ignored on CPU); log-probs and the loss are float32 either way"""
    log_every: int = 10
    """steps between metric lines"""
    report_to: str = ""
    """also log metrics to "tensorboard" (run_dir/tensorboard) and/or "wandb", comma-separated (TRL's report_to)"""


# --profile=real: limits as sft.py's; lr 1e-6 is TRL's DPOConfig default (trl/trainer/dpo_config.py L152) and
# the DPO paper's; beta 0.1 as the DPO paper and TRL; one epoch.
REAL_DATA = dict(max_prompt_tokens=384, max_response_tokens=128, lr=1e-6, beta=0.1, batch_size=64, micro_batch_size=8,
                 max_steps=0, warmup_steps=10)


# TRL 1.12 `trl/trainer/dpo_config.py` (beta 0.1) and `dpo_trainer.py` (ipo divides each log-ratio by the
# response length). Only the knobs where TRL differs from the defaults above.
PRESETS = {"trl": dict(beta=0.1, ipo_average=True)}


# -----------------------------------------------------------------------------
# The math


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                   average: bool = False, document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """log pi(response | prompt): the sum of token log-probs over the tokens loss_mask marks, float32.

    logits (B, T, V) at position t predict input_ids[t + 1]; loss_mask (B, T) marks response tokens (data.collate_sft,
    data.collate_pairs), so prompt and padding positions add exactly 0 and get no gradient (torch.where, not a
    product: a non-finite logit at a pad position cannot leak in). Summed, not averaged: DPO's log pi(y|x) is a
    sequence log-likelihood (paper, eq. 7; TRL `dpo_trainer.py` _compute_loss and OpenRLHF sum likewise).
    Float32 log-softmax via model.token_logprobs, at temperature 1. average=True divides by the response length:
    IPO as TRL computes it (--ipo_average, TRL PR #1265).
    document_ids (B, T): packed rows (data.pack_sft); then one sum per sequence id instead of per row, each target
    token counted for the sequence it belongs to (a sequence's first token is never a target, so no sum crosses a
    boundary): (number of sequences,)."""
    logp = token_logprobs(logits[:, :-1], input_ids[:, 1:])  # (B, T - 1)
    mask = loss_mask[:, 1:].bool()
    logp = torch.where(mask, logp, torch.zeros_like(logp))
    if document_ids is None:
        total, count = logp.sum(-1), mask.sum(-1)
    else:
        seq, n = document_ids[:, 1:].clamp(min=0).flatten(), int(document_ids.max()) + 1  # padding adds 0 to sequence 0
        total = logp.new_zeros(n).index_add(0, seq, logp.flatten())
        count = mask.new_zeros(n, dtype=torch.long).index_add(0, seq, mask.flatten().long())
    return total / count if average else total


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float, label_smoothing: float = 0.0, loss_type: str = "sigmoid"):
    """Four (B,) sequence log-probs -> (losses (B,), chosen_rewards (B,), rejected_rewards (B,)), float32.

    With h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)), the log-ratio margin of chosen y_w over
    rejected y_l:
    - "sigmoid": -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h). eps = 0 is DPO (Rafailov et al. 2023,
      eq. 7; TRL `dpo_trainer.py` loss_type="sigmoid"). eps > 0 is conservative DPO: the label is trusted with
      probability 1 - eps (Mitchell 2023, "A note on DPO with noisy preferences"), as OpenRLHF's `DPOLoss` and
      older TRL releases' sigmoid loss; TRL 1.12's sigmoid ignores label_smoothing ("robust" and "exo_pair" use it).
      The loss is log 2 where the policy equals the reference, whatever beta.
    - "ipo": (h - 1 / (2 beta))^2 (Azar et al. 2023, eq. 17): regresses the margin to a finite target instead of
      pushing it to infinity, which DPO does on deterministic preferences. By default on sequence-SUMMED log-probs,
      as OpenRLHF's `DPOLoss(ipo=True)`; then h grows with response length (a sum over L tokens is L times an
      average), so the same target margin needs a beta about L times smaller. --ipo_average (set by --preset=trl)
      passes per-token averages instead, as TRL 1.12 does (`dpo_trainer.py` L1470-1481, PR #1265: each log-ratio
      divided by its response length, a form the IPO authors confirmed to TRL); the formula here is unchanged.
      tests/test_dpo.py checks that TRL's ipo equals ours on length-averaged inputs.
    The rewards are DPO's implicit rewards beta (log pi - log ref) (eq. 5, up to beta log Z(x)), detached: logged
    as TRL's rewards/chosen and rewards/rejected, never differentiated."""
    chosen_logratios = policy_chosen_logps.float() - ref_chosen_logps.float()
    rejected_logratios = policy_rejected_logps.float() - ref_rejected_logps.float()
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}: sigmoid or ipo")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


# -----------------------------------------------------------------------------
# Data and forward passes


def load_pairs(source: str, split: str, max_records: int | None, cfg: Config) -> list[dict]:
    """{prompt, chosen, rejected} records; a ranking of K responses gives its K-choose-2 pairs."""
    try:
        return data.load_records(source, "preference", split=split, max_records=max_records, seed=cfg.seed)
    except data.DataError as e:
        raise SystemExit(f"dpo: {e}")


def encode_pairs(records: list[dict], tok, cfg: Config, stats: data.TruncationStats) -> list[tuple]:
    """(prompt ids, chosen ids, rejected ids) cut as data.encode_pair cuts them; pairs made identical by truncation
    are dropped (and counted in stats): they carry no preference."""
    encoded = (data.encode_preference(tok, r["prompt"], r["chosen"], r["rejected"], cfg.max_prompt_tokens,
                                      cfg.max_response_tokens, stats) for r in records)
    return [e for e in encoded if e is not None]


def pair_logps(model, batch: dict, d: Dist, bf16: bool, average: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over the 2B rows of data.collate_pairs -> (chosen (B,), rejected (B,)) summed response log-probs
    (per-token averaged with average=True)."""
    batch = {k: v.to(d.device) for k, v in batch.items()}
    ids, docs = batch["input_ids"], batch.get("document_ids")  # document_ids: packed (--packing)
    with autocast(d, bf16):
        logits = model(ids, attention_mask=batch["attention_mask"], position_ids=batch.get("position_ids"), document_ids=docs)
    return sequence_logps(logits, ids, batch["loss_mask"], average=average, document_ids=docs).chunk(2)


def heldout_prompts(eval_records: list[dict], cfg: Config) -> list[str]:
    """Prompts to sample from at evaluation. On the default task, those of ppo.py's evaluation (test split, same
    count and seed), so the two stages' eval/ curves are measured on the same prompts; elsewhere the prompts of
    the held-out pairs."""
    if cfg.dataset == "default" and not cfg.eval_dataset:
        return [r["prompt"] for r in data.load_records("default", "prompt", split="test", max_records=cfg.eval_prompts,
                                                       seed=cfg.seed)]
    return list(dict.fromkeys(r["prompt"] for r in eval_records))[:cfg.eval_prompts]


# -----------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def eval_metrics(policy, ref, tok, eval_items: list[tuple], prompts: list[str], cfg: Config, d: Dist, step: int) -> dict:
    """Held-out pairs: the loss and TRL's reward metrics. Held-out prompts: samples from the policy, their KL to the
    reference, length, EOS rate, and on the default task the gold reward. Every rank evaluates the same items."""
    policy.eval()
    parts = []
    for start in range(0, len(eval_items), cfg.micro_batch_size):
        batch = data.collate_pairs(eval_items[start:start + cfg.micro_batch_size], tok.eos_id)
        avg = averaged_logps(cfg)
        parts.append(dpo_loss(*pair_logps(policy, batch, d, cfg.bf16, avg), *pair_logps(ref, batch, d, cfg.bf16, avg),
                              cfg.beta, cfg.label_smoothing, cfg.loss_type))
    losses, chosen, rejected = (torch.cat(column) for column in zip(*parts))
    metrics = {"eval/loss": losses.mean().item(), "eval/rewards/chosen": chosen.mean().item(),
               "eval/rewards/rejected": rejected.mean().item(), "eval/rewards/margins": (chosen - rejected).mean().item(),
               "eval/rewards/accuracies": (chosen > rejected).float().mean().item()}
    samples = sample_responses(policy, tok, prompts, d, cfg.max_response_tokens, cfg.eval_temperature,
                               seed=cfg.seed + 1, max_prompt_tokens=cfg.max_prompt_tokens, bf16=cfg.bf16)  # ppo.py's seed
    # The sequence KL to the reference at the sampling temperature, as ppo.py's eval/kl (evaluate.sequence_kl).
    _, kls = score_samples(samples, policy, ref, None, tok, cfg.eval_temperature, d, cfg.micro_batch_size, cfg.bf16)
    metrics["eval/kl"] = sum(kls) / len(kls)
    metrics.update(sample_metrics(samples, graded=cfg.dataset == "default"))
    if d.is_main:
        show_samples(samples, cfg.num_samples_shown, f"step {step}", graded=cfg.dataset == "default")
    policy.train()
    return metrics


# -----------------------------------------------------------------------------
# The stage


def averaged_logps(cfg: Config) -> bool:
    """Per-token averaged log-probs: IPO under --ipo_average only; DPO's sigmoid always sums (TRL too)."""
    return cfg.loss_type == "ipo" and cfg.ipo_average


def main(argv=None):
    import sys
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = parse_config(Config, [a for a in argv if not a.startswith("--preset=")], {"real": REAL_DATA},
                       **apply_preset(argv, PRESETS))
    if cfg.loss_type not in ("sigmoid", "ipo"):
        raise SystemExit(f"--loss_type={cfg.loss_type!r}: choose sigmoid or ipo")
    if not 0.0 <= cfg.label_smoothing < 0.5 or (cfg.label_smoothing and cfg.loss_type != "sigmoid"):
        raise SystemExit(f"--label_smoothing={cfg.label_smoothing}: must lie in [0, 0.5), and applies to loss_type=sigmoid only")
    if cfg.beta <= 0:
        raise SystemExit(f"--beta={cfg.beta}: must be > 0")
    d = init_distributed(cfg.device)
    seed_all(cfg.seed)
    check_writable(cfg.run_dir)
    preemption = watch_preemption(cfg.preempt_signals)  # SIGTERM: save at the end of this step, exit 75

    # 1. Models: the policy and the frozen reference, both the SFT checkpoint. The reference is in eval mode,
    #    takes no gradients and, on CUDA, holds bf16 weights (runtime.load_model). With --lora_rank the reference
    #    is the policy's own frozen base with its adapters off (model.BaseModel; TRL's and torchtune's LoRA DPO):
    #    no second copy of the weights.
    policy = load_model(cfg.sft, "policy", d, trainable=True, shard=True, dropout=cfg.dropout, **lora_flags(cfg))
    policy.gradient_checkpointing = cfg.gradient_checkpointing
    ref = BaseModel(policy) if cfg.lora_rank else load_model(cfg.sft, "policy", d, trainable=False, bf16=cfg.bf16, shard=True)
    tok = data.get_tokenizer(policy.config.tokenizer)
    check_context(policy, cfg.max_prompt_tokens, cfg.max_response_tokens, "dpo", "--max_prompt_tokens + --max_response_tokens")

    # 2. Data: preference pairs, tokenized once; truncation counted, ties made by truncation dropped.
    records, eval_records = data.split_heldout(lambda source, split, n: load_pairs(source, split, n, cfg), cfg.dataset,
                                          cfg.eval_dataset, cfg.max_train_examples, cfg.eval_examples, "dpo",
                                               f"{cfg.run_dir}/prompts.json" if d.is_main else None)
    try:
        records, eval_records = (data.apply_chat_template(r, tok, cfg.chat_template) for r in (records, eval_records))
    except data.DataError as e:
        raise SystemExit(f"dpo: {e}")
    stats = data.TruncationStats()
    items = encode_pairs(records, tok, cfg, stats)
    eval_items = encode_pairs(eval_records, tok, cfg, data.TruncationStats())
    prompts = heldout_prompts(eval_records, cfg)
    if len(items) < cfg.batch_size or not eval_items:
        raise SystemExit(f"{len(items)} usable training / {len(eval_items)} held-out pairs in {cfg.dataset}; "
                         f"need at least one batch of {cfg.batch_size} and one held-out pair")
    if d.is_main:
        print(f"dpo: {len(items)} train / {len(eval_items)} held-out pairs, {len(prompts)} held-out prompts; "
              f"{stats.summary()}")

    # 3. Batch arithmetic: the global batch of pairs is fixed; processes and accumulation split it.
    per_rank, micro, steps_per_epoch, max_steps = split_batch(cfg.batch_size, cfg.micro_batch_size, len(items),
                                                              cfg.max_steps, d)

    # 4. Sharding, optimizer, and the state to resume from. The reference is sharded too, so its memory is split.
    policy = shard_model(policy, d, cfg.bf16)
    ref = ref if cfg.lora_rank else shard_model(ref, d, cfg.bf16)  # a BaseModel shares the policy's shards
    optimizer = make_adamw(policy, cfg.lr, cfg.weight_decay)
    step, state, metrics = start_or_resume(cfg.run_dir, cfg.resume, {"policy": policy}, {"policy": (policy, optimizer)},
                                           max_steps, d, "dpo", config=cfg)
    skipped_steps, bad_streak = state.get("skipped_steps", 0), 0

    # 5. The loop. Data order depends only on (seed, epoch), so a resumed run sees the same batches.
    stop_at = min(max_steps, step + cfg.stop_after) if cfg.stop_after else max_steps
    t0, tokens_seen, last_eval = time.time(), 0, {}
    bar = progress_bar(max_steps, step, "dpo", d)
    while step < stop_at:
        epoch, index = divmod(step, steps_per_epoch)
        batch_items = batch_at(items, per_rank, cfg.seed, epoch, index, d.rank, d.world_size)
        lr = lr_at(step, max_steps, cfg.lr, cfg.warmup_steps, cfg.lr_schedule)
        set_lr(optimizer, lr)
        sums = {k: torch.zeros((), device=d.device) for k in ("loss", "chosen", "rejected", "correct", "logps_c", "logps_r")}
        for i in range(0, per_rank, micro):
            # One forward per model scores chosen and rejected together (rows 0..B-1 chosen, B..2B-1 rejected).
            batch = data.collate_pairs(batch_items[i:i + micro], tok.eos_id, packed=cfg.packing)
            with torch.no_grad():
                ref_chosen, ref_rejected = pair_logps(ref, batch, d, cfg.bf16, averaged_logps(cfg))
            policy_chosen, policy_rejected = pair_logps(policy, batch, d, cfg.bf16, averaged_logps(cfg))
            losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                                                cfg.beta, cfg.label_smoothing, cfg.loss_type)
            # The mean over the global batch of pairs: the sum over micro-batches and ranks of sum / batch_size.
            # FSDP averages gradients over ranks, so scale by world_size.
            (losses.sum() * d.world_size / cfg.batch_size).backward()
            sums["loss"] += losses.detach().sum()
            sums["chosen"] += chosen_rewards.sum()
            sums["rejected"] += rejected_rewards.sum()
            sums["correct"] += (chosen_rewards > rejected_rewards).sum()
            sums["logps_c"] += policy_chosen.detach().sum()
            sums["logps_r"] += policy_rejected.detach().sum()
            tokens_seen += int(batch["attention_mask"].sum())
        grad_norm, skipped_steps, bad_streak = guarded_step(policy, optimizer, sums["loss"], cfg.grad_clip,
                                                            skipped_steps, bad_streak, step + 1, d)
        step += 1
        bar.update(1)

        if step % cfg.log_every == 0 or step == max_steps:
            mean = {k: (all_reduce_sum(v, d) / cfg.batch_size).item() for k, v in sums.items()}
            # MFU counts the reference's forward too: a third of the policy's forward + backward.
            row = {"train/loss": mean["loss"], "rewards/chosen": mean["chosen"], "rewards/rejected": mean["rejected"],
                   "rewards/margins": mean["chosen"] - mean["rejected"], "rewards/accuracies": mean["correct"],
                   "logps/chosen": mean["logps_c"], "logps/rejected": mean["logps_r"], "lr": lr,
                   "grad_norm": grad_norm.item(), "epoch": step / steps_per_epoch, "train/skipped_steps": skipped_steps,
                   **speed_metrics(tokens_seen, time.time() - t0, policy, cfg.max_prompt_tokens + cfg.max_response_tokens,
                                   d, flops_factor=4 / 3)}
            metrics.log(step, row, echo=False)
            bar.set_postfix(loss=f"{row['train/loss']:.3f}", acc=f"{row['rewards/accuracies']:.2f}")
        check_nonfinite_streak(bad_streak, cfg.max_nonfinite_steps, step, cfg.run_dir)  # before saving this state
        if step % cfg.eval_every == 0 or step == max_steps:
            last_eval = eval_metrics(policy, ref, tok, eval_items, prompts, cfg, d, step)
            metrics.log(step, last_eval)
        preempt = preempted(preemption, d) and step < max_steps  # under torchrun, a MAX all_reduce: all ranks stop together
        if step % cfg.save_every == 0 or step == stop_at or preempt:
            save_checkpoint(cfg.run_dir, step, {"policy": policy}, {"policy": (policy, optimizer)},
                            {"skipped_steps": skipped_steps}, cfg, d, keep=cfg.keep_last, final=step == max_steps)
        if preempt:
            exit_preempted(cfg.run_dir, step, d, "dpo")
    bar.close()
    if d.is_main and step == max_steps:
        gold = f", gold reward {last_eval['eval/gold_reward']:.3f}" if "eval/gold_reward" in last_eval else ""
        print(f"dpo: done, {step} steps in {time.time() - t0:.0f}s; held-out accuracy "
              f"{last_eval['eval/rewards/accuracies']:.3f}, KL to the reference {last_eval['eval/kl']:.2f}{gold}; "
              f"policy in {cfg.run_dir}/final/policy")
    shutdown_distributed()

if __name__ == "__main__":
    run_main(main)
