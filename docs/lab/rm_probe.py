"""Probe reward models on fixed inputs (docs/lab.md, "Making the default run robust"): gold accuracy on 3,000
held-out comparisons drawn as the RM's own (its seed: --seed), and on held-out pairs between full-length answers
(drawn as before 2026-12-06: no off-length answer), and how often the RM prefers the empty answer, the first two
letters, or a run-on answer (the exact reversal with its last letter repeated three more times) to the exact
reversal, and a noisy answer run on the same way to the noisy answer itself. The first accuracy is also split into
pairs of answers of equal length and of different lengths.

    PYTHONPATH=. python docs/lab/rm_probe.py [--seed=S] runs/rm/final [more RM checkpoints ...]
"""
import random
import sys

import torch

import data
from evaluate import reward_scores
from model import GPT


def scores(rm, tok, prompts, responses):
    ids = [tok.encode(p) + tok.encode(r) + [tok.eos_id] for p, r in zip(prompts, responses)]
    x, mask = data.pad_right(ids, tok.pad_id)
    with torch.no_grad():
        return reward_scores(rm, x, mask)


def gold_agreement(rm, tok, pairs) -> torch.Tensor:
    """Per pair: does the RM order it as gold does."""
    a = scores(rm, tok, [p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    b = scores(rm, tok, [p["prompt"] for p in pairs], [p["rejected"] for p in pairs])
    return (a > b) == torch.tensor([p["chosen_gold"] > p["rejected_gold"] for p in pairs])


def gold_accuracy(rm, tok, pairs) -> float:
    return gold_agreement(rm, tok, pairs).float().mean().item()


def main(argv):
    seed = int(argv.pop(0).split("=")[1]) if argv and argv[0].startswith("--seed=") else 0
    paths = argv
    tok = data.get_tokenizer("char")
    # 3,000 held-out comparisons drawn as the RM's own (with off-length answers) for the RM's seed: the RM's printed
    # gold accuracy is on 500 of them, whose sampling error (+-0.02) hides differences between training recipes.
    many = [p for p in data.make_default_records("preference", "test", 3000, seed=seed)
            if p["chosen_gold"] != p["rejected_gold"]]
    data.OFF_LENGTH_FRACTION = 0.0  # the old comparisons: full-length answers only
    pairs = [p for p in data.make_default_records("preference", "test", 500, seed=0)
             if p["chosen_gold"] != p["rejected_gold"]]
    rng = random.Random(0)
    prompts = [data.task_prompt(rng) for _ in range(400)]
    # drawn once: every RM in the list is probed on the same noisy answers (drawn in the loop, the second RM's differed)
    noisy = [data.noisy_response(p, rng, 0.3) or data.gold_target(p) for p in prompts]
    for path in paths:
        rm = GPT.from_pretrained(path.rstrip("/") + "/reward").eval()
        exact = scores(rm, tok, prompts, [data.gold_target(p) for p in prompts])
        empty = scores(rm, tok, prompts, ["" for _ in prompts])
        two = scores(rm, tok, prompts, [data.gold_target(p)[:2] for p in prompts])
        # run-on answers: the exact reversal that does not stop, its last letter repeated three times more
        runon = scores(rm, tok, prompts, [data.gold_target(p) + data.gold_target(p)[-1] * 3 for p in prompts])
        # a demonstration-like answer against the same answer run on (its last letter three more times)
        plain = scores(rm, tok, prompts, noisy)
        longer = scores(rm, tok, prompts, [r + r[-1] * 3 for r in noisy])
        # Length alone can decide a pair of different lengths; a pair of equal length needs the letter-by-letter check.
        agree = gold_agreement(rm, tok, many)
        same = torch.tensor([len(p["chosen"]) == len(p["rejected"]) for p in many])
        print(f"{path}: gold accuracy on {len(many)} held-out pairs of seed {seed} {agree.float().mean():.3f} "
              f"(answers of equal length {agree[same].float().mean():.3f}, of different length "
              f"{agree[~same].float().mean():.3f}), "
              f"on {len(pairs)} full-length pairs {gold_accuracy(rm, tok, pairs):.3f}; "
              f"empty > exact {(empty > exact).float().mean():.1%}; 2 letters > exact {(two > exact).float().mean():.1%}; "
              f"run-on (+3 repeats) > exact {(runon > exact).float().mean():.1%}; "
              f"noisy answer run on > itself {(longer > plain).float().mean():.1%}")


if __name__ == "__main__":
    main(sys.argv[1:])
