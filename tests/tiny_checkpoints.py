"""The tiny random checkpoints the PPO-side tests share: an 'SFT' policy (seed 0) and a 'reward model' (seed 1,
scalar head) on the char vocabulary, in HF format, as ppo.Config(sft=base/"sft", reward_model=base/"rm") reads them."""

import data
from model import GPT, config_for


def save_tiny_policy_and_rm(base):
    tok = data.get_tokenizer("char")
    for name, head, seed in (("sft/policy", False, 0), ("rm/reward", True, 1)):
        model = GPT(config_for("tiny", vocab_size=tok.vocab_size, tokenizer="char", scalar_head=head))
        model.init_weights(seed=seed)
        model.save_pretrained(str(base / name))
    return base
