"""Sampling and scoring policies on held-out prompts: used inside every stage's evaluation, and by
launch.sh for the final report (`python evaluate.py --help`)."""

import torch

from data import pad_left
from model import generate
from runtime import autocast, unsharded


@torch.no_grad()
def sample_responses(model, tok, prompts: list[str], d, max_new_tokens: int, temperature: float, seed: int,
                     batch_size: int = 64, max_prompt_tokens: int = 512) -> list[dict]:
    """Generate one response per prompt. Returns dicts with the prompt, the response text (EOS
    stripped), whether it ended with EOS, its length in tokens, and the token ids (for scoring).

    Every rank generates for every prompt (the model may be sharded, so all ranks take part in each
    forward); the generator is seeded per batch, so results do not depend on the world size."""
    was_training = model.training
    model.eval()
    out = []
    with unsharded(model), autocast(d):
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
                out.append({"prompt": p, "response": text, "ended": ended, "length": len(resp),
                            "prompt_ids": p_ids, "response_ids": resp})
    model.train(was_training)
    return out
