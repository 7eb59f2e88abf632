"""Stage 1 of RLHF: supervised fine-tuning on demonstrations {prompt, response}.

Maximum likelihood on the response tokens only (prompt tokens carry no loss), with EOS appended to
every response so the model learns to stop (InstructGPT, Ouyang et al. 2022, section 3.5). The
result is the starting point of the reward model and of the PPO policy, and PPO's frozen reference.

    python sft.py                                   # the built-in default task, CPU, a few minutes
    python sft.py --init_from=gpt2 --tokenizer=gpt2 --dataset=Anthropic/hh-rlhf:harmless-base \\
        --max_prompt_tokens=384 --max_response_tokens=128 --model_size=gpt2
    torchrun --nproc_per_node=8 sft.py ...          # FSDP2, bf16 autocast on CUDA
"""

import time
from dataclasses import dataclass

import torch

import data
from evaluate import sample_metrics, sample_responses, show_samples
from model import GPT, config_for, lora_flags, train_lora_only
from runtime import (Dist, all_reduce_sum, autocast, batch_at, check_context, check_nonfinite_streak, check_writable,
                     exit_preempted, guarded_step, init_distributed, load_model, lr_at, make_adamw, parse_config,
                     preempted, progress_bar, save_checkpoint, seed_all, set_lr, shard_model, run_main, shutdown_distributed,
                     speed_metrics, split_batch, start_or_resume, watch_preemption)


@dataclass
class Config:
    run_dir: str = "runs/sft"
    """where checkpoints, metrics.jsonl and final/ go"""
    init_from: str = "scratch"
    """"scratch" (random init, model_size), a hub name such as "gpt2", or a local HF-format directory (e.g. another run's final/)"""
    model_size: str = "cpu-small"
    """model.GPT_SIZES name, used when init_from=scratch"""
    n_layer: int = 0
    """from scratch: layers (0 = model_size's)"""
    n_head: int = 0
    """from scratch: attention heads (0 = model_size's)"""
    n_embd: int = 0
    """from scratch: width (0 = model_size's)"""
    block_size: int = 0
    """from scratch: context length in tokens (0 = model_size's; cpu-small has 64)"""
    tokenizer: str = "char"
    """"char" for the default task, "gpt2" for real data (taken from the checkpoint when init_from is one)"""
    dataset: str = "default"
    """"default" (built-in task), a local .jsonl/.json(.gz) file, or a hub name (Anthropic/hh-rlhf, ...)"""
    profile: str = "auto"
    """"toy": the defaults below, tuned for the built-in task; "real": REAL_DATA (limits and learning rates for
    real text and pretrained models); "auto": real unless dataset is "default". Explicit flags always win"""
    eval_dataset: str = ""
    """held-out data; empty = the test split of `dataset`"""
    chat_template: str = "auto"
    """prompts rendered by a chat template: "auto" = the tokenizer's own if it has one (instruct models; GPT-2 and
    the char tokenizer have none), "none" = plain text, or a Jinja file (data.apply_chat_template)"""
    max_train_examples: int = 0
    """use at most this many training examples (0 = all)"""
    max_prompt_tokens: int = 12
    """prompts longer than this are cut from the left (counted)"""
    max_response_tokens: int = 16
    """responses (with EOS) longer than this are cut from the right (counted)"""
    train_on_prompt: bool = False
    """also put loss on prompt tokens (the TL;DR N+ recipe trains on query+response)"""
    batch_size: int = 64
    """global batch in examples per optimizer step, whatever the number of processes"""
    micro_batch_size: int = 64
    """examples per forward pass per process; batch_size / (world_size * micro) steps are accumulated"""
    max_steps: int = 1200
    """optimizer steps; 0 = one epoch over the data"""
    lr: float = 2e-3
    """peak learning rate (AdamW)"""
    weight_decay: float = 0.1
    """AdamW decay on 2-D weights only"""
    warmup_steps: int = 50
    """linear warmup steps"""
    lr_schedule: str = "cosine"
    """cosine, linear or constant after warmup"""
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
    """padding-free packing: each micro-batch's examples concatenated into as few rows as fit the longest one, positions
    restarting and attention block-diagonal per example (data.pack_sft); the same examples and loss as padded. On for
    the built-in task, whose padded batches are 30% padding (docs/lab.md has the times); the real profile keeps it
    off, as docs/real-model.md's runs were padded"""
    gradient_checkpointing: bool = False
    """recompute each block's activations in backward to save memory"""
    eval_every: int = 200
    """steps between evaluations (held-out loss, samples, gold reward on the default task)"""
    eval_examples: int = 256
    """held-out examples for the loss and prompts for sampling"""
    eval_temperature: float = 1.0
    """sampling temperature of evaluation samples"""
    num_samples_shown: int = 3
    """sampled responses printed at each evaluation"""
    save_every: int = 400
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
    """seeds init, data order and sampling"""
    device: str = "auto"
    """auto, cpu or cuda"""
    bf16: bool = True
    """bf16 autocast on CUDA (ignored on CPU)"""
    log_every: int = 20
    """steps between metric lines"""
    report_to: str = ""
    """also log metrics to "tensorboard" (run_dir/tensorboard) and/or "wandb", comma-separated (TRL's report_to)"""


# --profile=real: what replaces the toy defaults on real data. Prompt/response limits fit HH-RLHF (median
# prompt 97 GPT-2 tokens); lr 2e-5 is TRL's SFTConfig default (trl/trainer/sft_config.py L141); one epoch as
# N+ and InstructGPT's SFT; micro-batch 8 keeps the (micro, T, 50257) logits near 1 GB.
REAL_DATA = dict(max_prompt_tokens=384, max_response_tokens=128, block_size=512, lr=2e-5, batch_size=64,
                 micro_batch_size=8, max_steps=0, warmup_steps=10, packing=False)


def loss_start(loss_mask: torch.Tensor) -> int:
    """The first position whose prediction is trained on, for GPT.forward's logits_from: position t predicts
    token t + 1, so one before the first column where any row's loss_mask is 1 (0 when there is none). The
    logits of the positions before it (the shortest prompt's, less one) are never read. loss_mask (B, T);
    pass the CPU copy, so reading the int does not wait for a GPU."""
    columns = loss_mask.any(0).nonzero()
    return max(int(columns[0]) - 1, 0) if len(columns) else 0


def sft_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor, logits_from: int = 0):
    """Summed token cross-entropy over the tokens that loss_mask marks, and their count.

    logits (B, T - logits_from, V): positions logits_from..T-1, as GPT.forward(..., logits_from) returns them
    (the whole sequence by default); the logits at position t predict input_ids[t + 1]; loss_mask[b, t] = 1
    marks token t as a target, and none before logits_from + 1 may be marked (`loss_start`). Returns
    (sum, count) so the caller can divide by the token count of the whole global batch: the same loss
    whatever the split into processes and micro-batches."""
    targets, mask = input_ids[:, logits_from + 1:], loss_mask[:, logits_from + 1:].float()
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # float32: see model.token_logprobs
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (nll * mask).sum(), mask.sum()


def build_policy(cfg: Config, d: Dist):
    """Scratch (random init), a hub name, or a local HF-format directory; with --lora_rank, adapters on a frozen base."""
    if cfg.init_from == "scratch":
        tok = data.get_tokenizer(cfg.tokenizer)
        sizes = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "block_size") if getattr(cfg, k)}
        model = GPT(config_for(cfg.model_size, vocab_size=tok.vocab_size, dropout=cfg.dropout, tokenizer=tok.name,
                               **sizes, **lora_flags(cfg)))
        model.init_weights(seed=cfg.seed)
        if cfg.lora_rank:
            train_lora_only(model)
        model = model.to(d.device)
    else:
        model = load_model(cfg.init_from, "policy", d, trainable=True, shard=True, dropout=cfg.dropout, **lora_flags(cfg))
        tok = data.get_tokenizer(model.config.tokenizer)  # HF's own GPT-2 checkpoints mean "gpt2"
    model.gradient_checkpointing = cfg.gradient_checkpointing
    return model, tok


def encode_all(records, tok, cfg: Config):
    stats = data.TruncationStats()
    pairs = [data.encode_pair(tok, r["prompt"], r["response"], cfg.max_prompt_tokens, cfg.max_response_tokens, stats)
             for r in records]
    return pairs, stats


@torch.no_grad()
def heldout_loss(model, pairs, cfg: Config, d: Dist, pad_id: int) -> float:
    model.eval()
    total, count = torch.zeros((), device=d.device), torch.zeros((), device=d.device)
    for start in range(0, len(pairs), cfg.micro_batch_size):
        batch = data.collate_sft(pairs[start:start + cfg.micro_batch_size], pad_id, cfg.train_on_prompt)
        first = loss_start(batch["loss_mask"])
        batch = {k: v.to(d.device) for k, v in batch.items()}
        with autocast(d, cfg.bf16):
            logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], logits_from=first)
        s, c = sft_loss(logits, batch["input_ids"], batch["loss_mask"], first)
        total, count = total + s, count + c
    model.train()
    return (total / count).item()  # every rank evaluates the same examples: no reduction needed


def eval_metrics(model, tok, eval_pairs, eval_records, cfg: Config, d: Dist, step: int) -> dict:
    metrics = {"eval/loss": heldout_loss(model, eval_pairs, cfg, d, tok.eos_id)}
    prompts = [r["prompt"] for r in eval_records]
    samples = sample_responses(model, tok, prompts, d, cfg.max_response_tokens, cfg.eval_temperature,
                               seed=cfg.seed + 1, max_prompt_tokens=cfg.max_prompt_tokens, bf16=cfg.bf16)
    metrics.update(sample_metrics(samples, graded=cfg.dataset == "default"))
    if d.is_main:
        show_samples(samples, cfg.num_samples_shown, f"step {step}", graded=cfg.dataset == "default")
    return metrics


def main(argv=None):
    cfg = parse_config(Config, argv, {"real": REAL_DATA})
    d = init_distributed(cfg.device)
    seed_all(cfg.seed)
    check_writable(cfg.run_dir)
    preemption = watch_preemption(cfg.preempt_signals)  # SIGTERM: save at the end of this step, exit 75

    # 1. Data: demonstrations, tokenized once, truncation counted and reported.
    model, tok = build_policy(cfg, d)
    check_context(model, cfg.max_prompt_tokens, cfg.max_response_tokens, "sft", "--max_prompt_tokens + --max_response_tokens")
    try:
        records, eval_records = data.split_heldout(
            lambda source, split, n: data.load_records(source, "sft", split, max_records=n, seed=cfg.seed),
            cfg.dataset, cfg.eval_dataset, cfg.max_train_examples, cfg.eval_examples, "sft",
            f"{cfg.run_dir}/prompts.json" if d.is_main else None)
        records, eval_records = (data.apply_chat_template(r, tok, cfg.chat_template) for r in (records, eval_records))
    except data.DataError as e:
        raise SystemExit(f"sft: {e}")
    pairs, stats = encode_all(records, tok, cfg)
    eval_pairs, _ = encode_all(eval_records, tok, cfg)
    if len(pairs) < cfg.batch_size:
        raise SystemExit(f"{len(pairs)} usable training examples in {cfg.dataset}, fewer than one batch of {cfg.batch_size}")
    if d.is_main:
        print(f"sft: {len(pairs)} train / {len(eval_pairs)} held-out examples; {stats.summary()}")

    # 2. Batch arithmetic: the global batch is fixed; processes and accumulation split it.
    per_rank, micro, steps_per_epoch, max_steps = split_batch(cfg.batch_size, cfg.micro_batch_size, len(pairs),
                                                              cfg.max_steps, d)

    # 3. Model, optimizer, and the state to resume from.
    model = shard_model(model, d, cfg.bf16)
    optimizer = make_adamw(model, cfg.lr, cfg.weight_decay)
    step, state, metrics = start_or_resume(cfg.run_dir, cfg.resume, {"policy": model}, {"policy": (model, optimizer)},
                                           max_steps, d, "sft", config=cfg)
    skipped_steps, bad_streak = state.get("skipped_steps", 0), 0

    # 4. The loop. Data order depends only on (seed, epoch), so a resumed run sees the same batches.
    stop_at = min(max_steps, step + cfg.stop_after) if cfg.stop_after else max_steps
    t0, tokens_seen = time.time(), 0
    bar = progress_bar(max_steps, step, "sft", d)
    while step < stop_at:
        epoch, index = divmod(step, steps_per_epoch)
        batch_items = batch_at(pairs, per_rank, cfg.seed, epoch, index, d.rank, d.world_size)
        collate = data.pack_sft if cfg.packing else data.collate_sft
        micro_batches = [collate(batch_items[i:i + micro], tok.eos_id, cfg.train_on_prompt) for i in range(0, per_rank, micro)]
        # Normalize by the response tokens of the whole global batch (all ranks, all micro-batches).
        n_tokens = all_reduce_sum(sum(b["loss_mask"][:, 1:].sum() for b in micro_batches).float().to(d.device), d)
        lr = lr_at(step, max_steps, cfg.lr, cfg.warmup_steps, cfg.lr_schedule)
        set_lr(optimizer, lr)
        loss_sum = torch.zeros((), device=d.device)
        for batch in micro_batches:
            # The LM head skips the prompt positions before the first target (padded rows; a packed row's start is a prompt).
            first = loss_start(batch["loss_mask"])
            batch = {k: v.to(d.device) for k, v in batch.items()}
            with autocast(d, cfg.bf16):
                logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], logits_from=first,
                               position_ids=batch.get("position_ids"), document_ids=batch.get("document_ids"))
            token_loss, _ = sft_loss(logits, batch["input_ids"], batch["loss_mask"], first)
            # FSDP averages gradients over ranks; scale by world_size so the result is sum / n_tokens.
            (token_loss * d.world_size / n_tokens).backward()
            loss_sum += token_loss.detach()
            tokens_seen += int(batch["attention_mask"].sum())
        grad_norm, skipped_steps, bad_streak = guarded_step(model, optimizer, loss_sum, cfg.grad_clip, skipped_steps,
                                                            bad_streak, step + 1, d)
        step += 1
        bar.update(1)

        if step % cfg.log_every == 0 or step == max_steps:
            row = {"train/loss": (all_reduce_sum(loss_sum, d) / n_tokens).item(), "lr": lr,
                   "grad_norm": grad_norm.item(), "epoch": step / steps_per_epoch, "train/skipped_steps": skipped_steps,
                   **speed_metrics(tokens_seen, time.time() - t0, model, cfg.max_prompt_tokens + cfg.max_response_tokens, d)}
            metrics.log(step, row, echo=False)
            bar.set_postfix(loss=f"{row['train/loss']:.3f}")
        check_nonfinite_streak(bad_streak, cfg.max_nonfinite_steps, step, cfg.run_dir)  # before saving this state
        if step % cfg.eval_every == 0 or step == max_steps:
            metrics.log(step, eval_metrics(model, tok, eval_pairs, eval_records, cfg, d, step))
        preempt = preempted(preemption, d) and step < max_steps  # under torchrun, a MAX all_reduce: all ranks stop together
        if step % cfg.save_every == 0 or step == stop_at or preempt:
            save_checkpoint(cfg.run_dir, step, {"policy": model}, {"policy": (model, optimizer)},
                            {"skipped_steps": skipped_steps}, cfg, d, keep=cfg.keep_last, final=step == max_steps)
        if preempt:
            exit_preempted(cfg.run_dir, step, d, "sft")
    bar.close()
    if step == max_steps and d.is_main:
        print(f"sft: done, {step} steps in {time.time() - t0:.0f}s; policy in {cfg.run_dir}/final/policy")
    shutdown_distributed()

if __name__ == "__main__":
    run_main(main)
