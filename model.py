"""A hand-written GPT-2, shared by every stage: policy, reference, reward model and critic.

The architecture is GPT-2 exactly (Radford et al. 2019; HF `modeling_gpt2.py`):
- learned absolute position embeddings, added to token embeddings;
- pre-LayerNorm blocks: x + attn(ln_1(x)), then x + mlp(ln_2(x)), and a final ln_f;
- GELU with the tanh approximation ("gelu_new" in HF);
- biases on every Linear and LayerNorm; the output projection is tied to the token embedding.

Parameter names mirror HF `GPT2LMHeadModel` (transformer.wte, transformer.h.0.attn.c_attn, ...) so that
loading HF weights is a key-for-key copy. HF stores its Linear layers as `Conv1D` with weights of shape
(in, out); ours are `nn.Linear` (out, in), so those four weights are transposed on load and on export.

Two heads sit on the same trunk:
- `lm_head`: next-token logits (tied to wte), for the policy and the reference;
- `score`: one scalar per position (HF's GPT2ForSequenceClassification name), for the reward model and
  the value model (critic). Which head(s) to run is chosen per call, so a shared-trunk critic
  (OpenAI 2019) computes both from one pass.

Padding: prompts are left-padded for generation, so position ids must come from the attention mask
(`cumsum(mask) - 1`), never from `arange`. With learned absolute positions, getting this wrong changes
every logit of a padded row, and the first PPO ratio is no longer 1 (trlx #508).
"""

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class GPTConfig:
    block_size: int = 1024  # maximum sequence length (n_positions in HF)
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # off by default in every stage: dropout makes PPO's ratio != 1 on the first step
    layer_norm_epsilon: float = 1e-5
    scalar_head: bool = False  # add the `score` head (reward model, critic)
    tokenizer: str = "gpt2"  # which tokenizer the ids belong to (data.get_tokenizer); travels with the weights
    reward_gain: float = 1.0  # reward normalization set after RM training (reward_model.py), applied when it scores
    reward_bias: float = 0.0


# The published GPT-2 sizes, and small ones for CPU runs and tests.
GPT_SIZES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "cpu-small": dict(n_layer=4, n_head=4, n_embd=128, block_size=64),  # ~0.8M + embeddings; the default task
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, block_size=64),  # tests
}


def config_for(size: str, vocab_size: int = 50257, **overrides) -> GPTConfig:
    if size not in GPT_SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(GPT_SIZES)}")
    return GPTConfig(**{"vocab_size": vocab_size, **GPT_SIZES[size], **overrides})


# -----------------------------------------------------------------------------
# The KV cache: a plain object passed to forward, not state hidden in the modules


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated to `max_len`.

    `forward(idx, kv_cache=cache)` attends over the cached prefix plus `idx`, writes the new keys
    and values, and advances `cache.pos` by idx's length. Decoding one token then costs O(pos), not
    a full recompute, so a rollout of N tokens is linear per token instead of quadratic.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype):
        head_dim = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, nh, T, hs) at positions [pos, pos+T); return the keys and values of [0, pos+T)."""
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


# -----------------------------------------------------------------------------
# The blocks, at nanoGPT granularity


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, attn_mask, kv_cache=None, layer=0):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, nh, past+T, hs)
        dropout_p = self.dropout if self.training else 0.0
        if attn_mask is None:  # no padding and no cache: the fast fused causal kernel
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask, kv_cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), attn_mask, kv_cache, layer)
        return x + self.mlp(self.ln_2(x))


# -----------------------------------------------------------------------------
# The model


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each token counting real tokens only: left padding does not shift positions.

    (B, T) 0/1 mask -> (B, T) ids; pad slots get 0 (their outputs are never used). HF GPT-2 and
    OpenRLHF compute `cumsum(mask) - 1`; TRL's `cumsum(mask) - mask` is the same on real tokens.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def build_attn_mask(attention_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """Boolean (B, 1, q_len, k_len) mask: causal, and keys that are padding are hidden.

    attention_mask covers all keys (cached prefix plus the new q_len tokens). Every query may also
    see itself, so a pad query never has an all-masked row (that would give NaN from softmax);
    outputs at pad positions are garbage but finite, and never read.
    """
    k_len = attention_mask.size(1)
    q_pos = torch.arange(k_len - q_len, k_len, device=attention_mask.device)
    k_pos = torch.arange(k_len, device=attention_mask.device)
    causal = k_pos[None, :] <= q_pos[:, None]  # (q, k)
    is_self = k_pos[None, :] == q_pos[:, None]
    keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, k)
    return causal & (keys | is_self)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as GPT-2
        self.score = nn.Linear(config.n_embd, 1) if config.scalar_head else None
        self.gradient_checkpointing = False

    @torch.no_grad()
    def init_weights(self, seed: int | None = None, only: str = ""):
        """GPT-2's initialization, apart from __init__ so the model can be built on the meta device,
        sharded, then materialized (torchtitan's pattern).

        Linear and Embedding weights N(0, 0.02), biases 0, LayerNorm 1/0; residual projections scaled by
        1/sqrt(2 * n_layer) (GPT-2 paper, section 2.3). The scalar head is N(0, 1/sqrt(n_embd + 1)) with
        bias 0, as OpenAI's 2019 reward model (lm-human-preferences `rewards.py`). only: initialize just the
        parameters whose names start with it (from_pretrained draws a fresh `score` head this way).
        """
        gen = torch.Generator().manual_seed(seed) if seed is not None else None

        def normal_(t, std):  # draw on CPU so the result does not depend on the device
            t.copy_(torch.randn(t.shape, generator=gen) * std)

        for name, p in self.named_parameters():
            if not name.startswith(only):
                continue
            if name == "score.weight":
                normal_(p, 1 / math.sqrt(self.config.n_embd + 1))
            elif name.endswith("c_proj.weight"):
                normal_(p, 0.02 / math.sqrt(2 * self.config.n_layer))
            elif "ln_" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                normal_(p, 0.02)

    def forward(self, idx, attention_mask=None, position_ids=None, kv_cache=None, head="lm"):
        """idx (B, T) token ids -> logits (B, T, V) for head="lm", scalars (B, T) for head="score",
        (logits, scalars) for head="both".

        attention_mask (B, T) 1 for real tokens, 0 for padding; with a kv_cache it covers the cached
        prefix too, (B, cache.pos + T). Position ids default to counting real tokens (see
        `position_ids_from_mask`). Logits come back in the compute dtype; cast to float32 before any
        log-softmax (see `token_logprobs`).
        """
        B, T = idx.size()
        past = kv_cache.pos if kv_cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=idx.device)
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)[:, past:]
        assert past + T <= self.config.block_size, f"sequence of {past + T} tokens > block_size {self.config.block_size}"
        # The fused causal kernel needs no mask when nothing is padded and nothing is cached.
        attn_mask = None if (kv_cache is None and bool(attention_mask.all())) else build_attn_mask(attention_mask, T)

        x = self.transformer.wte(idx) + self.transformer.wpe(position_ids)  # (B, T, C)
        x = self.transformer.drop(x)
        for layer, block in enumerate(self.transformer.h):
            if self.gradient_checkpointing and self.training and kv_cache is None:
                x = checkpoint(block, x, attn_mask, use_reentrant=False)
            else:
                x = block(x, attn_mask, kv_cache, layer)
        x = self.transformer.ln_f(x)
        if kv_cache is not None:
            kv_cache.pos += T

        if head == "lm":
            return self.lm_head(x)
        scalars = self.score(x).squeeze(-1).clone()  # (B, T); a copy, not a view (FSDP2 warns on views)
        return scalars if head == "score" else (self.lm_head(x), scalars)

    # -------------------------------------------------------------------------
    # HF GPT-2 weights in and out

    @classmethod
    def from_pretrained(cls, name_or_dir: str, **overrides) -> "GPT":
        """Load HF GPT-2 weights: a directory with config.json and model.safetensors (ours or HF's), or
        a hub name such as "gpt2" (downloaded through huggingface_hub when online).

        Never unpickles: safetensors only (a pickled checkpoint can run code when loaded).
        overrides: GPTConfig fields to change, e.g. dropout=0.0 or scalar_head=True.
        """
        directory = _resolve_hf_dir(name_or_dir)
        with open(os.path.join(directory, "config.json")) as f:
            hf = json.load(f)
        config = GPTConfig(
            block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
            n_head=hf["n_head"], n_embd=hf["n_embd"], layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            dropout=0.0, scalar_head=hf.get("rlhf_scalar_head", False), tokenizer=hf.get("rlhf_tokenizer", "gpt2"),
            reward_gain=hf.get("rlhf_reward_gain", 1.0), reward_bias=hf.get("rlhf_reward_bias", 0.0),
        )
        for key, value in overrides.items():
            setattr(config, key, value)
        model = cls(config)
        from safetensors.torch import load_file
        state = load_file(os.path.join(directory, "model.safetensors"))
        model.load_hf_state_dict(state, source=directory)
        return model

    def load_hf_state_dict(self, hf_state: dict, source: str = "state dict"):
        """Copy an HF-named state dict into this model, key for key (Conv1D weights transposed).

        Missing or mis-shaped keys raise one error that lists them all, naming the source, instead of a
        stack trace from deep inside load_state_dict. A missing `score` head is left as initialized
        (a reward model starts from an SFT checkpoint that has none).
        """
        ours = self.state_dict()
        loaded, problems = {}, []
        for key, value in hf_state.items():
            key = key if key.startswith(("transformer.", "lm_head.", "score.")) else "transformer." + key
            if key.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # causal-mask buffers in old HF checkpoints, not parameters
            if key not in ours:
                problems.append(f"unexpected key {key} {tuple(value.shape)}")
                continue
            if _is_conv1d(key):
                value = value.t()
            if value.shape != ours[key].shape:
                problems.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(ours[key].shape)}")
                continue
            loaded[key] = value
        loaded.setdefault("lm_head.weight", loaded.get("transformer.wte.weight"))  # tied
        missing = [k for k in ours if k not in loaded and not k.startswith("score.")]
        problems += [f"missing key {k} {tuple(ours[k].shape)}" for k in missing]
        if problems:
            raise ValueError(f"{source} does not fit this model ({self.config}):\n  " + "\n  ".join(problems))
        if self.score is not None and "score.weight" not in loaded:  # a fresh head, as init_weights draws it
            self.init_weights(only="score.")
        if self.score is not None and "score.weight" in loaded and "score.bias" not in loaded:
            loaded["score.bias"] = torch.zeros(1)  # HF's GPT2ForSequenceClassification head has no bias
        self.load_state_dict({k: v for k, v in loaded.items() if v is not None}, strict=False)

    def save_pretrained(self, directory: str):
        """Write config.json + model.safetensors in HF GPT-2 format (loads in GPT2LMHeadModel)."""
        save_hf(directory, self.config, self.state_dict())


def to_hf_state_dict(state: dict) -> dict:
    """Our state dict -> HF GPT-2 names and layouts, float32 on CPU (lm_head omitted: tied to wte)."""
    out = {}
    for key, value in state.items():
        if key == "lm_head.weight":
            continue
        value = value.detach().to("cpu", torch.float32)
        out[key] = (value.t() if _is_conv1d(key) else value).contiguous()
    return out


def save_hf(directory: str, config: GPTConfig, state: dict):
    """Write `state` (our names; e.g. consolidated from an FSDP-sharded model) in HF GPT-2 format."""
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    save_file(to_hf_state_dict(state), os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config(config), f, indent=2)


def hf_config(config: GPTConfig) -> dict:
    """The HF GPT2Config fields for our config (GELU tanh = "gelu_new")."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
        "vocab_size": config.vocab_size, "n_positions": config.block_size, "n_ctx": config.block_size,
        "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None,
        "layer_norm_epsilon": config.layer_norm_epsilon, "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout, "attn_pdrop": config.dropout, "initializer_range": 0.02,
        "bos_token_id": config.vocab_size - 1, "eos_token_id": config.vocab_size - 1,
        "tie_word_embeddings": True,
        # Ours (HF ignores unknown keys): the scalar head, the tokenizer, the reward normalization.
        "rlhf_scalar_head": config.scalar_head, "rlhf_tokenizer": config.tokenizer,
        "rlhf_reward_gain": config.reward_gain, "rlhf_reward_bias": config.reward_bias,
    }


def _is_conv1d(key: str) -> bool:
    return key.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"))


def _resolve_hf_dir(name_or_dir: str) -> str:
    if os.path.isdir(name_or_dir):
        return name_or_dir
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(name_or_dir, allow_patterns=["config.json", "model.safetensors"])
    except Exception as e:
        raise FileNotFoundError(
            f"could not load {name_or_dir!r}: it is not a local directory, and the hub download failed "
            f"({type(e).__name__}). Offline? Point at a local HF GPT-2 directory holding config.json and model.safetensors."
        ) from e


# -----------------------------------------------------------------------------
# Log-probs and generation


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(token) under softmax(logits / T), in float32: (B, T, V), (B, T) -> (B, T).

    Float32 on purpose: under bf16 autocast the log-softmax of bf16 logits differs from the
    sampling-time value by ~1e-2, and PPO's first ratio is no longer 1 (minimind PRs #813/#814).
    Dividing by the sampling temperature makes these the log-probs of the distribution that was
    actually sampled (OpenAI 2019 `policy.py` L121; TRL, N+, OpenRLHF and verl do the same).
    """
    logits = logits.float() / temperature
    return torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sample_inverse_cdf(probs: torch.Tensor, generator=None) -> torch.Tensor:
    """One token per row of probs (B, V): the first index whose cumulative probability reaches a uniform
    draw. Same distribution as torch.multinomial(probs, 1), but one random number per row instead of one
    per vocabulary entry: 30x faster per step on CPU at V = 50257 (BENCHMARKS.md). The float32 cumsum
    can end a hair below 1; the clamp gives a draw above it to the last token (a ~1e-7 bias)."""
    u = torch.rand(probs.size(0), 1, generator=generator, device=probs.device, dtype=probs.dtype)
    return torch.searchsorted(probs.cumsum(-1), u).clamp(max=probs.size(-1) - 1).squeeze(-1)


@torch.no_grad()
def generate(model, prompt_ids, prompt_mask, max_new_tokens, temperature=1.0, eos_id=None,
             stop_id=None, pad_id=0, generator=None, use_cache=True):
    """Sample continuations of left-padded prompts, with a KV cache.

    prompt_ids, prompt_mask: (B, P), left-padded. temperature 0 means greedy. Each row stops at its
    first `eos_id` (or `stop_id`) token, which is kept; the slots after it are `pad_id`. Sampling
    uses `generator` (a seeded torch.Generator), so the same seed gives the same samples.

    Returns (sequences (B, P + N), logprobs (B, N)): the log-probs of the sampled tokens under
    softmax(logits / T) in float32 (0 after the stop), which PPO may use as its old log-probs, and N <=
    max_new_tokens (generation ends early once every row has stopped).
    use_cache=False recomputes the whole prefix each step: quadratic; kept for tests and benchmarks.
    """
    B, P = prompt_ids.shape
    device = prompt_ids.device
    param = next(model.parameters())
    cache = KVCache(model.config, B, P + max_new_tokens, device, param.dtype if param.is_floating_point() else torch.float32) if use_cache else None
    seq, mask = prompt_ids, prompt_mask.long()
    done = torch.zeros(B, dtype=torch.bool, device=device)
    new_tokens, new_logprobs = [], []
    step_input = seq
    for _ in range(max_new_tokens):
        if use_cache:
            logits = model(step_input, attention_mask=mask, kv_cache=cache)[:, -1, :]
        else:
            logits = model(seq, attention_mask=mask)[:, -1, :]
        logits = logits.float()
        if temperature == 0:
            token = logits.argmax(-1)
            logprob = torch.zeros(B, device=device)
        else:
            token = sample_inverse_cdf(F.softmax(logits / temperature, dim=-1), generator)
            logprob = token_logprobs(logits[:, None, :], token[:, None], temperature)[:, 0]
        token = torch.where(done, torch.full_like(token, pad_id), token)
        new_tokens.append(token)
        new_logprobs.append(torch.where(done, torch.zeros_like(logprob), logprob))
        for stop in (eos_id, stop_id):
            if stop is not None:
                done = done | (token == stop)
        seq = torch.cat([seq, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=device)], dim=1)
        step_input = token[:, None]
        if bool(done.all()):
            break
    return seq, torch.stack(new_logprobs, dim=1)
