"""Stage 2 of RLHF: a reward model trained on preference comparisons.

The SFT model with a scalar head (`score`, fresh, N(0, 1/sqrt(d_model + 1)) as OpenAI's 2019
`rewards.py`) that reads the hidden state of the last token of prompt + response: the EOS, or the last
kept token of a response cut by truncation (`evaluate.sequence_rewards`). Trained with the Bradley-Terry loss -log sigmoid(r_w - r_l)
on {prompt, chosen, rejected} pairs (Stiennon et al. 2020, eq. 1; TRL RewardTrainer), or on rankings of
K responses with the mean over all K-choose-2 pairs of each prompt (InstructGPT, Ouyang et al. 2022,
section 3.5, eq. 1). On the built-in task each pair's loss is averaged over the positions from the first token
where the two responses differ (--loss_positions=suffix, DeepSpeed-Chat's); elsewhere it reads the last token
only. After training the reward is normalized: gain and bias stored in the checkpoint's
config make it mean 0 (and, with --normalize_gain, std 1) on responses sampled from the SFT policy
(OpenAI 2019 `train_reward.py`) or on the SFT dataset's reference responses (N+ `reward.py`); ppo.py
applies them (`evaluate.reward_scores`). The output, run_dir/final/reward/, is what ppo.py --reward_model loads.

    python reward_model.py --sft=runs/sft/final     # the built-in default task: ~1.5 min on 2 CPU cores, gold accuracy ~0.9
    python reward_model.py --sft=runs/sft/final --data_format=ranked --k=4    # K-wise rankings
    python reward_model.py --sft=runs/sft/final --run_dir=runs/rm_ens --ensemble_size=3 [--bootstrap]
        # three members (seeds 0, 1, 2) in runs/rm_ens/member_k/final/reward; ppo.py --reward_model=runs/rm_ens
    python reward_model.py --sft=runs/sft_hh/final --dataset=Anthropic/hh-rlhf:harmless-base \\
        --max_prompt_tokens=384 --max_response_tokens=128 --lr=1e-5 --max_steps=0
    torchrun --nproc_per_node=8 reward_model.py ...  # FSDP2, bf16 autocast on CUDA
"""

import json
import os
import shutil
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

import data
from evaluate import last_eval as last_logged_eval, sample_responses, sequence_rewards
from model import GPT, lora_flags, save_hf_sequence_classifier
from runtime import (Dist, all_reduce_sum, autocast, batch_at, check_context, check_nonfinite_streak, check_writable,
                     exit_preempted, guarded_step, init_distributed, load_model, lr_at, make_adamw, parse_config,
                     preempted, progress_bar, save_checkpoint, seed_all, set_lr, shard_model, run_main, shutdown_distributed,
                     speed_metrics, split_batch, start_or_resume, watch_preemption)


@dataclass
class Config:
    run_dir: str = "runs/rm"
    """where checkpoints, metrics.jsonl and final/ go (final/reward is what ppo.py loads)"""
    sft: str = "runs/sft/final"
    """the SFT checkpoint the reward model starts from (its trunk; the scalar head is new); its tokenizer is used"""
    dataset: str = "default"
    """"default" (built-in task), a local .jsonl/.json(.gz) file, or a hub name (Anthropic/hh-rlhf:harmless-base, ...)"""
    profile: str = "auto"
    """"toy": the defaults below, tuned for the built-in task; "real": REAL_DATA (limits and learning rates for
    real text and pretrained models); "auto": real unless dataset is "default". Explicit flags always win"""
    eval_dataset: str = ""
    """held-out data; empty = the test split of `dataset` (a local file has none: eval_examples of its records are held out)"""
    chat_template: str = "auto"
    """prompts rendered by a chat template: "auto" = the tokenizer's own if it has one (instruct models; GPT-2 and
    the char tokenizer have none), "none" = plain text, or a Jinja file (data.apply_chat_template)"""
    data_format: str = "preference"
    """"preference": {prompt, chosen, rejected} pairs, Bradley-Terry loss; "ranked": {prompt, responses best first}, K-wise loss"""
    k: int = 4
    """responses per prompt of the default task's rankings (data_format=ranked); files and hub data bring their own"""
    max_train_examples: int = 0
    """use at most this many training comparisons (pairs, or rankings) (0 = all)"""
    max_prompt_tokens: int = 12
    """prompts longer than this are cut from the left (counted)"""
    max_response_tokens: int = 16
    """responses (with EOS) longer than this are cut from the right (counted); pairs that become identical are dropped"""
    loss_positions: str = "suffix"
    """where the loss compares two responses: "last", their rewards at the last token (TRL, OpenRLHF, N+, OpenAI
    2019); "suffix", every position from the first token where they differ to the end of the longer, averaged
    (DeepSpeed-Chat step 2; divergent_suffix_loss). The reward is read at the last token either way. "suffix" on the
    built-in task, where the RM is told which answer is better at the first wrong letter (docs/lab.md); the real
    profile keeps "last" """
    margin: float = 0.0
    """Bradley-Terry margin: loss -log sigmoid(r_w - r_l - margin) (Llama 2; TRL's margin column), preference only"""
    batch_size: int = 32
    """global batch in comparisons (pairs, or rankings) per optimizer step, whatever the number of processes"""
    micro_batch_size: int = 32
    """comparisons per forward pass per process; batch_size / (world_size * micro) steps are accumulated"""
    max_steps: int = 0
    """optimizer steps; 0 = num_epochs epochs over all the comparisons"""
    num_epochs: int = 2
    """epochs when max_steps is 0. OpenAI 2019, N+ and InstructGPT train one epoch on human comparisons, where a
    second one overfits (InstructGPT), and so does the real profile; the built-in task's RM is still learning after
    one (held-out loss and gold accuracy rising; flat by the end of the second), docs/lab.md"""
    lr: float = 5e-4
    """peak learning rate (AdamW); N+ uses 3e-6 and OpenAI 2019 5e-5 for GPT-2/Pythia-size models"""
    weight_decay: float = 0.0
    """AdamW decay on 2-D weights only"""
    warmup_steps: int = 20
    """linear warmup steps"""
    lr_schedule: str = "linear"
    """cosine, linear or constant after warmup (OpenAI 2019 and N+ anneal linearly to 0)"""
    grad_clip: float = 1.0
    """max global gradient norm (0 = no clipping)"""
    max_nonfinite_steps: int = 3
    """a step whose loss or gradient is inf/NaN is skipped (no update) and counted; this many in a row stop the run (0 = never stop)"""
    dropout: float = 0.0
    """dropout in the model (off by default, as all stages)"""
    lora_rank: int = 0
    """LoRA rank r (0 = full fine-tuning): trainable low-rank adapters on the block projections, base frozen (model.LoRALinear)"""
    lora_alpha: float = 16.0
    """LoRA scale: the update is B A x * lora_alpha / lora_rank (PEFT's scaling, not rsLoRA)"""
    lora_dropout: float = 0.0
    """dropout on the adapters' input (PEFT's lora_dropout)"""
    lora_targets: str = "all"
    """projections with adapters: "all" (attention q, k, v, o and the MLP), or HF names: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj (Llama family), c_attn,c_proj,c_fc (GPT-2)"""
    packing: bool = True
    """padding-free packing of each micro-batch's K * B sequences (data.pack_sft), each scored at its own last token;
    the same rewards as padded (tests/test_packing.py). On for the built-in task (docs/lab.md has the times); the
    real profile keeps it off, as docs/real-model.md's runs were padded"""
    gradient_checkpointing: bool = False
    """recompute each block's activations in backward to save memory"""
    eval_every: int = 100
    """steps between evaluations (held-out accuracy and margin; gold accuracy and correlation on the default task)"""
    eval_examples: int = 500
    """held-out comparisons"""
    normalize_on: str = "samples"
    """reward normalization set: "samples" from the SFT policy (OpenAI 2019), "references" of the SFT dataset (N+), or "none" """
    normalize_gain: bool = False
    """also set the gain so the normalized reward has std 1 (OpenAI 2019); off: bias only, mean 0 (N+)"""
    normalize_examples: int = 256
    """responses in the normalization set (OpenAI 2019 uses 256 samples)"""
    normalize_temperature: float = 1.0
    """sampling temperature of the normalization samples: use ppo.py's --temperature"""
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
    """seeds the new head, data order and sampling"""
    device: str = "auto"
    """auto, cpu or cuda"""
    bf16: bool = True
    """bf16 autocast on CUDA (ignored on CPU)"""
    log_every: int = 10
    """steps between metric lines"""
    report_to: str = ""
    """also log metrics to "tensorboard" (run_dir/tensorboard) and/or "wandb", comma-separated (TRL's report_to)"""
    ensemble_size: int = 1
    """train this many reward models on the same comparisons (Coste et al. 2023): member k uses seed + k for its head,
    data order and (with bootstrap) resample, and is a normal RM run in run_dir/member_k (final/reward loads alone);
    run_dir/ensemble.json lists them and ppo.py --reward_model=run_dir loads them all. 1 = one RM in run_dir"""
    bootstrap: bool = False
    """ensemble members train on a bootstrap resample (n draws with replacement, seeded per member) of the comparisons"""


# --profile=real: limits as sft.py's; lr 1e-5 near InstructGPT's 9e-6 for its 6B RM, one epoch (InstructGPT:
# the RM overfits after one; the toy lr 5e-4 made HH's held-out loss rise during training). The last-token loss, as
# docs/real-model.md's runs used it (the suffix loss is not measured on real data yet).
REAL_DATA = dict(max_prompt_tokens=384, max_response_tokens=128, lr=1e-5, batch_size=64, micro_batch_size=8,
                 max_steps=0, num_epochs=1, warmup_steps=10, packing=False, loss_positions="last")


# -----------------------------------------------------------------------------
# The math


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Mean over pairs of -log sigmoid(r_chosen - r_rejected - margin): (B,), (B,) -> scalar.

    The negative log-likelihood of the labels under Bradley-Terry, P(chosen > rejected) = sigmoid(r_c - r_r)
    (Stiennon et al. 2020 eq. 1; TRL `reward_trainer.py` compute_loss; OpenRLHF `PairWiseLoss`). The margin
    asks for a gap of at least `margin` (Llama 2, TRL's "margin" column). logsigmoid, never log(sigmoid()):
    sigmoid underflows to 0 for differences below about -100 in float32 and the log becomes -inf."""
    return -F.logsigmoid(chosen.float() - rejected.float() - margin).mean()


def kwise_loss(rewards: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """InstructGPT's ranking loss: rewards (B, K) of K responses per prompt, best first -> scalar.

    For each prompt, the mean over its C(K, 2) pairs i < j (i ranked better) of -log sigmoid(r_i - r_j), then
    the mean over prompts (Ouyang et al. 2022, eq. 1: the 1 / C(K, 2) factor, once). valid (B, K) bool marks
    responses that exist (rankings of different lengths); a prompt's mean is then over its valid pairs only.
    K = 2 is bradley_terry_loss. minChatGPT's `KPairwiseLoss` divides by C(K, 2) twice and uses log(sigmoid()).
    """
    B, K = rewards.shape
    rewards = rewards.float()
    valid = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid.bool()
    better = torch.ones(K, K, dtype=torch.bool, device=rewards.device).triu(diagonal=1)  # (K, K): i < j
    pairs = better & valid[:, :, None] & valid[:, None, :]  # (B, K, K)
    losses = -F.logsigmoid(rewards[:, :, None] - rewards[:, None, :])  # (B, K, K): pair (i, j)
    losses = torch.where(pairs, losses, torch.zeros_like(losses))
    per_prompt = losses.sum((1, 2)) / pairs.sum((1, 2)).clamp(min=1)  # (B,)
    return per_prompt.mean()


def divergent_suffix_loss(scores: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor | None = None,
                          margin: float = 0.0) -> torch.Tensor:
    """DeepSpeed-Chat's reward-model loss, for rankings as kwise_loss: scores (B, K, L), the raw reward at each
    position of prompt + response of K sequences per prompt, best first, each sequence's last score repeated past its
    end; tokens (B, K, L) its token ids, -1 past its end -> scalar.

    For a pair i < j (i better): the mean of -log sigmoid(s_i[t] - s_j[t] - margin) over the positions t from the
    first where the two sequences differ to the end of the longer; then, as kwise_loss, the mean over a prompt's
    valid pairs and over prompts. K = 2 is DeepSpeed-Chat step 2 (`dschat/utils/model/reward_model.py`,
    RewardModel.forward: divergence_ind to end_ind = max(c_ind, r_ind), from trlx's summarize_rlhf), except past the
    shorter sequence's end, where DeepSpeed-Chat reads the scores of pad tokens and this reads its reward. Every
    prefix's reward is trained, so the RM is told which response is better where they first differ, not only at the
    end; the reward is still read at the last token. With the same score at every position it is kwise_loss."""
    B, K, L = scores.shape
    valid = torch.ones(B, K, dtype=torch.bool, device=scores.device) if valid is None else valid.bool()
    i, j = torch.triu_indices(K, K, offset=1, device=scores.device)  # every pair i < j
    differ = tokens[:, i] != tokens[:, j]  # (B, P, L)
    end = torch.maximum((tokens[:, i] >= 0).sum(-1), (tokens[:, j] >= 0).sum(-1))  # (B, P): the longer's length
    first = torch.where(differ.any(-1), differ.float().argmax(-1), end - 1)  # argmax: the first True
    t = torch.arange(L, device=scores.device)
    span = (t >= first[..., None]) & (t < end[..., None])  # (B, P, L), never empty
    losses = -F.logsigmoid(scores[:, i].float() - scores[:, j].float() - margin)
    per_pair = (losses * span).sum(-1) / span.sum(-1)  # (B, P)
    pairs = valid[:, i] & valid[:, j]
    per_prompt = (per_pair * pairs).sum(1) / pairs.sum(1).clamp(min=1)
    return per_prompt.mean()


def ranked_pair_differences(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """x (B, K) best first -> x_i - x_j for every valid pair i < j, flattened: the margins of all comparisons."""
    i, j = torch.triu_indices(x.size(1), x.size(1), offset=1, device=x.device)
    return (x[:, i] - x[:, j])[valid[:, i] & valid[:, j]]


def normalization_gain_bias(raw: torch.Tensor, with_gain: bool) -> tuple[float, float]:
    """(gain, bias) such that gain * raw + bias has mean 0 and, with_gain, std 1 on this set.

    OpenAI 2019 (`train_reward.py`) sets both on samples of the reference policy so rewards are ~N(0, 1);
    N+ (`reward.py`) only subtracts the mean score of the SFT references. Population std, as `tf.nn.moments`."""
    mean, std = raw.float().mean().item(), raw.float().std(unbiased=False).item()
    gain = 1.0 / max(std, 1e-8) if with_gain else 1.0
    return gain, -gain * mean


# -----------------------------------------------------------------------------
# Data: every comparison is a ranking {prompt, responses best first, golds}; a pair is a ranking of two


def load_comparisons(source: str, split: str, max_records: int | None, cfg: Config) -> list[dict]:
    if source == "default" and cfg.data_format == "ranked":
        # load_records cannot ask the default task for K > 2 responses, so ask it directly.
        split = "train" if split == "all" else split
        n = max_records or data.DEFAULT_SIZES[split]
        return data.make_default_records("ranked", split, n, cfg.seed, k=cfg.k)
    return data.load_records(source, cfg.data_format, split=split, max_records=max_records, seed=cfg.seed)


def encode_comparisons(records: list[dict], tok, cfg: Config, stats: data.TruncationStats) -> list[dict]:
    """Tokenized comparisons: {"prompt": ids, "responses": [ids, ...] best first, "golds": [float, ...] or None}.

    Truncation as data.encode_pair: prompts from the left, responses (+ EOS) from the right, counted in stats.
    A pair whose two sides become identical is dropped and counted (a tie carries no preference). In a ranking,
    a response identical to a better-ranked one is removed (each tie counted as one dropped pair); a ranking
    left with fewer than two responses is dropped."""
    items = []
    for rec in records:
        if cfg.data_format == "preference":
            golds = [rec["chosen_gold"], rec["rejected_gold"]] if "chosen_gold" in rec else None
            encoded = data.encode_preference(tok, rec["prompt"], rec["chosen"], rec["rejected"],
                                             cfg.max_prompt_tokens, cfg.max_response_tokens, stats)
            if encoded is not None:
                items.append({"prompt": encoded[0], "responses": list(encoded[1:]), "golds": golds})
            continue
        # Cut as data.encode_preference cuts each response.
        prompt = data.cut_prompt(tok.encode(rec["prompt"]), cfg.max_prompt_tokens, stats)
        kept, kept_golds = [], []
        for i, text in enumerate(rec["responses"]):
            ids = data.cut_response(tok.encode(text), tok.eos_id, cfg.max_response_tokens, stats)
            ties = sum(ids == other for other in kept)
            stats.pairs_dropped_identical += ties
            if not ties:
                kept.append(ids)
                kept_golds.append(rec["golds"][i] if "golds" in rec else None)
        if len(kept) >= 2:
            items.append({"prompt": prompt, "responses": kept, "golds": kept_golds if "golds" in rec else None})
    return items


def collate_comparisons(items: list[dict], pad_id: int, K: int, packed: bool = False) -> dict[str, torch.Tensor]:
    """B comparisons -> one right-padded batch of K * B rows, response-major: rows k*B .. k*B+B-1 hold the k-th
    response of every prompt, so one forward scores all of them (for K = 2 exactly data.collate_pairs: chosen,
    then rejected). valid (B, K) marks real responses; a missing one is filled with the prompt's best response
    (finite, never counted). packed: the same K * B sequences packed (data.pack_sft), sequence i marked by
    document_ids == i."""
    rows, valid = [], torch.zeros(len(items), K, dtype=torch.bool)
    for k in range(K):
        for b, item in enumerate(items):
            have = k < len(item["responses"])
            valid[b, k] = have
            rows.append((item["prompt"], item["responses"][k if have else 0]))
    if packed:
        return {**data.pack_sft(rows, pad_id), "valid": valid}
    batch = data.collate_sft(rows, pad_id)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "valid": valid}


def comparison_scores(model, batch: dict, d: Dist, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over the K * B sequences of collate_comparisons (padded or packed) -> (scores, tokens), both
    (B, K, L): each sequence's raw score (float32, no gain/bias) and token id at each of its positions, from its first;
    past its end, its last score repeated and token -1. So scores[..., -1] is each reward, read at the last token:
    the EOS, or the last kept token of a cut response (as evaluate.sequence_rewards)."""
    ids, mask = batch["input_ids"].to(d.device), batch["attention_mask"].to(d.device)
    docs, positions = (batch[k].to(d.device) if k in batch else None for k in ("document_ids", "position_ids"))  # packed
    with autocast(d, bf16):
        scalars = model(ids, attention_mask=mask, head="score", position_ids=positions, document_ids=docs).float()
    B, K = batch["valid"].shape
    if docs is None:  # padded: row r is sequence r, right-padded, so its positions are the columns
        docs = torch.arange(ids.size(0), device=ids.device)[:, None].expand_as(ids).masked_fill(mask == 0, -1)
        positions = torch.arange(ids.size(1), device=ids.device).expand_as(ids)
    # The longest sequence's length, read from the CPU batch: no device sync in the training loop.
    L = int(batch["position_ids"].max()) + 1 if "position_ids" in batch else ids.size(1)
    real = docs >= 0
    seq, pos = docs[real], positions[real]
    grid = scalars.new_zeros(K * B, L).index_put((seq, pos), scalars[real])
    tokens = torch.full((K * B, L), -1, dtype=torch.long, device=ids.device).index_put((seq, pos), ids[real])
    length = (tokens >= 0).sum(1)
    held = grid.gather(1, torch.minimum(torch.arange(L, device=ids.device), length[:, None] - 1))
    return held.view(K, B, L).transpose(0, 1), tokens.view(K, B, L).transpose(0, 1)


def comparison_rewards(model, batch: dict, d: Dist, bf16: bool) -> torch.Tensor:
    """collate_comparisons' batch -> rewards (B, K), float32, raw: each sequence's score at its last token."""
    return comparison_scores(model, batch, d, bf16)[0][..., -1]


def comparison_loss(rewards: torch.Tensor, valid: torch.Tensor, cfg: Config, scores: torch.Tensor | None = None,
                    tokens: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of rewards (B, K), best first. Given comparison_scores' scores and tokens (training) and
    --loss_positions=suffix, divergent_suffix_loss; otherwise at the last token: Bradley-Terry for pairs, the
    K-wise loss for rankings (evaluation's eval/loss is always this one, on the rewards that ppo.py reads)."""
    if cfg.loss_positions == "suffix" and scores is not None:
        return divergent_suffix_loss(scores, tokens, valid, cfg.margin)
    if cfg.data_format == "preference":
        return bradley_terry_loss(rewards[:, 0], rewards[:, 1], cfg.margin)
    return kwise_loss(rewards, valid)


# -----------------------------------------------------------------------------
# Evaluation and normalization


@torch.no_grad()
def eval_metrics(model, items: list[dict], pad_id: int, cfg: Config, d: Dist) -> dict:
    """Held-out loss, accuracy (fraction of comparisons with r_better > r_worse) and mean margin; with gold
    scores (the default task), accuracy against the noiseless gold order (gold ties left out) and the Pearson
    correlation of learned and gold reward over all held-out responses. Every rank evaluates the same items."""
    model.eval()
    K = max(len(item["responses"]) for item in items)
    rewards, valid = [], []
    for start in range(0, len(items), cfg.micro_batch_size):
        batch = collate_comparisons(items[start:start + cfg.micro_batch_size], pad_id, K)
        rewards.append(comparison_rewards(model, batch, d, cfg.bf16).cpu())
        valid.append(batch["valid"])
    model.train()
    rewards, valid = torch.cat(rewards), torch.cat(valid)
    diffs = ranked_pair_differences(rewards, valid)
    metrics = {"eval/loss": comparison_loss(rewards, valid, cfg).item(), "eval/accuracy": (diffs > 0).float().mean().item(),
               "eval/margin": diffs.mean().item(), "eval/reward_mean": rewards[valid].mean().item(),
               "eval/reward_std": rewards[valid].std().item(), **length_baselines(items, valid)}
    if all(item["golds"] is not None for item in items):
        golds = torch.tensor([item["golds"] + [0.0] * (K - len(item["golds"])) for item in items])
        gold_diffs = ranked_pair_differences(golds, valid)
        decided = gold_diffs != 0
        metrics["eval/accuracy_gold"] = ((diffs[decided] > 0) == (gold_diffs[decided] > 0)).float().mean().item()
        metrics["eval/pearson_gold"] = torch.corrcoef(torch.stack([rewards[valid], golds[valid]]))[0, 1].item()
    return metrics


def length_baselines(items: list[dict], valid: torch.Tensor) -> dict:
    """The accuracy of two reward models that read only the response length (tokens), on the same comparisons:
    "shorter wins" and "longer wins", a tie counted as half right. A learned RM should beat both; matching one of
    them means it may have learned length (Singhal et al. 2023, "A Long Way to Go", report it for HH)."""
    K = valid.shape[1]
    lengths = torch.tensor([[len(r) for r in item["responses"]] + [0] * (K - len(item["responses"])) for item in items],
                           dtype=torch.float32)
    diffs = ranked_pair_differences(lengths, valid)  # better minus worse, as the rewards' diffs
    ties = (diffs == 0).float().mean().item()
    return {"eval/acc_shorter_wins": (diffs < 0).float().mean().item() + ties / 2,
            "eval/acc_longer_wins": (diffs > 0).float().mean().item() + ties / 2}


def normalization_set(cfg: Config, tok, d: Dist) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) whose rewards the normalization centers: responses sampled from the SFT
    policy on training prompts, which is what PPO scores at its start (OpenAI 2019), or the SFT dataset's
    reference responses (N+). Prompts and responses are cut as in training (samples are max_response_tokens
    long at most, ppo.py's response_length by default); samples are seeded."""
    n = cfg.normalize_examples
    if cfg.normalize_on == "references":
        stats = data.TruncationStats()
        records = data.apply_chat_template(data.load_records(cfg.dataset, "sft", split="train", max_records=n,
                                                             seed=cfg.seed), tok, cfg.chat_template)
        return [data.encode_pair(tok, r["prompt"], r["response"], cfg.max_prompt_tokens, cfg.max_response_tokens,
                                 stats) for r in records]
    records = data.load_records(cfg.dataset, "prompt", split="train", max_records=n, seed=cfg.seed)
    prompts = [r["prompt"] for r in data.apply_chat_template(records, tok, cfg.chat_template)]
    policy = load_model(cfg.sft, "policy", d, trainable=False, bf16=cfg.bf16)  # frozen, whole on every rank
    samples = sample_responses(policy, tok, prompts, d, cfg.max_response_tokens, cfg.normalize_temperature,
                               seed=cfg.seed + 2, max_prompt_tokens=cfg.max_prompt_tokens, bf16=cfg.bf16)
    return [(s["prompt_ids"], s["response_ids"]) for s in samples]


@torch.no_grad()
def score_sequences(model, seqs: list[tuple[list[int], list[int]]], pad_id: int, cfg: Config, d: Dist) -> torch.Tensor:
    """Raw rewards (N,) of (prompt ids, response ids) pairs, read at each sequence's last token, on CPU."""
    model.eval()
    out = []
    for start in range(0, len(seqs), cfg.micro_batch_size):
        ids, mask = data.pad_right([p + r for p, r in seqs[start:start + cfg.micro_batch_size]], pad_id)
        ids, mask = ids.to(d.device), mask.to(d.device)
        with autocast(d, cfg.bf16):
            scalars = model(ids, attention_mask=mask, head="score")
        out.append(sequence_rewards(scalars, mask).cpu())
    model.train()
    return torch.cat(out)


# -----------------------------------------------------------------------------
# The stage


def export_sequence_classifier(final: str, tok) -> str:
    """final/reward_hf: the reward model as transformers' *ForSequenceClassification (num_labels=1), the class
    TRL's PPOTrainer and RewardTrainer load reward models as. HF reads the score at the rightmost token that is
    not pad_token_id, so the pad id must differ from EOS (transformers #35352): the tokenizer's own pad if it has
    one, else id 0; pad batches with it. reward = logits[:, 0] + config.json["rlhf_reward_bias"] (HF's head has
    no bias; model.save_hf_sequence_classifier). Written beside, then renamed: present means complete."""
    reward = GPT.from_pretrained(os.path.join(final, "reward"))
    out, tmp = os.path.join(final, "reward_hf"), os.path.join(final, "reward_hf.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf_sequence_classifier(tmp, reward.config, reward.state_dict(), tok.pad_id if tok.pad_id != tok.eos_id else 0)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def bootstrap_indices(n: int, seed: int) -> list[int]:
    """n indices drawn uniformly with replacement from range(n), seeded: one bootstrap resample of the comparisons
    (Efron; Coste et al. 2023 section 4 compare ensembles on the same data with ensembles on resamples). About 63%
    of the comparisons appear at least once (1 - 1/e)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(n, (n,), generator=gen).tolist()


def member_dir(run_dir: str, member: int) -> str:
    """Where ensemble member k trains: a normal reward-model run directory (its final/reward loads alone)."""
    return f"{run_dir}/member_{member}"


def main(argv=None):
    cfg = parse_config(Config, argv, {"real": REAL_DATA})
    if cfg.data_format not in ("preference", "ranked"):
        raise SystemExit(f"--data_format={cfg.data_format!r}: choose preference or ranked")
    if cfg.normalize_on not in ("samples", "references", "none"):
        raise SystemExit(f"--normalize_on={cfg.normalize_on!r}: choose samples, references or none")
    if cfg.loss_positions not in ("last", "suffix"):
        raise SystemExit(f"--loss_positions={cfg.loss_positions!r}: choose last or suffix")
    if cfg.margin and cfg.data_format == "ranked":
        raise SystemExit("--margin applies to pairs (data_format=preference) only")
    if cfg.ensemble_size < 1:
        raise SystemExit(f"--ensemble_size={cfg.ensemble_size}: at least 1")
    if cfg.bootstrap and cfg.ensemble_size == 1:
        raise SystemExit("--bootstrap resamples the comparisons of each ensemble member: set --ensemble_size >= 2")
    d = init_distributed(cfg.device)
    if cfg.ensemble_size == 1:
        train(cfg, d, member=0)
    else:
        # Members one after another, each a complete RM run (resumable on its own); the data and the
        # normalization samples are the same for all (they follow cfg.seed), the head, order and resample differ.
        results = [train(replace(cfg, run_dir=member_dir(cfg.run_dir, k)), d, member=k) for k in range(cfg.ensemble_size)]
        if d.is_main:
            write_ensemble_manifest(cfg, results)
    shutdown_distributed()


def write_ensemble_manifest(cfg: Config, results: list[dict]):
    """run_dir/ensemble.json: the members' checkpoints (relative to run_dir) and their held-out numbers, which
    ppo.py and evaluate.py read when --reward_model names run_dir; and a table of the members on the console."""
    members = [{"path": f"member_{k}/final", **{key.removeprefix("eval/"): v for key, v in r.items()}}
               for k, r in enumerate(results)]
    with open(f"{cfg.run_dir}/ensemble.json", "w") as f:
        json.dump({"ensemble_size": cfg.ensemble_size, "bootstrap": cfg.bootstrap, "members": members}, f, indent=2)
    print(f"rm: ensemble of {cfg.ensemble_size} in {cfg.run_dir} (ensemble.json); per member:")
    for k, m in enumerate(members):
        gold = f", gold accuracy {m['accuracy_gold']:.3f}" if "accuracy_gold" in m else ""
        print(f"  member {k} (seed {cfg.seed + k}{', bootstrap' if cfg.bootstrap else ''}): held-out accuracy "
              f"{m.get('accuracy', float('nan')):.3f}{gold}")


def train(cfg: Config, d: Dist, member: int) -> dict:
    """One reward model into cfg.run_dir; returns its last held-out evaluation. member k of an ensemble draws its
    head, data order and bootstrap resample from seed + k (member 0 is exactly the single RM of the same flags
    without --bootstrap)."""
    seed = cfg.seed + member
    seed_all(seed)  # the new head is drawn from the global generator (model.init_weights)
    check_writable(cfg.run_dir)
    preemption = watch_preemption(cfg.preempt_signals)  # SIGTERM: save at the end of this step, exit 75

    # 1. Model: the SFT trunk plus a fresh scalar head; raw rewards (gain 1, bias 0) until normalization.
    # With --lora_rank: adapters on the frozen SFT trunk, the head trained in full (runtime.load_model).
    model = load_model(cfg.sft, "policy", d, trainable=True, scalar_head=True, dropout=cfg.dropout, **lora_flags(cfg))
    model.config.reward_gain, model.config.reward_bias = 1.0, 0.0
    # The loss sees only reward differences, so the head's bias gets a zero gradient up to rounding, which Adam
    # would blow up into lr-sized random steps. Frozen at 0; the normalization sets the offset.
    model.score.bias.requires_grad_(False)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    tok = data.get_tokenizer(model.config.tokenizer)
    check_context(model, cfg.max_prompt_tokens, cfg.max_response_tokens, "rm", "--max_prompt_tokens + --max_response_tokens")

    # 2. Data: comparisons, tokenized once; truncation counted, ties made by truncation dropped.
    try:
        records, eval_records = data.split_heldout(lambda source, split, n: load_comparisons(source, split, n, cfg),
                                                   cfg.dataset, cfg.eval_dataset, cfg.max_train_examples,
                                                   cfg.eval_examples, "rm",
                                                   f"{cfg.run_dir}/prompts.json" if d.is_main else None)
        records, eval_records = (data.apply_chat_template(r, tok, cfg.chat_template) for r in (records, eval_records))
        stats = data.TruncationStats()
        items = encode_comparisons(records, tok, cfg, stats)
        eval_items = encode_comparisons(eval_records, tok, cfg, data.TruncationStats())
    except data.DataError as e:
        raise SystemExit(f"rm: {e}")
    if cfg.bootstrap:
        items = [items[i] for i in bootstrap_indices(len(items), seed)]
    if len(items) < cfg.batch_size or not eval_items:
        raise SystemExit(f"rm: {len(items)} usable training / {len(eval_items)} held-out comparisons in {cfg.dataset}; "
                         f"need at least one batch of {cfg.batch_size} and one held-out comparison")
    K = max(len(item["responses"]) for item in items)
    # Drawn now (seeded, so a resumed run draws the same), scored after training: a missing SFT checkpoint
    # or dataset fails here, not after the whole run.
    norm_set = normalization_set(cfg, tok, d) if cfg.normalize_on != "none" else []
    if d.is_main:
        print(f"rm: {len(items)} train / {len(eval_items)} held-out comparisons ({cfg.data_format}, up to {K} "
              f"responses each), {len(norm_set)} normalization responses ({cfg.normalize_on}); {stats.summary()}")

    # 3. Batch arithmetic: the global batch of comparisons is fixed; processes and accumulation split it.
    per_rank, micro, steps_per_epoch, _ = split_batch(cfg.batch_size, cfg.micro_batch_size, len(items), cfg.max_steps, d)
    max_steps = cfg.max_steps or cfg.num_epochs * steps_per_epoch

    # 4. Model sharding, optimizer, and the state to resume from.
    model = shard_model(model, d, cfg.bf16)
    optimizer = make_adamw(model, cfg.lr, cfg.weight_decay)
    step, state, metrics = start_or_resume(cfg.run_dir, cfg.resume, {"reward": model}, {"reward": (model, optimizer)},
                                           max_steps, d, "rm", config=cfg)
    skipped_steps, bad_streak = state.get("skipped_steps", 0), 0

    # 5. The loop. Data order depends only on (seed, epoch), so a resumed run sees the same batches.
    stop_at = min(max_steps, step + cfg.stop_after) if cfg.stop_after else max_steps
    t0, tokens_seen, last_eval = time.time(), 0, {}
    bar = progress_bar(max_steps, step, "rm", d)
    while step < stop_at:
        epoch, index = divmod(step, steps_per_epoch)
        batch_items = batch_at(items, per_rank, seed, epoch, index, d.rank, d.world_size)
        lr = lr_at(step, max_steps, cfg.lr, cfg.warmup_steps, cfg.lr_schedule)
        set_lr(optimizer, lr)
        loss_sum, correct, n_pairs, margin_sum = (torch.zeros((), device=d.device) for _ in range(4))
        for i in range(0, per_rank, micro):
            # One forward scores every response of the micro-batch (chosen and rejected rows together).
            batch = collate_comparisons(batch_items[i:i + micro], tok.eos_id, K, packed=cfg.packing)
            scores, tokens = comparison_scores(model, batch, d, cfg.bf16)  # (micro, K, L)
            rewards, valid = scores[..., -1], batch["valid"].to(d.device)  # (micro, K): at the last token
            loss = comparison_loss(rewards, valid, cfg, scores, tokens)
            # loss is the mean over this micro-batch; weighted by micro / batch_size, the sum over micro-batches
            # and ranks is the mean over the global batch. FSDP averages gradients over ranks: scale by world_size.
            (loss * micro * d.world_size / cfg.batch_size).backward()
            diffs = ranked_pair_differences(rewards.detach(), valid)
            loss_sum += loss.detach() * micro
            correct += (diffs > 0).sum()
            n_pairs += diffs.numel()
            margin_sum += diffs.sum()
            tokens_seen += int(batch["attention_mask"].sum())
        grad_norm, skipped_steps, bad_streak = guarded_step(model, optimizer, loss_sum, cfg.grad_clip, skipped_steps,
                                                            bad_streak, step + 1, d)
        step += 1
        bar.update(1)

        if step % cfg.log_every == 0 or step == max_steps:
            n_pairs = all_reduce_sum(n_pairs, d)
            row = {"train/loss": (all_reduce_sum(loss_sum, d) / cfg.batch_size).item(),
                   "train/accuracy": (all_reduce_sum(correct, d) / n_pairs).item(),
                   "train/margin": (all_reduce_sum(margin_sum, d) / n_pairs).item(), "lr": lr,
                   "grad_norm": grad_norm.item(), "epoch": step / steps_per_epoch, "train/skipped_steps": skipped_steps,
                   **speed_metrics(tokens_seen, time.time() - t0, model, cfg.max_prompt_tokens + cfg.max_response_tokens, d)}
            metrics.log(step, row, echo=False)
            bar.set_postfix(loss=f"{row['train/loss']:.3f}", acc=f"{row['train/accuracy']:.2f}")
        check_nonfinite_streak(bad_streak, cfg.max_nonfinite_steps, step, cfg.run_dir)  # before saving this state
        if step % cfg.eval_every == 0 or step == max_steps:
            last_eval = eval_metrics(model, eval_items, tok.eos_id, cfg, d)
            metrics.log(step, last_eval)
        if step == max_steps and cfg.normalize_on != "none":
            # 6. Normalize before the final checkpoint, so final/reward/config.json carries gain and bias.
            raw = score_sequences(model, norm_set, tok.eos_id, cfg, d)
            gain, bias = normalization_gain_bias(raw, cfg.normalize_gain)
            model.config.reward_gain, model.config.reward_bias = gain, bias
            metrics.log(step, {"normalize/raw_mean": raw.mean().item(), "normalize/raw_std": raw.std(unbiased=False).item(),
                               "normalize/gain": gain, "normalize/bias": bias})
        preempt = preempted(preemption, d) and step < max_steps  # under torchrun, a MAX all_reduce: all ranks stop together
        if step % cfg.save_every == 0 or step == stop_at or preempt:
            save_checkpoint(cfg.run_dir, step, {"reward": model}, {"reward": (model, optimizer)},
                            {"skipped_steps": skipped_steps}, cfg, d, keep=cfg.keep_last, final=step == max_steps)
        if preempt:
            exit_preempted(cfg.run_dir, step, d, "rm")
    bar.close()
    if d.is_main and step == max_steps and last_eval:
        gold = f", gold accuracy {last_eval['eval/accuracy_gold']:.3f}" if "eval/accuracy_gold" in last_eval else ""
        print(f"rm: done, {step} steps in {time.time() - t0:.0f}s; held-out accuracy {last_eval['eval/accuracy']:.3f}"
              f"{gold}; reward = {model.config.reward_gain:.4g} * raw + {model.config.reward_bias:.4g}; "
              f"reward model in {cfg.run_dir}/final/reward")
        print(f"rm: for transformers: {export_sequence_classifier(os.path.join(cfg.run_dir, 'final'), tok)}")
    # A run resumed after its last step evaluates nothing now: its numbers are in metrics.jsonl.
    return last_eval or last_logged_eval(f"{cfg.run_dir}/metrics.jsonl")


if __name__ == "__main__":
    run_main(main)
