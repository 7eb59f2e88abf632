"""Reward-model variants that docs/lab.md tried on the weak one-thread RMs ("What was tried on the weak RMs"),
none of which became a default. Each patches reward_model.py in this process only, then runs it with the flags after
"--" (packed batches, the built-in task's default; docs/lab.md's runs add --loss_positions=last, the default then):

    PYTHONPATH=. python docs/lab/rm_variants.py head_std=0.02 -- --sft=runs/sft/final --seed=3 --run_dir=runs/rm_v
        # the score head drawn N(0, 0.02), transformers' initializer_range (TRL's RewardTrainer), not OpenAI's
        # N(0, 1/sqrt(d_model + 1))
    PYTHONPATH=. python docs/lab/rm_variants.py head_only_steps=100 -- ...
        # the first 100 optimizer steps train the head alone, the trunk frozen ("linear probing, then fine-tuning",
        # Kumar et al. 2022: a random head's gradients distort the features it reads)
    PYTHONPATH=. python docs/lab/rm_variants.py sft_reg=0.1 -- ...
        # loss (1 - a) * the comparison loss + a * the SFT loss on the chosen responses, through the tied LM head,
        # after GRM's SFT regularizer (Yang et al. 2024, "Regularizing Hidden States Enables Learning Generalizable
        # Reward Model for LLMs"; its scripts' weight_ratio is 0.01)
"""
import sys

import torch

import reward_model
from runtime import run_main


def head_std(std: float):
    load = reward_model.load_model

    def patched(*args, **kwargs):
        model = load(*args, **kwargs)
        if model.score is not None:  # the RM, not the SFT policy that samples the normalization set
            with torch.no_grad():  # from the global generator, right after the default head's draw
                model.score.weight.normal_(0, std)
        return model
    reward_model.load_model = patched


def head_only_steps(n: int):
    step = reward_model.guarded_step
    calls = 0

    def patched(model, *args, **kwargs):
        nonlocal calls
        if calls < n:  # a parameter without a gradient is skipped by AdamW: no moment, no decay, no step
            for name, p in model.named_parameters():
                if not name.startswith("score."):
                    p.grad = None
        calls += 1
        return step(model, *args, **kwargs)
    reward_model.guarded_step = patched


def sft_reg(a: float):
    scores_of, loss_of = reward_model.comparison_scores, reward_model.comparison_loss
    lm = {}

    def scores(model, batch, d, bf16):
        hidden = {}
        hook = model.transformer.ln_f.register_forward_hook(lambda module, args, out: hidden.update(x=out))
        try:
            out = scores_of(model, batch, d, bf16)
        finally:
            hook.remove()
        if torch.is_grad_enabled() and "document_ids" in batch:  # training (packed), not evaluation
            ids, docs = batch["input_ids"].to(d.device), batch["document_ids"].to(d.device)
            B = batch["valid"].shape[0]
            # targets: response tokens of the chosen rows (documents 0 .. B-1, collate_comparisons' first K-block)
            target = batch["loss_mask"].to(d.device)[:, 1:].bool() & (docs[:, 1:] >= 0) & (docs[:, 1:] < B)
            logits = model.lm_head(hidden["x"])
            logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            lm["loss"] = -(logp * target).sum() / target.sum()
        return out

    def loss(rewards, valid, cfg, *rest):
        comparison = loss_of(rewards, valid, cfg, *rest)
        return (1 - a) * comparison + a * lm.pop("loss") if "loss" in lm else comparison
    reward_model.comparison_scores, reward_model.comparison_loss = scores, loss


if __name__ == "__main__":
    variant, sep, *flags = sys.argv[1:]
    assert sep == "--", "usage: rm_variants.py NAME=VALUE -- reward_model.py flags"
    name, value = variant.split("=")
    {"head_std": lambda v: head_std(float(v)), "head_only_steps": lambda v: head_only_steps(int(v)),
     "sft_reg": lambda v: sft_reg(float(v))}[name](value)
    sys.argv = ["reward_model.py", *flags]
    run_main(reward_model.main)
