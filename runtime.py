"""The plumbing every stage shares, as plain functions: config from the command line, distributed
setup and FSDP2, precision, optimizer and schedule, checkpoints, metrics.

Nothing here knows about SFT, reward models or PPO; each stage script reads top to bottom and calls
these. The same script runs as `python sft.py` (one process, CPU or one GPU) and as
`torchrun --nproc_per_node=8 sft.py` (NCCL on GPUs, gloo on CPU).

Precision story (one for the whole project; `precision()` decides, tests/test_scale.py checks it on CPU):
- `--bf16=false`, or any CPU run: everything is float32, no autocast. This is the parity run on a GPU.
- `--bf16=true` (the default) on CUDA:
  - trainable models (policy, critic, SFT/RM/DPO models) keep float32 master weights, float32 gradients and
    float32 AdamW state. Under FSDP2 (torchrun, 2+ processes) the compute copy is bf16 through
    `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)` (torchtitan's choice): FSDP2 casts each
    block's weights to bf16 at the all-gather (half the traffic of float32), forward and backward run in
    bf16, and gradients are reduce-scattered in float32 into the float32 shards. No autocast there.
    With one process there is no FSDP2 wrap to carry a policy, so forward passes run under bf16 autocast over
    the float32 weights instead (autocast keeps norms and softmax in float32; numerically close, not equal).
  - frozen models (reference, reward model, evaluation) store bf16 weights: they need no master copy.
  - the rollout gathers the policy once (`unsharded`): in bf16 under the FSDP2 policy, float32 on one GPU.
- Always float32, whatever the flag: logits are cast to float32 before every log-softmax, and log-prob
  differences, ratios, KL, rewards, advantages and value targets are float32 (see model.token_logprobs for why).
"""

import ast
import contextlib
import dataclasses
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
import typing
from dataclasses import dataclass

import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# Config: one dataclass per script, a docstring under each field, overridable from the command line


def field_docs(cls) -> dict:
    """The docstring written under each dataclass field (cleanrl's style), read from the source."""
    docs, tree = {}, ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _convert(value: str, annotation, name: str):
    """Command-line text -> the field's type (int, float, bool, str, or Optional of those)."""
    if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value.lower() in ("none", "null"):
            return None
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if annotation is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise SystemExit(f"--{name}: expected true/false, got {value!r}")
    try:
        return annotation(value)
    except ValueError:
        raise SystemExit(f"--{name}: expected {annotation.__name__}, got {value!r}")


def parse_config(cls, argv=None, profiles: dict | None = None, **presets):
    """Build `cls` from defaults, then a profile, then `presets` (dict of field values), then `--config=file.json`,
    then `--key=value` / `--key value` / `--flag` arguments, in that order. `--help` lists the fields.

    profiles: {"real": {field: value}} for a cls with a `profile` field. The dataclass defaults are the "toy"
    profile, tuned for the built-in task; "auto" picks "real" when --dataset is not "default", and the choice
    is printed, so toy values are never applied silently to real data.

    Explicit flags always win. Unknown keys are an error that names them: a typo in `--kl_coef` must
    not silently train with the default.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    if "-h" in argv or "--help" in argv:
        docs = field_docs(cls)
        print(f"usage: {os.path.basename(sys.argv[0])} [--config=file.json] [--key=value ...]\n")
        for name, f in fields.items():
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            print(f"  --{name}={default!r}\n      {docs.get(name, '')}")
        raise SystemExit(0)
    values, cli = dict(presets), {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise SystemExit(f"unexpected argument {arg!r}: use --key=value")
        key, eq, val = arg[2:].partition("=")
        if not eq:  # `--key value`, or a bare boolean flag
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                val, i = argv[i + 1], i + 1
            elif key in fields and hints[key] is bool:
                val = "true"
            else:
                raise SystemExit(f"--{key} needs a value")
        if key == "config":
            with open(val) as f:
                values.update(json.load(f))
        elif key not in fields:
            raise SystemExit(f"unknown option --{key}; see --help for the {len(fields)} options")
        else:
            cli[key] = _convert(val, hints[key], key)
        i += 1
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise SystemExit(f"unknown config keys {unknown}; see --help")
    values.update(cli)
    if profiles is not None:
        values = {**resolve_profile(cls, values, profiles), **values}
    return cls(**values)


def apply_preset(argv: list[str], presets: dict) -> dict:
    """--preset=NAME: the field values presets[NAME] sets, plus preset=NAME, for parse_config's presets;
    explicit flags still win (parse_config order). {} without --preset."""
    name = next((a.split("=", 1)[1] for a in argv if a.startswith("--preset=")), "")
    if name and name not in presets:
        raise SystemExit(f"unknown preset {name!r}; choose from {sorted(presets)}")
    return dict(presets.get(name, {}), preset=name) if name else {}


def resolve_profile(cls, values: dict, profiles: dict) -> dict:
    """The values of the profile in force (see parse_config); sets values["profile"] to its name."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    name = values.get("profile", defaults["profile"])
    if name == "auto":
        name = "toy" if values.get("dataset", defaults["dataset"]) == "default" else "real"
    if name != "toy" and name not in profiles:
        raise SystemExit(f"--profile={name!r}: choose auto, toy or {', '.join(profiles)}")
    chosen = {k: v for k, v in profiles.get(name, {}).items() if k not in values}
    values["profile"] = name
    if os.environ.get("RANK", "0") == "0":
        shown = ", ".join(f"{k}={v}" for k, v in chosen.items()) or "none left to set"
        stage = os.path.basename(sys.argv[0]).removesuffix(".py") if cls.__module__ == "__main__" else cls.__module__
        print(f"{stage}: profile {name!r} in force" + (f" ({shown}; explicit flags win)" if name != "toy" else
              " (defaults tuned for the built-in task; --profile=real for real text)"))
    return chosen


# -----------------------------------------------------------------------------
# Distributed: optional, ~30 lines


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> Dist:
    """Under torchrun (WORLD_SIZE set): join the process group (NCCL on CUDA, gloo on CPU).
    Otherwise one process. device: "auto" (CUDA if present), "cpu" or "cuda"."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return Dist(rank, local_rank, world_size, dev)


def run_main(main):
    """Run a stage's main() as a script. Under torchrun with gloo on torch 2.13 a rank sometimes aborts after all
    its work is done and its process group destroyed ("terminate called without an active exception", from a
    C++ destructor at interpreter exit, no Python frame), and torchrun reports the whole run as failed: 2 of 4
    fresh-clone CI runs hit it once, in a test helper and in `torchrun dpo.py`. So a distributed rank closes its
    loggers and leaves with os._exit, which skips those destructors; its checkpoints and metrics.jsonl are
    already written and closed. SystemExit (a flag error, a preemption) keeps its code. One process exits as usual."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return main()
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) or e.code is None else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    for close in _TRACKER_CLOSERS:  # what atexit would have done: wandb's run.finish, TensorBoard's close
        close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def shutdown_distributed():
    """Leave the process group together: a rank that tears gloo down while another is still sending (rank 0
    writing a checkpoint or a result) can abort with "terminate called without an active exception"."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@dataclass(frozen=True)
class Precision:
    """What one model runs in (see the module docstring). weights: the dtype its parameters are stored in;
    fsdp_param_dtype / fsdp_reduce_dtype: the FSDP2 MixedPrecisionPolicy (None: no policy, compute in the
    weights' dtype); autocast: whether forward passes run under bf16 autocast."""
    weights: torch.dtype
    fsdp_param_dtype: torch.dtype | None
    fsdp_reduce_dtype: torch.dtype | None
    autocast: bool


def cpu_bf16() -> bool:
    """RLHF_CPU_BF16=1: --bf16 applies on a CPU too, as on CUDA (autocast for the trainable models, bf16 weights for
    the frozen ones). Opt-in, because --bf16 defaults to true and float32 stays the CPU reference; a CPU without
    native bf16 (no avx512_bf16/amx_bf16 flag in /proc/cpuinfo) runs it emulated, slower: said once on stderr.
    docs/real-model.md has the measurements."""
    if os.environ.get("RLHF_CPU_BF16", "0") != "1":
        return False
    global _CPU_BF16_SAID
    if not _CPU_BF16_SAID:
        flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
        if "avx512_bf16" not in flags and "amx_bf16" not in flags:
            print("RLHF_CPU_BF16=1: this CPU has no native bf16 (avx512_bf16/amx_bf16); bf16 runs emulated and is "
                  "usually slower than float32 here", file=sys.stderr)
        _CPU_BF16_SAID = True
    return True


_CPU_BF16_SAID = False


def precision(device_type: str, distributed: bool, bf16: bool, trainable: bool) -> Precision:
    """The dtype decisions for one model, as a pure function (callable on CPU with device_type="cuda").
    On CPU, --bf16 counts only with RLHF_CPU_BF16=1 (`cpu_bf16`)."""
    if not bf16 or not (device_type == "cuda" or (device_type == "cpu" and cpu_bf16())):
        return Precision(torch.float32, None, None, False)
    if not trainable:  # frozen: bf16 weights, compute in bf16 without autocast
        return Precision(torch.bfloat16, None, None, False)
    if distributed:  # FSDP2 casts the gathered weights; gradients reduce in float32 into float32 shards
        return Precision(torch.float32, torch.bfloat16, torch.float32, False)
    return Precision(torch.float32, None, None, True)  # one process: no FSDP2 wrap, autocast over fp32 weights


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def shard_model(model, d: Dist, bf16: bool = True):
    """FSDP2: fully_shard each transformer block, then the root (torchtitan's pattern). A no-op for one process
    and for a model already sharded (load_model(shard=True) shards while loading).

    Trainable models on CUDA with bf16 get MixedPrecisionPolicy(bf16 params, fp32 reduce); frozen ones hold
    bf16 weights already (see `precision`)."""
    if not d.distributed or is_sharded(model):
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    trainable = any(p.requires_grad for p in model.parameters())
    prec = precision(d.device.type, d.distributed, bf16, trainable)
    kwargs = {}
    if prec.fsdp_param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=prec.fsdp_param_dtype, reduce_dtype=prec.fsdp_reduce_dtype)
    mesh = init_device_mesh(d.device.type, (d.world_size,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    return model


@contextlib.contextmanager
def unsharded(model):
    """Gather an FSDP2 model's weights once for a whole rollout, instead of an all-gather per layer
    per generated token; reshard on exit. A no-op for an unsharded model."""
    from torch.distributed.fsdp import FSDPModule
    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in fsdp_modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield model
    finally:
        for m in fsdp_modules:
            m.set_reshard_after_forward(True, recurse=False)
            m.reshard()


def autocast(d: Dist, enabled: bool = True):
    """bf16 autocast on one CUDA process only (`precision`): under FSDP2 the MixedPrecisionPolicy gives the
    trainable models bf16 compute and frozen models hold bf16 weights, so autocast would only re-cast. Nothing
    on CPU unless RLHF_CPU_BF16=1 (`cpu_bf16`; tests patch a CPU bf16 autocast in where they need one)."""
    if precision(d.device.type, d.distributed, enabled, trainable=True).autocast:
        return torch.autocast(d.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def all_reduce_mean(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.distributed:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= d.world_size
    return x


def all_reduce_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.distributed:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def seed_all(seed: int):
    import random
    import numpy as np
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -----------------------------------------------------------------------------
# Models in and out of stages: every stage reads HF-format directories, by path


def model_dir(path: str, name: str) -> str:
    """`path` itself if it holds config.json, else path/name (so --sft=runs/sft/final finds
    runs/sft/final/policy), else `path` unchanged (a hub name such as "gpt2")."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    if os.path.exists(os.path.join(path, name, "config.json")):
        return os.path.join(path, name)
    if os.path.isdir(path):
        raise SystemExit(f"{path} holds no model: expected {path}/config.json or {path}/{name}/config.json")
    return path


def load_model(path: str, name: str, d: Dist, trainable: bool, bf16: bool = True, shard: bool = False, **overrides):
    """Load a GPT from a checkpoint directory or hub name onto d.device. Frozen models get requires_grad=False,
    eval mode, and the weight dtype `precision` gives them (bf16 on CUDA with --bf16, float32 otherwise).

    shard=True under torchrun: build on the meta device, fully_shard (`shard_model`), then read into each rank
    only its own shard of every tensor from the safetensors files (model.load_hf_sharded; torchtitan's
    pattern), so no rank ever holds the whole model. Without torchrun, shard=True is a plain load.

    A directory saved by a stage (final/, a ckpt_*) is checked against its manifest.json first (sizes and sha256,
    `model_problem`); a damaged file is an error that names it, never a traceback from inside safetensors.

    LoRA (overrides lora_rank=...): fresh adapters on the loaded base; trainable then means the adapters and a score
    head only (model.train_lora_only), set before sharding so FSDP2 sees the final requires_grad."""
    from safetensors import SafetensorError
    directory = model_dir(path, name)
    problem = model_problem(directory) if os.path.isdir(directory) else None
    if problem:
        raise SystemExit(f"{directory} is damaged: {problem}")
    prec = precision(d.device.type, d.distributed, bf16, trainable)
    try:
        model = _load(directory, d, prec, trainable, bf16, shard, overrides)
    except SafetensorError as e:  # a damaged file in a directory without manifest.json (one not written by us)
        raise SystemExit(f"{directory}: a safetensors file there cannot be read ({e}): damaged or incomplete") from None
    if not trainable:
        model.requires_grad_(False).eval()
    return model


def _load(directory: str, d: Dist, prec: Precision, trainable: bool, bf16: bool, shard: bool, overrides: dict):
    from model import GPT, load_hf_config, train_lora_only
    if shard and d.distributed:
        config, directory = load_hf_config(directory, **overrides)
        with torch.device("meta"):
            model = GPT(config).to(prec.weights)
        if not trainable:
            model.requires_grad_(False)
        elif config.lora_rank:
            train_lora_only(model, also=("score.",))
        shard_model(model, d, bf16)
        model.to_empty(device=d.device)
        model.load_hf_sharded(directory)
    else:
        model = GPT.from_pretrained(directory, **overrides).to(d.device, prec.weights)
        if trainable and model.config.lora_rank:
            train_lora_only(model, also=("score.",))
    return model


# -----------------------------------------------------------------------------
# Data plumbing: the held-out split, the batch arithmetic, and one batch of an epoch


def split_batch(batch_size: int, micro_batch_size: int, n_items: int, max_steps: int, d: Dist):
    """The batch arithmetic: the global batch is fixed, whatever the number of processes. Returns (examples per
    process per step, examples per forward pass, steps per epoch over n_items, optimizer steps: max_steps, or one
    epoch when 0). The process's examples are accumulated over per_rank / micro forward passes."""
    per_rank = batch_size // d.world_size
    micro = min(micro_batch_size, per_rank)
    if per_rank * d.world_size != batch_size or per_rank % micro:
        raise SystemExit(f"batch_size {batch_size} must be world_size {d.world_size} x accumulation steps x "
                         f"micro_batch_size {micro}")
    steps_per_epoch = n_items // batch_size
    return per_rank, micro, steps_per_epoch, max_steps or steps_per_epoch


def batch_at(items: list, batch_size: int, seed: int, epoch: int, index: int, rank: int = 0,
             world_size: int = 1) -> list:
    """Batch `index` of epoch `epoch` on this rank: exactly `list(data.batches(items, batch_size, seed, epoch, rank,
    world_size))[index]` (tests/test_runtime.py checks it), without building the epoch's other batches. The
    order is the permutation seeded by seed + epoch, as data.batches draws it; each global batch of
    batch_size * world_size is cut into contiguous per-rank slices; an incomplete last batch does not exist."""
    if batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad batching: batch_size={batch_size} rank={rank} world_size={world_size}")
    global_size = batch_size * world_size
    if not 0 <= index < len(items) // global_size:
        raise IndexError(f"batch {index} of an epoch of {len(items) // global_size} batches of {global_size}")
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed + epoch))
    start = index * global_size + rank * batch_size
    return [items[i] for i in order[start:start + batch_size].tolist()]


# -----------------------------------------------------------------------------
# Optimizer and schedule


def check_context(model, prompt_tokens: int, response_tokens: int, where: str, flags: str):
    """Refuse, before any work, limits the model's context cannot hold (they used to fail as an assertion in
    the middle of the first forward pass)."""
    context = model.config.block_size
    if prompt_tokens + response_tokens > context:
        raise SystemExit(f"{where}: {flags} = {prompt_tokens} + {response_tokens} tokens do not fit the model's "
                         f"context of {context} tokens; lower them, or use a model with a longer context")


def make_adamw(model, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.95), eps: float = 1e-8):
    """AdamW with weight decay on 2-D weights only (matrices and embeddings), not on biases or
    LayerNorm gains (nanoGPT's `configure_optimizers`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return adamw(groups, lr=lr, betas=betas, eps=eps)


def adamw(groups, **kwargs) -> torch.optim.AdamW:
    """torch.optim.AdamW, fused where torch has a fused kernel for the parameters' device (CPU, CUDA, ...:
    torch.utils._foreach_utils._get_fused_kernels_supported_devices). torch's default is the per-tensor loop on
    CPU and foreach on CUDA; fused is one kernel over all tensors (HF Trainer's default `adamw_torch_fused`).
    The update is the same AdamW up to float rounding (tests/test_perf_paths.py: 1e-6 over 5 steps in fp32).
    Falls back to torch's default for a device without the kernel or non-float parameters."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = bool(params) and all(p.is_floating_point() and p.device.type in _get_fused_kernels_supported_devices()
                                 for p in params)
    return torch.optim.AdamW(groups, fused=fused or None, **kwargs)


def lr_at(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0, schedule: str = "cosine") -> float:
    """Linear warmup to base_lr, then "cosine", "linear" or "constant" decay to 0."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        coeff = 1.0 - progress
    else:
        raise ValueError(f"unknown lr schedule {schedule!r}: cosine, linear or constant")
    return base_lr * coeff


def set_lr(optimizer, lr: float):
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_grad_norm(model, max_norm: float) -> torch.Tensor:
    """Global gradient norm (over all shards under FSDP2: DTensor grads reduce correctly), clipped."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def step_if_finite(optimizer, loss: torch.Tensor, grad_norm: torch.Tensor, d: Dist) -> bool:
    """optimizer.step() unless the loss or the global gradient norm is inf/NaN on any rank; the gradients are
    dropped either way. Returns whether it stepped. One NaN that reaches AdamW poisons the weights and both
    moments for good, while skipping one batch costs little (Megatron-LM and fairseq skip such steps too).
    Every rank takes the same decision, so sharded ranks never diverge."""
    bad = (~torch.isfinite(loss.detach().float())).any() | (~torch.isfinite(grad_norm.detach().float())).any()
    finite = all_reduce_sum(bad.float(), d).item() == 0
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return finite


def guarded_step(model, optimizer, loss: torch.Tensor, grad_clip: float, skipped: int, streak: int, step: int,
                 d: Dist) -> tuple[torch.Tensor, int, int]:
    """Clip the gradients, step_if_finite, and keep the books: returns (the gradient norm before clipping, steps
    skipped in the run, skipped in a row), and says on the console when step `step` was skipped.
    check_nonfinite_streak then stops a run whose streak is too long."""
    grad_norm = clip_grad_norm(model, grad_clip)
    if step_if_finite(optimizer, loss, grad_norm, d):
        return grad_norm, skipped, 0
    if d.is_main:
        from tqdm import tqdm
        tqdm.write(f"step {step}: non-finite loss or gradient norm; update skipped ({streak + 1} in a row)")
    return grad_norm, skipped + 1, streak + 1


def check_nonfinite_streak(streak: int, max_streak: int, step: int, run_dir: str):
    """Stop the run, naming the checkpoint to go back to, after max_streak skipped steps in a row (0 = never)."""
    if max_streak > 0 and streak >= max_streak:
        raise SystemExit(f"stopping at step {step}: the loss or the gradients were non-finite for {streak} "
                         f"consecutive steps, each skipped. The last good checkpoint is "
                         f"{latest_checkpoint(run_dir) or '(none yet)'}: lower --lr or check the data, then --resume")


# Peak dense bf16 tensor FLOP/s per device; unknown devices give no MFU rather than a wrong one.
PEAK_BF16_FLOPS = {"H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H200": 989e12,
                   "A100": 312e12, "L4": 121e12, "A10G": 125e12}


def peak_flops(d: Dist) -> float | None:
    if d.device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(d.device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


def flops_per_token(n_params: int, n_layer: int, n_head: int, head_dim: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N + 12 * L * H * Q * T (PaLM appendix B; nanoGPT `estimate_mfu`)."""
    return 6 * n_params + 12 * n_layer * n_head * head_dim * seq_len


def speed_metrics(tokens_seen: int, seconds: float, model, seq_len: int, d: Dist, flops_factor: float = 1.0) -> dict:
    """tokens_per_s over all processes and, on a GPU of known peak, the MFU: flops_factor x flops_per_token x
    tokens/s / (peak x processes). flops_factor counts passes beyond one forward + backward (DPO's reference)."""
    tok_s = tokens_seen * d.world_size / seconds
    row, peak = {"tokens_per_s": tok_s}, peak_flops(d)
    if peak:
        c, n_params = model.config, sum(p.numel() for p in model.parameters())
        fpt = flops_per_token(n_params, c.n_layer, c.n_head, c.n_embd // c.n_head, seq_len)
        row["mfu"] = flops_factor * fpt * tok_s / (peak * d.world_size)
    return row


# -----------------------------------------------------------------------------
# Checkpoints: consolidated, atomic, exact to resume
#
# run_dir/
#   ckpt_000200/            one directory per save, written as ckpt_000200.tmp then renamed
#     <name>/config.json, <name>/model.safetensors   each model in HF GPT-2 format (any world size loads it)
#     train_state.pt        optimizer states, step, stage state: tensors and plain types (weights_only loads it)
#     run_config.json       the stage's config
#   latest                  the name of the newest complete checkpoint (replaced atomically)
#   final/                  the last checkpoint's models and run_config.json, hard links to its files, published
#                           by the save of the last step (final.tmp, then renamed): what the next stage reads
#   metrics.jsonl


def full_state_dict(model) -> dict:
    """The whole model's weights on CPU on every rank (all-gathered under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model, state: dict):
    """Load whole (unsharded) weights into a model, sharded or not. Every key must be there with its shape:
    set_model_state_dict(strict=False) alone would silently keep layers the checkpoint lacks and drop those
    the model lacks (a resume under another --model_size or --init_from)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}  # a DTensor's shape is the global one
    theirs = {k: tuple(v.shape) for k, v in state.items()}
    problems = ([f"missing key {k} {s}" for k, s in ours.items() if k not in theirs]
                + [f"unexpected key {k} {s}" for k, s in theirs.items() if k not in ours]
                + [f"{k}: checkpoint {theirs[k]} vs model {s}" for k, s in ours.items() if k in theirs and theirs[k] != s])
    if problems:
        raise ValueError("checkpoint does not fit this model:\n  " + "\n  ".join(problems))
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def full_optimizer_state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model, optimizer, state: dict):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


def check_writable(run_dir: str):
    """Fail before training, naming the path, if the run directory cannot be written."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, f".write_test.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"run directory {run_dir} is not writable: {e}")


def _write_text_atomic(path: str, text: str):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: str, step: int, models: dict, optimizers: dict, state: dict, config, d: Dist,
                    keep: int = 2, final: bool = False) -> str | None:
    """Save models (name -> model), optimizers (name -> (model, optimizer)) and `state` (plain values
    and tensors) as run_dir/ckpt_{step}/, atomically, with manifest.json (size and sha256 of every file) written
    last before the rename; with final=True (the last step) also publish its models as run_dir/final/, atomically
    too. Keeps the newest `keep` checkpoints (0: all; `--keep_last`), deleting older ones only once the new one
    checks out against its manifest. Collective under FSDP (all ranks call it); only rank 0 writes.
    Returns the checkpoint path (on rank 0)."""
    from model import save_hf
    weights = {name: full_state_dict(m) for name, m in models.items()}
    optim_states = {name: full_optimizer_state(m, opt) for name, (m, opt) in optimizers.items()}
    path = None
    if d.is_main:
        name = f"ckpt_{step:06d}"
        path, tmp = os.path.join(run_dir, name), os.path.join(run_dir, name + ".tmp")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            for model_name, model in models.items():
                save_hf(os.path.join(tmp, model_name), model.config, weights[model_name])
            with open(os.path.join(tmp, "train_state.pt"), "wb") as f:  # a Python file: a full disk is an OSError
                torch.save({"step": step, "optimizers": optim_states, "state": state}, f)
            with open(os.path.join(tmp, "run_config.json"), "w") as f:
                json.dump(dataclasses.asdict(config), f, indent=2)
            write_manifest(tmp)
            _fsync_dir(tmp)
            shutil.rmtree(path, ignore_errors=True)  # a stale one from a run that was resumed earlier
            os.replace(tmp, path)
            _write_text_atomic(os.path.join(run_dir, "latest"), name)
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError over the OSError
            free = shutil.disk_usage(run_dir).free / 2 ** 30
            shutil.rmtree(tmp, ignore_errors=True)
            cause = e.__context__ if isinstance(e, RuntimeError) and isinstance(e.__context__, OSError) else e
            raise SystemExit(f"could not write checkpoint {path}: {cause} ({free:.2f} GiB free there); the previous "
                             f"checkpoint is intact, and --resume continues from it once the cause is fixed")
        if keep > 0 and checkpoint_problem(path, checksums=False) is None:  # never trade an old one for a bad one
            for stale in checkpoint_names(run_dir)[:-keep]:
                shutil.rmtree(os.path.join(run_dir, stale), ignore_errors=True)
        if final:
            _publish(run_dir, path)
    if d.distributed:
        dist.barrier()
    return path


def checkpoint_names(run_dir: str) -> list[str]:
    """The complete checkpoints' directory names, oldest first (not ckpt_*.tmp, not ckpt_*.damaged*)."""
    names = [n for n in os.listdir(run_dir) if re.fullmatch(r"ckpt_\d{6,}", n)] if os.path.isdir(run_dir) else []
    return sorted(names, key=_ckpt_step)


def _ckpt_step(name: str) -> int:
    return int(name.removeprefix("ckpt_"))


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(directory: str):
    """directory/manifest.json: {"files": {relative path: {"size", "sha256"}}} of every file under it."""
    files = {}
    for root, _, names in os.walk(directory):
        for n in sorted(names):
            full = os.path.join(root, n)
            files[os.path.relpath(full, directory)] = {"size": os.path.getsize(full), "sha256": sha256_file(full)}
    with open(os.path.join(directory, "manifest.json"), "w") as f:
        json.dump({"files": files}, f, indent=1)


def manifest_files(directory: str) -> dict | None:
    """manifest.json's {relative path: {"size", "sha256"}}; None if the directory has none."""
    manifest = os.path.join(directory, "manifest.json")
    if not os.path.exists(manifest):
        return None
    with open(manifest) as f:
        return json.load(f)["files"]


def checkpoint_problem(directory: str, prefix: str = "", checksums: bool = True) -> str | None:
    """What is wrong with a checkpoint (or final/) directory by its manifest.json, as "file: reason", or None if
    every listed file under `prefix` has its size (and, with checksums, its sha256). A directory without
    manifest.json (written before manifests existed, or not by us) is not checked: None."""
    manifest = os.path.join(directory, "manifest.json")
    try:
        files = manifest_files(directory)
    except (OSError, ValueError, KeyError) as e:
        return f"{manifest}: unreadable ({e})"
    for rel, want in sorted((files or {}).items()):
        if not rel.startswith(prefix):
            continue
        path = os.path.join(directory, rel)
        if not os.path.isfile(path):
            return f"{path}: missing"
        size = os.path.getsize(path)
        if size != want["size"]:
            return f"{path}: {size} bytes, manifest.json says {want['size']} (truncated or overwritten)"
        if checksums and sha256_file(path) != want["sha256"]:
            return f"{path}: sha256 differs from manifest.json (the file changed after it was saved)"
    return None


def model_problem(directory: str) -> str | None:
    """checkpoint_problem for one model directory of a checkpoint or final/ (DIR/policy: DIR's manifest, the
    files under policy/); None for a directory that no manifest covers (a hub download, a user's own)."""
    parent, name = os.path.split(os.path.normpath(directory))
    return checkpoint_problem(parent, prefix=name + os.sep)


def set_aside(path: str) -> str:
    """Rename a damaged checkpoint to ckpt_N.damaged (.damaged1, ...): out of the resume path, kept to inspect."""
    for i in range(1000):
        aside = f"{path}.damaged{i or ''}"
        if not os.path.exists(aside):
            os.replace(path, aside)
            return aside
    raise SystemExit(f"{path} is damaged and {path}.damaged* are all taken: remove some")


def resume_checkpoint(run_dir: str, d: Dist, stage: str, names=()) -> str | None:
    """The checkpoint to resume from: the one `latest` names, else the newest older one, that checks out against
    its manifest (sizes and sha256 of the one chosen: reading it back costs about as much as loading it). A damaged
    one is named with its file and reason and set aside (`set_aside`), and `latest` is pointed at the one chosen.
    None: no `latest`, or no intact checkpoint (a warning; the run starts fresh). Rank 0 decides, then tells all.
    names: the stage's model directories; a checkpoint whose manifest lists none under one of them is another
    stage's, not a damaged one: it is returned as it is, for the load to name what it lacks."""
    chosen, pointer = None, os.path.join(run_dir, "latest")
    if d.is_main and os.path.exists(pointer):
        with open(pointer) as f:
            named = f.read().strip()
        for name in reversed([n for n in checkpoint_names(run_dir) if _ckpt_step(n) <= _ckpt_step(named)]):
            path = os.path.join(run_dir, name)
            problem = checkpoint_problem(path)
            if problem is None or _of_another_stage(path, names):
                chosen = path
                break
            print(f"{stage}: warning: checkpoint {path} is damaged: {problem}; set aside as {set_aside(path)} "
                  f"(not deleted)", flush=True)
        if chosen and os.path.basename(chosen) != named:
            print(f"{stage}: warning: resuming from {chosen}, the newest intact checkpoint", flush=True)
            _write_text_atomic(pointer, os.path.basename(chosen))
        elif not chosen:
            print(f"{stage}: warning: no intact checkpoint left in {run_dir}; starting from step 0", flush=True)
    if d.distributed:
        box = [chosen]
        dist.broadcast_object_list(box, src=0)
        chosen = box[0]
    return chosen


def _of_another_stage(path: str, names) -> bool:
    """Whether the checkpoint's manifest lists no file under one of the model directories `names`."""
    try:
        listed = manifest_files(path)
    except (OSError, ValueError, KeyError):
        return False
    return listed is not None and any(not any(r.startswith(n + os.sep) for r in listed) for n in names)


def _fsync_dir(path: str):
    for root, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), "rb+") as fh:
                os.fsync(fh.fileno())


def latest_checkpoint(run_dir: str) -> str | None:
    pointer = os.path.join(run_dir, "latest")
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        path = os.path.join(run_dir, f.read().strip())
    return path if os.path.isdir(path) else None


def load_train_state(ckpt: str) -> dict:
    """train_state.pt, unpickled with weights_only=True: tensors and plain containers only."""
    return torch.load(os.path.join(ckpt, "train_state.pt"), map_location="cpu", weights_only=True)


def start_or_resume(run_dir: str, resume: bool, models: dict, optimizers: dict, last_step: int, d: Dist,
                    stage: str, config=None) -> tuple[int, dict, "Metrics"]:
    """Where a stage starts: (step, the stage state saved with its checkpoint, the metrics log). Step 0 and {}
    unless resume and run_dir has a checkpoint (launch.sh always passes --resume); then that checkpoint is loaded
    into models (name -> model, read from ckpt/name) and optimizers (name -> (model, optimizer)), sharded or not,
    metrics.jsonl is cut back to its step, and a run found at last_step gets a missing final/ published. The
    config (its report_to) chooses the loggers besides metrics.jsonl and is what they record."""
    ckpt = resume_checkpoint(run_dir, d, stage, models.keys()) if resume else None
    if d.is_main and os.path.exists(os.path.join(run_dir, PREEMPTED_MARKER)):
        os.remove(os.path.join(run_dir, PREEMPTED_MARKER))  # this run is under way again
    step, state = _load_checkpoint(ckpt, models, optimizers, d, stage) if ckpt else (0, {})
    if ckpt and step == last_step:
        publish_missing_final(run_dir, d)
    return step, state, Metrics(run_dir, d, resume_step=step if ckpt else None,
                                report_to=getattr(config, "report_to", ""), config=config)


def _load_checkpoint(ckpt: str, models: dict, optimizers: dict, d: Dist, stage: str) -> tuple[int, dict]:
    from model import GPT
    train_state = load_train_state(ckpt)
    for name, model in models.items():
        saved = GPT.from_pretrained(os.path.join(ckpt, name), scalar_head=model.config.scalar_head)
        state = saved.state_dict()
        if model.config.lora_rank:  # the saved weights are merged: resume from the adapter (lora_resume_state)
            state = lora_resume_state(model, os.path.join(ckpt, name), state)
        load_full_state_dict(model, state)
    for name, (model, optimizer) in optimizers.items():
        load_full_optimizer_state(model, optimizer, train_state["optimizers"][name])
    if d.is_main:
        print(f"{stage}: resumed from {ckpt} at step {train_state['step']}")
    return train_state["step"], train_state["state"]


def lora_resume_state(model, directory: str, merged: dict) -> dict:
    """The full state of a LoRA model at checkpoint `directory` (model.save_hf's layout: merged weights, adapter/).
    The frozen base is the model's own, as loaded from --init_from again (the merged file minus B A would differ in
    the last bits); the adapters come from directory/adapter; the other trained parameters (a score head) are not
    touched by the merge and come from the merged weights. So a resumed run continues bit for bit."""
    from model import load_peft_adapter
    state = {k: v for k, v in full_state_dict(model).items()}
    trained = {n for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n}
    state.update({k: merged[k] for k in trained})
    state.update(load_peft_adapter(os.path.join(directory, "adapter"), model.config))
    return state


def _link_or_copy(src: str, dst: str):
    """A hard link: final/ shares the checkpoint's files instead of a second copy of the weights (a file is never
    rewritten in place: checkpoints are written beside and renamed). A copy where links are not supported."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _publish(run_dir: str, ckpt: str):
    """Rank 0: run_dir/final := the models of checkpoint ckpt, assembled as final.tmp, then renamed."""
    final, tmp, old = (os.path.join(run_dir, n) for n in ("final", "final.tmp", "final.old"))
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(ckpt, tmp, ignore=shutil.ignore_patterns("train_state.pt"), copy_function=_link_or_copy)
    except OSError as e:  # shutil.Error (one per file that failed) is an OSError too
        shutil.rmtree(tmp, ignore_errors=True)
        raise SystemExit(f"could not write {final}: {e}; checkpoint {ckpt} is complete: copy its models from there")
    if os.path.exists(final):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def publish_missing_final(run_dir: str, d: Dist):
    """If final/ is missing (a resume found the run at its last step after publishing final/ failed), publish
    the latest checkpoint. Every rank looks before any rank acts (the barrier)."""
    missing = not os.path.isdir(os.path.join(run_dir, "final"))
    if d.distributed:
        dist.barrier()
    if missing and d.is_main:
        _publish(run_dir, latest_checkpoint(run_dir))
    if missing and d.distributed:
        dist.barrier()


# -----------------------------------------------------------------------------
# Preemption: SIGTERM (what SLURM, Kubernetes and spot instances send before a kill) saves the step and exits
#
# The handler only sets a flag; the loop acts at the end of the step it is in: every rank agrees (`preempted`,
# a MAX all_reduce, so collectives stay in order), the stage saves a checkpoint as it would on schedule, and
# `exit_preempted` exits with PREEMPTED_EXIT. Saving inside the handler instead can hang or write half a
# checkpoint (Lightning#21406); Lightning's SIGTERM path also sets a flag and acts at the next batch
# (loops/training_epoch_loop.py L259-272, REFERENCES 6.4).

PREEMPTED_EXIT = 75  # EX_TEMPFAIL (sysexits.h): "try again later"; launch.sh reports it as "preempted"
PREEMPTED_MARKER = "PREEMPTED"  # run_dir/PREEMPTED names the checkpoint; torchrun's agent exits 1 after a signal


def watch_preemption(signals: str) -> threading.Event:
    """Install handlers for the comma-separated signal names (`--preempt_signals`, e.g. "SIGTERM,SIGUSR1") that set
    the returned event and nothing else. "" installs none (the signals keep their default: the process dies)."""
    flag = threading.Event()
    for name in filter(None, (n.strip().upper() for n in signals.split(","))):
        sig = getattr(signal, name, None)
        if not isinstance(sig, signal.Signals) or name in ("SIGKILL", "SIGSTOP"):
            raise SystemExit(f"--preempt_signals={signals!r}: {name} is not a signal that can be caught "
                             f"(e.g. SIGTERM,SIGUSR1,SIGUSR2)")
        signal.signal(sig, lambda signum, frame: flag.set())
    return flag


def preempted(flag: threading.Event, d: Dist) -> bool:
    """Whether any rank got a preemption signal: all ranks must stop after the same step."""
    if not d.distributed:  # no collective, and no device sync per step
        return flag.is_set()
    got = torch.tensor(float(flag.is_set()), device=d.device)
    dist.all_reduce(got, op=dist.ReduceOp.MAX)
    return bool(got.item())


def exit_preempted(run_dir: str, step: int, d: Dist, stage: str):
    """After the checkpoint of `step` is saved: say so, leave run_dir/PREEMPTED for launch.sh, exit PREEMPTED_EXIT."""
    if d.is_main:
        ckpt = os.path.join(run_dir, f"ckpt_{step:06d}")
        _write_text_atomic(os.path.join(run_dir, PREEMPTED_MARKER), ckpt + "\n")
        print(f"{stage}: preempted: saved {ckpt} (step {step}); exiting with code {PREEMPTED_EXIT}. "
              f"The same command with --resume continues from there", flush=True)
    shutdown_distributed()
    raise SystemExit(PREEMPTED_EXIT)


# -----------------------------------------------------------------------------
# Metrics: one JSON line per log step, a short line on the console


class Metrics:
    """Appends {"step": ..., **metrics} to run_dir/metrics.jsonl on rank 0. On resume, lines past the
    checkpoint's step are dropped so the file equals that of an uninterrupted run."""

    def __init__(self, run_dir: str, d: Dist, resume_step: int | None = None, report_to: str = "", config=None):
        self.path, self.main = os.path.join(run_dir, "metrics.jsonl"), d.is_main
        self.start = time.time()
        self.trackers = open_trackers(report_to, run_dir, config) if self.main else []
        if self.main and resume_step is None and os.path.exists(self.path):
            os.remove(self.path)
        if self.main and resume_step is not None and os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if (step := _row_step(line)) is not None and step <= resume_step]
            _write_text_atomic(self.path, "".join(kept))

    def log(self, step: int, metrics: dict, echo: bool = True):
        if not self.main:
            return
        clean = {k: (v.item() if torch.is_tensor(v) else v) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        for log in self.trackers:
            log(step, {k: v for k, v in clean.items() if isinstance(v, (int, float))})
        if echo:
            from tqdm import tqdm
            shown = " ".join(f"{k}={_fmt(v)}" for k, v in clean.items() if not isinstance(v, list))  # samples: too long
            tqdm.write(f"step {step}: {shown}")


REPORT_TO = ("tensorboard", "wandb")
_TRACKER_CLOSERS = []  # run_main calls these before os._exit; a plain exit leaves them to atexit


def open_trackers(report_to: str, run_dir: str, config=None) -> list:
    """Loggers besides metrics.jsonl, named as TRL's `report_to`: "tensorboard" writes run_dir/tensorboard
    (torch.utils.tensorboard), "wandb" logs to Weights & Biases (WANDB_MODE=offline works without a network).
    Each is a function (step, {name: number}); the metric names are the JSONL ones, which overlay on TRL's."""
    trackers = []
    for name in filter(None, report_to.split(",")):
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))

            def log_tb(step, values, writer=writer):
                for k, v in values.items():
                    writer.add_scalar(k, v, step)
                writer.flush()
            trackers.append(log_tb)
            _TRACKER_CLOSERS.append(writer.close)
        elif name == "wandb":
            try:
                import wandb
            except ImportError:
                raise SystemExit("--report_to=wandb: wandb is not installed (pip install wandb)") from None
            run = wandb.init(dir=run_dir, config=dataclasses.asdict(config) if config is not None else None,
                             name=os.path.basename(os.path.normpath(run_dir)))
            trackers.append(lambda step, values, run=run: run.log(values, step=step))
            _TRACKER_CLOSERS.append(run.finish)
        else:
            raise SystemExit(f"--report_to={report_to!r}: choose from {REPORT_TO}, comma-separated, or leave empty")
    return trackers


def progress_bar(total: int, initial: int, desc: str, d: Dist):
    """tqdm on the main process of an interactive terminal; elsewhere (a log file, CI) no bar, whose \r
    redraws would flood the log: the metric lines are printed as plain lines either way."""
    import sys
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, disable=not (d.is_main and sys.stderr.isatty()))


def _row_step(line: str) -> int | None:
    """The step of one metrics.jsonl line; None for a blank line or a torn one (a kill during its append: rows
    are written before the checkpoint of their step, so a torn row is always past the one we resume from)."""
    try:
        return json.loads(line).get("step", 0) if line.endswith("\n") else None
    except json.JSONDecodeError:
        return None


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)
