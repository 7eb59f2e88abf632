"""Side-by-side benchmarks against HF transformers and TRL; the results and how they were taken are in
docs/benchmarks.md.

    python bench.py train_step      # forward + backward + AdamW: our GPT vs transformers.GPT2LMHeadModel
    python bench.py sft --size=gpt2 --vocab_size=50257   # an SFT step on HH-shaped rows (384 + 128 tokens) vs HF
    python bench.py generate        # rollouts at batch 16: our KV cache vs HF generate vs no cache, 32/128/512 tokens
    python bench.py generate_compiled  # the same with generate(compile_step=True) (torch.compile'd decode step) added
    python bench.py ppo_iteration   # one PPO update (rollout, score, update): ours vs TRL's PPOTrainer
    python bench.py grpo_iteration  # one GRPO update (group advantages, no critic): ours vs TRL's GRPOTrainer
    python bench.py memory          # peak memory of each stage (as a subprocess); bytes per PPO model
    python bench.py mfu             # CUDA only: SFT MFU of GPT-2 124M at 1024 tokens, bf16, eager and compiled
    python bench.py plan            # expected bytes per GPU for PPO (4 models) and the group methods (3), 1 and 8 GPUs
    python bench.py gpu             # CUDA: the GPU checks, MFU, a gpt2-xl PPO iteration, rollout tokens/s -> one JSON
    python bench.py gpu --dry --device=cpu   # the same at toy sizes on CPU (every code path but CUDA)

How every comparison is taken. Both sides live in one process, are built from the same weights (a random
HF model, written with save_pretrained and read into ours with GPT.from_pretrained) and get the same
inputs. After warm-up they run alternately (A B, then B A, ...), so a change in machine load hits both
alike; each number is the median of --repeats runs and each ratio is a ratio of medians. Results are
printed as a table and appended, one JSON line each, to --results, with the machine, the versions, the
config and the load average at the start and end (a busy shared machine shows there). --profile adds
where the time goes on each side (torch.profiler for ops, cProfile for the Python between them). Each
default run takes under 2 minutes on an idle 2-core CPU; on a busy one, pass --threads=1 (see
docs/benchmarks.md). `python bench.py generate --help` lists the flags.
"""

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Config:
    # --- the benchmark model (train_step, generate, ppo_iteration)
    n_layer: int = 4
    """layers"""
    n_head: int = 4
    """attention heads"""
    n_embd: int = 256
    """width"""
    vocab_size: int = 8192
    """smaller than GPT-2's 50257 so that the trunk, where the two implementations differ, is not hidden
    behind the LM head (one GEMM, the same on both sides); use --size=gpt2 --vocab_size=50257 for GPT-2"""
    size: str = ""
    """a model.GPT_SIZES name (e.g. "gpt2") that sets n_layer, n_head and n_embd"""
    block_size: int = 1024
    """positions (n_positions); at least prompt + longest generation"""
    # --- train_step
    train_batch: int = 4
    """sequences per training step"""
    train_seq_len: int = 128
    """tokens per sequence"""
    # --- sft
    sft_batch: int = 2
    """sequences per SFT step"""
    sft_prompt_len: int = 384
    """prompt tokens per row (no loss on them); HH-RLHF-shaped rows: a long dialogue, a short answer"""
    sft_response_len: int = 128
    """response tokens per row (the loss)"""
    # --- generate
    gen_batch: int = 16
    """prompts per generate call"""
    gen_prompt_len: int = 16
    """prompt tokens (no padding)"""
    gen_lengths: str = "32,128,512"
    """new tokens per row, comma-separated: our KV cache and HF generate"""
    nocache_lengths: str = "32,128"
    """the lengths at which our model without a cache also runs (quadratic: 512 takes minutes on a CPU)"""
    greedy: bool = False
    """greedy decoding on both sides instead of sampling at temperature 1 (top-k and top-p off)"""
    # --- ppo_iteration
    ppo_batch: int = 16
    """prompts per PPO update (one minibatch, no gradient accumulation, on both sides)"""
    ppo_prompt_len: int = 16
    """prompt tokens (no padding)"""
    ppo_response_length: int = 32
    """new tokens per response"""
    ppo_epochs: int = 4
    """PPO epochs per update"""
    ppo_updates: int = 2
    """updates per timed run (TRL: one trainer.train() of this many updates); time per update = run / this"""
    grpo_samples_per_prompt: int = 4
    """grpo_iteration: the group size (TRL num_generations); ppo_batch sequences per update = ppo_batch / this prompts"""
    # --- memory
    memory_model_size: str = "cpu-small"
    """model.GPT_SIZES name for the stage runs (sft.py --model_size)"""
    # --- plan (no model is run: bytes from the configs, counted on the meta device)
    plan_models: str = "gpt2,gpt2-medium,gpt2-large,gpt2-xl,Qwen2.5-0.5B,Qwen2.5-1.5B"
    """comma-separated: model.GPT_SIZES names or PUBLISHED_CONFIGS names"""
    plan_gpus: str = "1,8"
    """comma-separated GPU counts (FSDP2 ranks)"""
    plan_micro_batch: int = 8
    """sequences per forward/backward per GPU (ppo.REAL_DATA micro_batch_size)"""
    plan_prompt_len: int = 384
    """prompt tokens (ppo.REAL_DATA max_prompt_tokens)"""
    plan_response_len: int = 128
    """response tokens (ppo.REAL_DATA response_length)"""
    plan_rollout: int = 64
    """sequences per rollout over all GPUs (ppo.Config rollout_batch_size x samples_per_prompt 1): the KV cache"""
    plan_lora_rank: int = 16
    """also plan each method with LoRA of this rank on every block projection (ppo.py --lora_rank); 0 = not"""
    # --- mfu (CUDA)
    mfu_batch: int = 8
    """sequences per step"""
    mfu_seq_len: int = 1024
    """tokens per sequence"""
    mfu_steps: int = 10
    """steps per timed run"""
    # --- gpu
    dry: bool = False
    """gpu: run every part at toy sizes (GPU_CHECK_SIZES["dry"]): on CPU, every code path but CUDA; with
    --device=cuda, a quick smoke run on the GPU before the real one"""
    gpu_out: str = "gpu_check.json"
    """gpu: where the JSON goes"""
    # --- method
    repeats: int = 3
    """timed runs per side; the median is reported"""
    warmup: int = 1
    """untimed runs per side first"""
    threads: int = 0
    """torch CPU threads (0 = torch's default); both sides use the same"""
    profile: bool = False
    """then profile one more run of each side (torch.profiler: top ops; cProfile: top Python functions)"""
    profile_rows: int = 15
    """rows of each profile table"""
    seed: int = 0
    """weights, prompts and sampling"""
    device: str = "auto"
    """auto, cpu or cuda"""
    results: str = "bench_results.jsonl"
    """JSON lines are appended here"""


# -----------------------------------------------------------------------------
# Method: alternate the sides, take medians, record the machine


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(fns: dict, repeats: int, warmup: int, device) -> dict:
    """Run each callable `warmup` times, then `repeats` timed rounds in alternating order (A B, B A, ...).
    Returns name -> list of seconds."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names, times = list(fns), {name: [] for name in fns}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            sync(device)
            start = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def environment(device) -> dict:
    """Machine, versions and date, written into every result line."""
    import transformers
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    mem_kb = next((int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    try:  # the commit, and the tracked files changed since it (the numbers belong to that working tree)
        commit = _git("rev-parse", "--short", "HEAD").strip()
        modified = [line[3:] for line in _git("status", "--porcelain", "--untracked-files=no").splitlines()]
    except OSError:
        commit, modified = "", []
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "nproc": os.cpu_count(), "cpu": cpu, "ram_gib": round(mem_kb / 2**20, 1),
            "torch_threads": torch.get_num_threads(), "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl_version, "commit": commit,
            "modified_files": modified}


def _git(*args) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout


def record(cfg: Config, command: str, rows: list, columns: list, env: dict, load_start):
    """Print rows as a markdown table (columns: keys of each row) and append each row as a JSON line."""
    load = [round(x, 2) for x in load_start]
    print(f"\n{command}: load average at start {load}, {env['torch_threads']} torch threads, {env['device']}")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    end = [round(x, 2) for x in os.getloadavg()]
    with open(os.path.join(ROOT, cfg.results) if not os.path.isabs(cfg.results) else cfg.results, "a") as f:
        for row in rows:
            f.write(json.dumps({"bench": command, **row, "loadavg_start": load, "loadavg_end": end,
                                "argv": sys.argv[1:], "config": dataclasses.asdict(cfg), "env": env}) + "\n")


def _cell(value):
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return "" if value is None else str(value)


def profile_each(fns: dict, device, rows: int) -> list:
    """Two more runs of each callable: one under cProfile (the Python functions with the most own time:
    what happens between ops), then one under torch.profiler (the ops with the most self time). cProfile
    goes first: the torch profiler's events are Python objects, and they would slow a gc.collect() inside
    the next run. Prints both and returns the top entries as result rows."""
    import cProfile
    import pstats
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out = []
    for name, fn in fns.items():
        py = cProfile.Profile()
        py.runcall(fn)
        stats = pstats.Stats(py)
        top = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:rows]  # (cc, nc, tottime, cumtime, callers)
        print(f"\n--- cProfile: {name} (total {stats.total_tt:.3f} s), functions by own time")
        for (file, line, func), (_, calls, tottime, cumtime, _) in top:
            print(f"{tottime:9.3f} s own {cumtime:9.3f} s cum {calls:7d} calls  {func}  {os.path.basename(file)}:{line}")
        sync(device)
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            fn()
            sync(device)
        wall = time.perf_counter() - start
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        op_self = sum(e.self_cpu_time_total for e in events) / 1e6
        print(f"--- torch.profiler: {name} (wall {wall:.3f} s under the profiler, sum of op self CPU time {op_self:.3f} s)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
        out.append({"impl": name, "profiled_wall_s": wall, "op_self_cpu_s": op_self,
                    "top_ops": [{"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count}
                                for e in events[:rows]],
                    "top_python": [{"function": f"{func} {os.path.basename(file)}:{line}", "own_s": tottime,
                                    "cum_s": cumtime, "calls": calls}
                                   for (file, line, func), (_, calls, tottime, cumtime, _) in top]})
        del prof, events
    return out


# -----------------------------------------------------------------------------
# The same weights on both sides


def hf_gpt2_config(cfg: Config, **extra):
    """An HF GPT2Config for the benchmark model: dropout off (as in every stage), EOS = last id."""
    from transformers import GPT2Config
    from model import GPT_SIZES
    dims = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)
    if cfg.size:
        dims = {k: v for k, v in GPT_SIZES[cfg.size].items() if k in dims}
    return GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, **dims, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0, bos_token_id=cfg.vocab_size - 1,
                      eos_token_id=cfg.vocab_size - 1, **extra)


def hf_and_ours(cfg: Config, device, workdir: str):
    """A random GPT2LMHeadModel (HF's default attention, sdpa) and our GPT loaded from its save_pretrained."""
    from transformers import GPT2LMHeadModel
    from model import GPT
    torch.manual_seed(cfg.seed)
    hf = GPT2LMHeadModel(hf_gpt2_config(cfg))
    hf.save_pretrained(workdir)
    ours = GPT.from_pretrained(workdir)
    return hf.to(device), ours.to(device)


def model_desc(model) -> str:
    c = model.config
    return f"L{c.n_layer} H{c.n_head} C{c.n_embd} V{c.vocab_size} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M)"


# -----------------------------------------------------------------------------
# 1. Training step


def bench_train_step(cfg: Config, device, env):
    """Forward + backward + AdamW step on random tokens, the same loss function on both sides (shifted
    cross-entropy on float32 logits), HF called with use_cache=False (its fastest training path)."""
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        hf, ours = hf_and_ours(cfg, device, tmp)
    hf.train(), ours.train()
    g = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(0, cfg.vocab_size, (cfg.train_batch, cfg.train_seq_len), generator=g).to(device)
    V = cfg.vocab_size

    def loss_of(logits):
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, V), ids[:, 1:].reshape(-1))

    # Same weights, same inputs: the losses agree before any step.
    with torch.no_grad():
        parity = abs(float(loss_of(ours(ids))) - float(loss_of(hf(input_ids=ids, use_cache=False).logits)))

    def make_step(model, forward):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            loss = loss_of(forward(model))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    fns = {"ours": make_step(ours, lambda m: m(ids)),
           "hf": make_step(hf, lambda m: m(input_ids=ids, use_cache=False).logits)}
    times = alternate(fns, cfg.repeats, cfg.warmup, device)
    tokens = cfg.train_batch * cfg.train_seq_len
    med = {k: statistics.median(v) for k, v in times.items()}
    case = f"{model_desc(ours)} B{cfg.train_batch} T{cfg.train_seq_len}"
    rows = [{"case": case, "impl": name, "median_s": med[name], "times_s": times[name],
             "tokens_per_s": tokens / med[name], "speedup_vs_hf": med["hf"] / med[name],
             "initial_loss_absdiff": parity} for name in fns]
    if cfg.profile:
        for p in profile_each(fns, device, cfg.profile_rows):
            rows.append({"case": case, "impl": p.pop("impl") + " (profile)", **p})
    record(cfg, "train_step", rows, ["case", "impl", "median_s", "tokens_per_s", "speedup_vs_hf"], env, load)


def bench_sft(cfg: Config, device, env):
    """One SFT step on HH-shaped rows (sft_prompt_len prompt tokens without loss, sft_response_len response tokens),
    forward + backward + AdamW: ours as sft.py runs it (the LM head from sft.loss_start on, sft.sft_loss,
    runtime.make_adamw, fused where torch has it) vs GPT2LMHeadModel with labels -100 on the prompt (its own
    loss, logits on every position) and the fused AdamW of HF Trainer's default `adamw_torch_fused`.
    The first losses are compared before any step (they must agree to float rounding)."""
    import sft
    from runtime import make_adamw
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        hf, ours = hf_and_ours(cfg, device, tmp)
    hf.train(), ours.train()
    B, P, R = cfg.sft_batch, cfg.sft_prompt_len, cfg.sft_response_len
    g = torch.Generator().manual_seed(cfg.seed)
    rows = [(torch.randint(0, cfg.vocab_size - 1, (P,), generator=g).tolist(),
             torch.randint(0, cfg.vocab_size - 1, (R,), generator=g).tolist()) for _ in range(B)]
    import data
    batch = data.collate_sft(rows, cfg.vocab_size - 1)
    first = sft.loss_start(batch["loss_mask"])
    ids, attn, loss_mask = (batch[k].to(device) for k in ("input_ids", "attention_mask", "loss_mask"))
    labels = ids.masked_fill(loss_mask == 0, -100)

    def ours_loss():
        total, count = sft.sft_loss(ours(ids, attention_mask=attn, logits_from=first), ids, loss_mask, first)
        return total / count

    def hf_loss():
        return hf(input_ids=ids, attention_mask=attn, labels=labels, use_cache=False).loss

    with torch.no_grad():
        parity = abs(float(ours_loss()) - float(hf_loss()))
    opt_ours = make_adamw(ours, lr=1e-5, weight_decay=0.0, betas=(0.9, 0.999))
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-5, fused=True)

    def make_step(loss_fn, opt):
        def step():
            loss_fn().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    fns = {"ours": make_step(ours_loss, opt_ours), "hf": make_step(hf_loss, opt_hf)}
    times = alternate(fns, cfg.repeats, cfg.warmup, device)
    med = {k: statistics.median(v) for k, v in times.items()}
    case = f"{model_desc(ours)} B{B} prompt {P} + response {R}"
    out = [{"case": case, "impl": name, "median_s": med[name], "times_s": times[name],
            "tokens_per_s": B * (P + R) / med[name], "speedup_vs_hf": med["hf"] / med[name],
            "initial_loss_absdiff": parity, "logits_from": first} for name in fns]
    if cfg.profile:
        for p in profile_each(fns, device, cfg.profile_rows):
            out.append({"case": case, "impl": p.pop("impl") + " (profile)", **p})
    record(cfg, "sft", out, ["case", "impl", "median_s", "tokens_per_s", "speedup_vs_hf", "initial_loss_absdiff"],
           env, load)


# -----------------------------------------------------------------------------
# 2. Rollout generation


def bench_generate(cfg: Config, device, env):
    """New tokens/s at batch gen_batch for each length: our generate with the KV cache, HF generate (its
    default cache), and ours without a cache (full recompute each step). Every row generates exactly
    `length` tokens: no EOS on our side, min_new_tokens = max_new_tokens and no EOS on HF's."""
    from transformers import GenerationConfig
    from model import generate
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        hf, ours = hf_and_ours(cfg, device, tmp)
    hf.eval(), ours.eval()
    lengths = [int(n) for n in cfg.gen_lengths.split(",") if n]
    nocache = {int(n) for n in cfg.nocache_lengths.split(",") if n}
    B, P = cfg.gen_batch, cfg.gen_prompt_len
    longest = max(lengths + list(nocache))
    if P + longest > cfg.block_size:
        raise SystemExit(f"prompt {P} + {longest} new tokens > block_size {cfg.block_size}")
    g = torch.Generator().manual_seed(cfg.seed)
    prompt = torch.randint(0, cfg.vocab_size - 1, (B, P), generator=g).to(device)
    mask = torch.ones_like(prompt)
    temperature = 0.0 if cfg.greedy else 1.0

    def ours_fn(n, use_cache):
        def run():
            gen = torch.Generator(device=device).manual_seed(cfg.seed)
            seq, _ = generate(ours, prompt, mask, n, temperature=temperature, eos_id=None, pad_id=0,
                              generator=gen, use_cache=use_cache)
            assert seq.shape == (B, P + n), seq.shape
        return run

    def hf_fn(n):
        sampling = {} if cfg.greedy else dict(temperature=1.0, top_k=0, top_p=1.0)
        gen_cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=not cfg.greedy, eos_token_id=None,
                                   pad_token_id=0, use_cache=True, **sampling)

        def run():
            out = hf.generate(input_ids=prompt, attention_mask=mask, generation_config=gen_cfg)
            assert out.shape == (B, P + n), out.shape
        return run

    # Warm-up once per side at the shortest length; then each length alternates its sides.
    warm = {"ours_kv": ours_fn(lengths[0], True), "hf_generate": hf_fn(lengths[0])}
    if nocache:
        warm["ours_nocache"] = ours_fn(min(nocache), False)
    alternate(warm, 0, cfg.warmup, device)
    rows, profiled = [], {}
    base = {}
    for n in sorted(set(lengths) | nocache):
        fns = {}
        if n in lengths:
            fns |= {"ours_kv": ours_fn(n, True), "hf_generate": hf_fn(n)}
        if n in nocache:
            fns["ours_nocache"] = ours_fn(n, False)
        times = alternate(fns, cfg.repeats, 0, device)
        med = {k: statistics.median(v) for k, v in times.items()}
        for name in fns:
            per_token = med[name] / n
            base.setdefault(name, (n, per_token))
            rows.append({"case": f"{model_desc(ours)} B{B} P{P}", "new_tokens": n, "impl": name,
                         "median_s": med[name], "times_s": times[name], "new_tokens_per_s": B * n / med[name],
                         "speedup_vs_hf": med["hf_generate"] / med[name] if "hf_generate" in med else None,
                         "ms_per_step": 1e3 * per_token,
                         "step_cost_vs_shortest": per_token / base[name][1]})
        if cfg.profile and n == (128 if 128 in lengths else lengths[0]):
            profiled = {k: v for k, v in fns.items() if k != "ours_nocache"}
    if cfg.profile:
        for p in profile_each(profiled, device, cfg.profile_rows):
            rows.append({"case": "profile", "impl": p.pop("impl"), **p})
    record(cfg, "generate", rows, ["case", "new_tokens", "impl", "median_s", "new_tokens_per_s", "speedup_vs_hf",
                                   "ms_per_step", "step_cost_vs_shortest"], env, load)
    return rows


def bench_generate_compiled(cfg: Config, device, env):
    """generate(compile_step=True) (the decode step through torch.compile, gpt-fast style) against the eager KV-cache
    path and HF generate, the same calls as `generate` otherwise. Each length compiles its own graph during the
    warm-up; `compile_s` is that warm-up call's time (compile plus one run), paid once per process and shape."""
    from transformers import GenerationConfig
    from model import generate
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        hf, ours = hf_and_ours(cfg, device, tmp)
    hf.eval(), ours.eval()
    B, P = cfg.gen_batch, cfg.gen_prompt_len
    g = torch.Generator().manual_seed(cfg.seed)
    prompt = torch.randint(0, cfg.vocab_size - 1, (B, P), generator=g).to(device)
    mask = torch.ones_like(prompt)
    temperature = 0.0 if cfg.greedy else 1.0

    def ours_fn(n, compile_step):
        def run():
            gen = torch.Generator(device=device).manual_seed(cfg.seed)
            seq, _ = generate(ours, prompt, mask, n, temperature=temperature, eos_id=None, pad_id=0, generator=gen,
                              compile_step=compile_step)
            assert seq.shape == (B, P + n), seq.shape
            return seq
        return run

    def hf_fn(n):
        sampling = {} if cfg.greedy else dict(temperature=1.0, top_k=0, top_p=1.0)
        gen_cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=not cfg.greedy, eos_token_id=None,
                                   pad_token_id=0, use_cache=True, **sampling)
        return lambda: hf.generate(input_ids=prompt, attention_mask=mask, generation_config=gen_cfg)

    rows = []
    for n in [int(x) for x in cfg.gen_lengths.split(",") if x]:
        if P + n > cfg.block_size:
            raise SystemExit(f"prompt {P} + {n} new tokens > block_size {cfg.block_size}")
        fns = {"ours_kv": ours_fn(n, False), "ours_kv_compiled": ours_fn(n, True), "hf_generate": hf_fn(n)}
        sync(device)
        start = time.perf_counter()
        same = torch.equal(fns["ours_kv_compiled"](), fns["ours_kv"]())  # the compile happens here
        sync(device)
        compile_s = time.perf_counter() - start
        times = alternate(fns, cfg.repeats, cfg.warmup, device)
        med = {k: statistics.median(v) for k, v in times.items()}
        for name in fns:
            rows.append({"case": f"{model_desc(ours)} B{B} P{P}", "new_tokens": n, "impl": name, "median_s": med[name],
                         "times_s": times[name], "new_tokens_per_s": B * n / med[name],
                         "speedup_vs_hf": med["hf_generate"] / med[name], "speedup_vs_eager": med["ours_kv"] / med[name],
                         "compile_s": compile_s if name == "ours_kv_compiled" else None,
                         "same_tokens_as_eager": same if name == "ours_kv_compiled" else None})
    record(cfg, "generate_compiled", rows, ["case", "new_tokens", "impl", "median_s", "new_tokens_per_s", "speedup_vs_hf",
                                            "speedup_vs_eager", "compile_s", "same_tokens_as_eager"], env, load)
    return rows


# -----------------------------------------------------------------------------
# 3. One PPO iteration, ours vs TRL


def word_level_tokenizer(vocab_size: int):
    """An offline tokenizer for TRL: words w0..w(V-3), <eos> = V-2, <pad> = V-1 (TRL needs pad != EOS)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast
    vocab = {f"w{i}": i for i in range(vocab_size - 2)} | {"<eos>": vocab_size - 2, "<pad>": vocab_size - 1}
    backend = Tokenizer(WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="w0",
                                   padding_side="left")


def save_ppo_models(cfg: Config, root: str) -> dict:
    """Random HF policy, reference, reward and value models (GPT2ForSequenceClassification, one label)."""
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel
    hf_cfg = hf_gpt2_config(cfg, num_labels=1, pad_token_id=cfg.vocab_size - 1)
    hf_cfg.eos_token_id = hf_cfg.bos_token_id = cfg.vocab_size - 2
    dirs = {}
    for i, (name, cls) in enumerate([("policy", GPT2LMHeadModel), ("ref", GPT2LMHeadModel),
                                     ("reward", GPT2ForSequenceClassification), ("value", GPT2ForSequenceClassification)]):
        torch.manual_seed(cfg.seed + i)
        dirs[name] = os.path.join(root, name)
        cls(hf_cfg).save_pretrained(dirs[name])
    return dirs


LR = 3e-6  # both sides; the value only matters in that it is the same


def build_trl(cfg: Config, dirs: dict, prompts: list, workdir: str, total_updates: int, device):
    """TRL's PPOTrainer with the same sizes: one minibatch per epoch, no gradient accumulation."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import datasets
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel
    from transformers.trainer_callback import PrinterCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    policy, ref = (GPT2LMHeadModel.from_pretrained(dirs[n]) for n in ("policy", "ref"))
    reward, value = (GPT2ForSequenceClassification.from_pretrained(dirs[n]) for n in ("reward", "value"))
    args = PPOConfig(
        output_dir=workdir, report_to=[], use_cpu=device.type == "cpu", bf16=device.type == "cuda", seed=cfg.seed,
        learning_rate=LR, per_device_train_batch_size=cfg.ppo_batch, gradient_accumulation_steps=1,
        num_mini_batches=1, num_ppo_epochs=cfg.ppo_epochs, total_episodes=cfg.ppo_batch * total_updates,
        local_rollout_forward_batch_size=cfg.ppo_batch, response_length=cfg.ppo_response_length,
        temperature=0.7, stop_token="eos", missing_eos_penalty=1.0, kl_coef=0.05, num_sample_generations=0,
        save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    trainer = PPOTrainer(args=args, processing_class=word_level_tokenizer(cfg.vocab_size), model=policy,
                         ref_model=ref, reward_model=reward, value_model=value,
                         train_dataset=datasets.Dataset.from_dict({"input_ids": prompts}))
    trainer.remove_callback(PrinterCallback)  # its metrics line per update; not part of the work
    return trainer


@contextlib.contextmanager
def trl_phase_spy():
    """Timestamps the phases of each TRL update by wrapping functions its module calls (restored on exit):
    batch_generation (the rollout), masked_whiten, which train() calls once per update on the advantages
    at the end of scoring, and gc.collect, which it calls twice per update. Yields {"marks": [(event,
    time, mean response length)], "gc": [seconds of each gc.collect]}."""
    import gc
    from types import SimpleNamespace
    from trl.experimental.ppo import ppo_trainer as trl_ppo
    spy = {"marks": [], "gc": []}
    real_generation, real_whiten = trl_ppo.batch_generation, trl_ppo.masked_whiten

    def timed_generation(*args, **kwargs):
        spy["marks"].append(("rollout", time.perf_counter(), None))
        out = real_generation(*args, **kwargs)
        spy["marks"].append(("score", time.perf_counter(), None))
        return out

    def timed_whiten(values, mask, *args, **kwargs):
        out = real_whiten(values, mask, *args, **kwargs)
        spy["marks"].append(("update", time.perf_counter(), float(mask.sum(1).float().mean())))  # mask: response tokens
        return out

    def timed_collect(*args):
        start = time.perf_counter()
        out = gc.collect(*args)
        spy["gc"].append(time.perf_counter() - start)
        return out

    trl_ppo.batch_generation, trl_ppo.masked_whiten = timed_generation, timed_whiten
    trl_ppo.gc = SimpleNamespace(collect=timed_collect)  # only TRL's module sees the wrapper
    try:
        yield spy
    finally:
        trl_ppo.batch_generation, trl_ppo.masked_whiten, trl_ppo.gc = real_generation, real_whiten, gc


def phase_split(marks: list) -> list:
    """(rollout, score, update seconds, mean response length) per update from the spy's marks; an update
    ends where the next rollout starts or at the final "end" mark."""
    out, starts = [], [i for i, (event, _, _) in enumerate(marks) if event == "rollout"]
    for i in starts:
        t = {event: when for event, when, _ in marks[i:i + 3]}
        end = marks[i + 3][1]
        out.append((t["score"] - t["rollout"], t["update"] - t["score"], end - t["update"], marks[i + 2][2]))
    return out


def ours_config(cfg: Config, device, **overrides):
    """The ppo.Config of our side: TRL's preset at the benchmark's sizes (overrides win), validated as ppo.main does."""
    import ppo
    pcfg = ppo.Config(**{**ppo.PRESETS["trl"], "preset": "trl", "rollout_batch_size": cfg.ppo_batch,
                         "micro_batch_size": cfg.ppo_batch, "num_minibatches": 1, "num_ppo_epochs": cfg.ppo_epochs,
                         "response_length": cfg.ppo_response_length, "lr": LR, "seed": cfg.seed,
                         "device": device.type, **overrides})
    ppo.validate(pcfg)
    return pcfg


def build_ours(cfg: Config, dirs: dict, device):
    """Our four models from the same HF directories, the optimizer and config as ppo.main builds them."""
    from runtime import Dist, load_model
    d = Dist(device=device)
    pcfg = ours_config(cfg, device)
    policy = load_model(dirs["policy"], "policy", d, trainable=True)
    ref = load_model(dirs["ref"], "policy", d, trainable=False)
    reward = load_model(dirs["reward"], "reward", d, trainable=False, scalar_head=True)
    critic = load_model(dirs["value"], "reward", d, trainable=True, scalar_head=True)
    return assemble_ours(pcfg, d, policy, ref, reward, critic)


def random_ours(cfg: Config, config, device, **overrides):
    """build_ours without files, for sizes too large to write four times (gpt2-xl): a random policy and reward
    model (model.init_weights), the reference a copy of the policy and the critic a copy of the reward model,
    each in the dtype load_model gives it (runtime.precision: on CUDA with bf16, frozen models in bf16)."""
    import copy
    from model import GPT
    from runtime import Dist, precision
    d = Dist(device=device)
    pcfg = ours_config(cfg, device, **overrides)

    def random_model(scalar_head: bool, seed: int):
        with torch.device(device):
            model = GPT(dataclasses.replace(config, scalar_head=scalar_head))
        model.init_weights(seed=seed)
        return model

    def frozen(model):
        return model.to(precision(device.type, False, pcfg.bf16, trainable=False).weights).requires_grad_(False).eval()

    policy, critic = random_model(False, cfg.seed), random_model(True, cfg.seed + 1)
    ref, reward = frozen(copy.deepcopy(policy)), frozen(copy.deepcopy(critic))
    return assemble_ours(pcfg, d, policy, ref, reward, critic)


def assemble_ours(pcfg, d, policy, ref, reward, critic) -> dict:
    """The models (critic None: a group method) with the optimizer and its base learning rates, as our_ppo_iteration
    takes them."""
    import ppo
    trainable = torch.nn.ModuleDict({"policy": policy} if critic is None else {"policy": policy, "critic": critic})
    optimizer = ppo.make_optimizer(policy, critic, pcfg)
    return dict(policy=policy, ref=ref, reward=reward, critic=critic, trainable=trainable, optimizer=optimizer,
                base_lrs=[g["lr"] for g in optimizer.param_groups], cfg=pcfg, d=d)


def our_ppo_iteration(m: dict, query, query_mask, update: int, total_steps: int, eos_id: int, splits: list,
                      peaks: list | None = None):
    """Steps 1-5 of ppo.main's loop, by its own functions: rollout, make_experience, ppo_update. Appends the
    seconds of each phase (and the mean response length) to `splits` and, when `peaks` is a list, the peak memory
    of each phase in bytes (peak_memory). Returns (experience, ppo_update's statistics)."""
    from types import SimpleNamespace
    import ppo
    cfg, d, policy, tok = m["cfg"], m["d"], m["policy"], SimpleNamespace(eos_id=eos_id)
    marks, phase_peaks = [], []

    def phase_end():
        sync(d.device)
        marks.append(time.perf_counter())
        if peaks is not None:
            phase_peaks.append(peak_memory(d.device))
            reset_peak_memory(d.device)

    if peaks is not None:
        reset_peak_memory(d.device)
    marks.append(time.perf_counter())
    query_response, sample_logp = ppo.rollout(policy, query, query_mask, update, tok, cfg, d)
    phase_end()
    exp = ppo.make_experience(policy, m["critic"], m["ref"], m["reward"], query_response, query_mask, sample_logp,
                              cfg.kl_coef, tok, cfg, d, check_logprobs=ppo.checks_logprobs(update, cfg))
    phase_end()
    stats = ppo.ppo_update(policy, m["critic"], m["trainable"], m["optimizer"], m["base_lrs"], exp, update, total_steps,
                           cfg, d)
    phase_end()
    splits.append((marks[1] - marks[0], marks[2] - marks[1], marks[3] - marks[2],
                   float(exp["action_mask"].sum(1).float().mean())))
    if peaks is not None:
        peaks.append(tuple(phase_peaks))
    return exp, stats


def alternate_updates(run_trl, run_ours, splits: dict, n: int, cfg: Config, device):
    """Warm both sides up (one update each), forget the warm-up's phase splits, then time runs of n updates,
    alternating (`alternate`). Returns the seconds of each run per side and the median seconds per update."""
    for _ in range(cfg.warmup):
        run_trl(1), run_ours(1)
    for v in splits.values():
        v.clear()
    times = alternate({"trl": lambda: run_trl(n), "ours": lambda: run_ours(n)}, cfg.repeats, 0, device)
    return times, {k: statistics.median(v) / n for k, v in times.items()}


def bench_ppo_iteration(cfg: Config, device, env):
    """Seconds per PPO update and its split (rollout / score / update; for TRL also the time in the two
    gc.collect() calls of each update, which fall in score and update), ours vs TRL, same sizes:
    ppo_batch prompts of ppo_prompt_len tokens, ppo_response_length new tokens at temperature 0.7,
    ppo_epochs epochs of one minibatch, separate critic, four models from the same HF weights."""
    load = os.getloadavg()
    N = cfg.ppo_updates
    total_updates = cfg.warmup + cfg.repeats * N + 1
    g = torch.Generator().manual_seed(cfg.seed)
    prompts = torch.randint(0, cfg.vocab_size - 2, (cfg.ppo_batch, cfg.ppo_prompt_len), generator=g)
    eos_id = cfg.vocab_size - 2
    with tempfile.TemporaryDirectory() as tmp:
        dirs = save_ppo_models(cfg, tmp)
        trainer = build_trl(cfg, dirs, prompts.tolist(), os.path.join(tmp, "trl"), total_updates, device)
        ours = build_ours(cfg, dirs, device)
    query, query_mask = prompts.to(device), torch.ones_like(prompts).to(device)
    total_steps = total_updates * cfg.ppo_epochs
    splits = {"ours": [], "trl": [], "trl_gc": []}
    counter = {"update": 0}

    def run_trl(n):
        with trl_phase_spy() as spy:
            trainer.args.num_total_batches = n  # train() runs this many updates; the schedule was sized at init
            trainer.train()
            spy["marks"].append(("end", time.perf_counter(), None))
        splits["trl"].extend(phase_split(spy["marks"]))
        splits["trl_gc"].append(sum(spy["gc"]) / n)

    def run_ours(n):
        for _ in range(n):
            our_ppo_iteration(ours, query, query_mask, counter["update"], total_steps, eos_id, splits["ours"])
            counter["update"] += 1

    times, med = alternate_updates(run_trl, run_ours, splits, N, cfg, device)
    case = (f"{model_desc(ours['policy'])} B{cfg.ppo_batch} P{cfg.ppo_prompt_len} N{cfg.ppo_response_length} "
            f"epochs{cfg.ppo_epochs}")
    rows = []
    for name in ("ours", "trl"):
        rollout, score, update, length = (statistics.median(s[i] for s in splits[name]) for i in range(4))
        rows.append({"case": case, "impl": name, "s_per_update": med[name], "times_s": [t / N for t in times[name]],
                     "speedup_vs_trl": med["trl"] / med[name], "rollout_s": rollout, "score_s": score,
                     "update_s": update, "response_len": length, "updates_per_run": N,
                     "gc_collect_s": statistics.median(splits["trl_gc"]) if name == "trl" else None})
    if cfg.profile:
        for p in profile_each({"ours": lambda: run_ours(1), "trl": lambda: run_trl(1)}, device, cfg.profile_rows):
            rows.append({"case": "profile", "impl": p.pop("impl"), **p})
    record(cfg, "ppo_iteration", rows, ["case", "impl", "s_per_update", "speedup_vs_trl", "rollout_s", "score_s",
                                        "update_s", "gc_collect_s", "response_len"], env, load)


def build_trl_grpo(cfg: Config, dirs: dict, prompts: list, workdir: str, device):
    """TRL's GRPOTrainer at the sizes of `bench_grpo_iteration`: every completion of an update in one batch
    (per_device_train_batch_size = prompts x group, no accumulation, so one optimizer step per iteration),
    num_iterations = ppo_epochs. The reward is a reward *model*: TRL loads the saved sequence classifier from its
    directory (with the word-level tokenizer saved next to it) and runs it on prompt + completion text, which this
    tokenizer maps back to the same ids. beta 0 (TRL's default): no reference model."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import datasets
    from transformers import GPT2LMHeadModel
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer
    tok = word_level_tokenizer(cfg.vocab_size)
    tok.save_pretrained(dirs["reward"])
    G = cfg.grpo_samples_per_prompt
    args = GRPOConfig(
        output_dir=workdir, report_to=[], use_cpu=device.type == "cpu", bf16=False, seed=cfg.seed, learning_rate=LR,
        per_device_train_batch_size=len(prompts) * G, gradient_accumulation_steps=1, num_generations=G,
        num_iterations=cfg.ppo_epochs, max_completion_length=cfg.ppo_response_length, temperature=1.0, beta=0.0,
        max_steps=cfg.ppo_epochs, save_strategy="no", logging_steps=10**6, disable_tqdm=True,
        dataloader_num_workers=0)
    # A trailing space: TRL scores prompt + completion as one string, and "w3 w7 " + "w4 w5" splits into 4 words.
    train = datasets.Dataset.from_dict({"prompt": [" ".join(f"w{i}" for i in p) + " " for p in prompts]})
    trainer = GRPOTrainer(model=GPT2LMHeadModel.from_pretrained(dirs["policy"]), reward_funcs=dirs["reward"], args=args,
                          train_dataset=train, processing_class=tok)
    trainer.remove_callback(PrinterCallback)
    return trainer


def trl_grpo_phase_spy(trainer, marks: list):
    """Timestamps each TRL GRPO update's phases by wrapping two of the trainer's methods on the instance:
    `_generate` (the rollout) and `_generate_and_score_completions` (rollout, reward model, old log-probs when
    num_iterations > 1, advantages); the update runs from there to the next rollout (or the final "end" mark)."""
    real_generate, real_score = trainer._generate, trainer._generate_and_score_completions

    def timed_generate(*args, **kwargs):
        marks.append(("rollout", time.perf_counter()))
        out = real_generate(*args, **kwargs)
        marks.append(("score", time.perf_counter()))
        return out

    def timed_score(*args, **kwargs):
        out = real_score(*args, **kwargs)
        marks.append(("update", time.perf_counter()))
        return out

    trainer._generate, trainer._generate_and_score_completions = timed_generate, timed_score


def grpo_phase_split(marks: list) -> list:
    """(rollout, score, update seconds) per update from `trl_grpo_phase_spy`'s marks."""
    starts = [i for i, (event, _) in enumerate(marks) if event == "rollout"]
    return [(marks[i + 1][1] - marks[i][1], marks[i + 2][1] - marks[i + 1][1], marks[i + 3][1] - marks[i + 2][1])
            for i in starts]


def build_ours_grpo(cfg: Config, dirs: dict, n_prompts: int, device):
    """Policy, reference and reward model from the same HF directories, no critic; ppo.py's trl_grpo preset (TRL
    GRPOTrainer's defaults) at the bench sizes. Ours computes the reference log-probs even at kl_coef 0 (it logs
    the KL), TRL at beta 0 skips them: that forward is on our side of the comparison."""
    import ppo
    from runtime import Dist, load_model
    d = Dist(device=device)
    G = cfg.grpo_samples_per_prompt
    pcfg = ppo.Config(**{**ppo.PRESETS["trl_grpo"], "preset": "trl_grpo", "rollout_batch_size": n_prompts,
                         "samples_per_prompt": G, "micro_batch_size": n_prompts * G, "num_minibatches": 1,
                         "num_ppo_epochs": cfg.ppo_epochs, "response_length": cfg.ppo_response_length, "lr": LR,
                         "seed": cfg.seed, "device": device.type})
    ppo.validate(pcfg)
    policy = load_model(dirs["policy"], "policy", d, trainable=True)
    ref = load_model(dirs["ref"], "policy", d, trainable=False)
    reward = load_model(dirs["reward"], "reward", d, trainable=False, scalar_head=True)
    return assemble_ours(pcfg, d, policy, ref, reward, None)


def bench_grpo_iteration(cfg: Config, device, env):
    """Seconds per GRPO update (rollout / score / update), ours (ppo.py with the trl_grpo preset: group advantages,
    no critic) vs TRL's GRPOTrainer, same sizes: ppo_batch / grpo_samples_per_prompt prompts of ppo_prompt_len
    tokens, grpo_samples_per_prompt samples each, ppo_response_length new tokens at temperature 1, ppo_epochs
    epochs (TRL num_iterations) of one minibatch, one reward-model forward per completion on each side.
    TRL runs as one trainer.train() of ppo_updates updates per timed run; `trl_setup_s` is the time from
    train() to its first rollout (dataloader, accelerate), which s_per_update includes and the phases do not."""
    load = os.getloadavg()
    G, N = cfg.grpo_samples_per_prompt, cfg.ppo_updates
    if cfg.ppo_batch % G:
        raise SystemExit(f"--ppo_batch={cfg.ppo_batch} must be a multiple of --grpo_samples_per_prompt={G}")
    n_prompts = cfg.ppo_batch // G
    g = torch.Generator().manual_seed(cfg.seed)
    prompts = torch.randint(0, cfg.vocab_size - 2, (n_prompts, cfg.ppo_prompt_len), generator=g)
    eos_id = cfg.vocab_size - 2
    tmp = tempfile.TemporaryDirectory()  # TRL reads the reward model's tokenizer from its directory at init only
    with tmp:
        dirs = save_ppo_models(cfg, tmp.name)
        trainer = build_trl_grpo(cfg, dirs, prompts.tolist(), os.path.join(tmp.name, "trl"), device)
        ours = build_ours_grpo(cfg, dirs, n_prompts, device)
    query = prompts.repeat_interleave(G, 0).to(device)  # groups: each prompt's G rows consecutive, as ppo.main
    query_mask = torch.ones_like(query)
    total_steps = (cfg.warmup + cfg.repeats * N + 1) * cfg.ppo_epochs
    splits = {"ours": [], "trl": [], "trl_setup": []}
    counter = {"update": 0}
    marks = []
    trl_grpo_phase_spy(trainer, marks)

    def run_trl(n):
        marks.clear()
        marks.append(("start", time.perf_counter()))
        trainer.args.max_steps = n * cfg.ppo_epochs  # one update = num_iterations optimizer steps on one rollout
        trainer.train()
        marks.append(("end", time.perf_counter()))
        splits["trl"].extend(grpo_phase_split(marks))
        splits["trl_setup"].append(marks[1][1] - marks[0][1])

    def run_ours(n):
        for _ in range(n):
            our_ppo_iteration(ours, query, query_mask, counter["update"], total_steps, eos_id, splits["ours"])
            counter["update"] += 1

    times, med = alternate_updates(run_trl, run_ours, splits, N, cfg, device)
    case = (f"{model_desc(ours['policy'])} {n_prompts} prompts x G{G} P{cfg.ppo_prompt_len} "
            f"N{cfg.ppo_response_length} epochs{cfg.ppo_epochs}")
    rows = []
    for name in ("ours", "trl"):
        rollout, score, update = (statistics.median(s[i] for s in splits[name]) for i in range(3))  # ours also has a 4th: length
        rows.append({"case": case, "impl": name, "s_per_update": med[name], "times_s": [t / N for t in times[name]],
                     "speedup_vs_trl": med["trl"] / med[name], "rollout_s": rollout, "score_s": score,
                     "update_s": update, "phases_speedup_vs_trl": None, "updates_per_run": N,
                     "trl_setup_s": statistics.median(splits["trl_setup"]) if name == "trl" else None})
    phases = {r["impl"]: r["rollout_s"] + r["score_s"] + r["update_s"] for r in rows}
    rows[0]["phases_speedup_vs_trl"] = phases["trl"] / phases["ours"]  # without TRL's per-train() setup
    record(cfg, "grpo_iteration", rows, ["case", "impl", "s_per_update", "speedup_vs_trl", "rollout_s", "score_s",
                                         "update_s", "phases_speedup_vs_trl", "trl_setup_s"], env, load)


# -----------------------------------------------------------------------------
# 4. Memory


def proc_status_bytes(field: str) -> int:
    """A field of /proc/self/status (Linux) in bytes, e.g. VmRSS (resident now) or VmHWM (peak resident)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # kB


def reset_peak_memory(device):
    """Start a new peak: CUDA's allocator counter; on CPU the process's peak resident set (Linux: writing 5 to
    /proc/self/clear_refs resets VmHWM to the current RSS)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_memory(device) -> int:
    """Bytes at the peak since reset_peak_memory: torch.cuda.max_memory_allocated, or on CPU VmHWM (the whole
    process's resident set, libraries included)."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else proc_status_bytes("VmHWM")


def stage_commands(cfg: Config, root: str) -> list:
    """(name, script, args) for each stage on the default task at its default batch sizes and model size,
    cut to a few steps: peak memory is reached in the first steps."""
    sft, rm = os.path.join(root, "sft"), os.path.join(root, "rm")
    small = ["--eval_examples=32"]
    return [
        ("imports only", None, []),
        ("sft", "sft.py", [f"--run_dir={sft}", f"--model_size={cfg.memory_model_size}", "--max_steps=5",
                           "--eval_every=5", "--save_every=5", "--max_train_examples=512", *small]),
        ("reward_model", "reward_model.py", [f"--run_dir={rm}", f"--sft={sft}/final", "--max_steps=3",
                                             "--eval_every=3", "--save_every=3", "--max_train_examples=256",
                                             "--normalize_examples=32", *small]),
        ("ppo", "ppo.py", [f"--run_dir={root}/ppo", f"--sft={sft}/final", f"--reward_model={rm}/final",
                           "--num_updates=2", "--eval_every=2", "--save_every=2", "--eval_prompts=32"]),
        ("dpo", "dpo.py", [f"--run_dir={root}/dpo", f"--sft={sft}/final", "--max_steps=2", "--eval_every=2",
                           "--save_every=2", "--max_train_examples=128", "--eval_prompts=32", *small]),
    ]


def run_stage_child(argv):
    """`bench.py _stage SCRIPT OUT.json ARGS...`: run a stage's main as __main__, then write its peak CUDA memory."""
    import runpy
    script, out, *args = argv
    if script != "-":
        sys.argv = [script, *args]
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    else:  # the baseline: import what the stages import, do nothing
        import importlib
        for module in ("sft", "reward_model", "ppo", "dpo"):
            importlib.import_module(module)
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    with open(out, "w") as f:
        json.dump({"cuda_max_allocated": peak}, f)


def ppo_model_bytes(config, cuda: bool) -> list:
    """Parameters, gradients and AdamW state of each PPO model, from the models themselves: the trainable
    ones take one optimizer step on zero gradients so their state is allocated and can be counted. On
    CUDA the frozen models are bf16 (runtime.load_model); everything else is float32."""
    from model import GPT
    rows = []
    for role, trainable, scalar in (("policy", True, False), ("critic", True, True),
                                    ("reference", False, False), ("reward", False, True)):
        m = GPT(dataclasses.replace(config, scalar_head=scalar))
        if not trainable and cuda:
            m.to(torch.bfloat16)
        params = sum(p.numel() * p.element_size() for p in m.parameters())
        grads = optim = 0
        if trainable:
            opt = torch.optim.AdamW(m.parameters(), lr=0.0)
            for p in m.parameters():
                p.grad = torch.zeros_like(p)
            opt.step()
            grads = params
            optim = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                        if torch.is_tensor(t))
        rows.append({"role": role, "params_MiB": params / 2**20, "grads_MiB": grads / 2**20,
                     "adamw_MiB": optim / 2**20, "total_MiB": (params + grads + optim) / 2**20})
    return rows


def bench_memory(cfg: Config, device, env):
    """Peak RSS of each stage run as a child process (os.wait4 gives that child's ru_maxrss), peak CUDA
    memory on GPU, and the bytes each PPO model holds for the stage's size and for GPT-2 124M."""
    import data
    from model import config_for
    load = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, script, args in stage_commands(cfg, tmp):
            out, log = os.path.join(tmp, f"{name}.json"), os.path.join(tmp, f"{name}.log")
            start = time.perf_counter()
            with open(log, "w") as logf:
                proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "_stage", script or "-", out, *args],
                                        cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT)
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                print(open(log).read()[-3000:])
                raise SystemExit(f"memory: stage {name} failed (exit {proc.returncode}); its log is above")
            cuda_peak = json.load(open(out))["cuda_max_allocated"]
            rows.append({"case": f"stage, {cfg.memory_model_size}", "impl": name, "peak_rss_MiB": usage.ru_maxrss / 1024,
                         "cuda_max_allocated_MiB": cuda_peak / 2**20 if cuda_peak is not None else None,
                         "seconds": time.perf_counter() - start, "args": " ".join(args)})
    cuda = device.type == "cuda"
    vocab = data.get_tokenizer("char").vocab_size
    for label, config in ((f"{cfg.memory_model_size} V{vocab}", config_for(cfg.memory_model_size, vocab_size=vocab)),
                          ("gpt2 V50257", config_for("gpt2"))):
        for row in ppo_model_bytes(config, cuda):
            rows.append({"case": f"PPO model, {label}, {'CUDA' if cuda else 'CPU'}", "impl": row.pop("role"), **row})
    record(cfg, "memory", rows, ["case", "impl", "peak_rss_MiB", "cuda_max_allocated_MiB", "seconds", "params_MiB",
                                 "grads_MiB", "adamw_MiB", "total_MiB"], env, load)


# -----------------------------------------------------------------------------
# 4b. Memory plan: expected bytes per GPU, from the configs (nothing is run)

GiB = 2**30

# Published architectures, as config.json dicts for model.config_from_hf, so the plan needs no download. Values
# from each model's config.json on the HF hub (Qwen/Qwen2.5-0.5B, Qwen/Qwen2.5-1.5B, Qwen/Qwen3-0.6B,
# Qwen/Qwen3-1.7B, HuggingFaceTB/SmolLM2-135M, HuggingFaceTB/SmolLM2-360M, meta-llama/Llama-3.2-1B; the -Instruct
# models share their base's architecture). Only what changes the parameter count or the activations is given.
def _hf(model_type, **k):
    return dict(model_type=model_type, rms_norm_eps=1e-6, tie_word_embeddings=True, **k)


PUBLISHED_CONFIGS = {
    "Qwen2.5-0.5B": _hf("qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                        num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6, max_position_embeddings=32768),
    "Qwen2.5-1.5B": _hf("qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                        num_attention_heads=12, num_key_value_heads=2, rope_theta=1e6, max_position_embeddings=131072),
    "Qwen3-0.6B": _hf("qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=128, rope_theta=1e6,
                      max_position_embeddings=40960),
    "Qwen3-1.7B": _hf("qwen3", vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=128, rope_theta=1e6,
                      max_position_embeddings=40960),
    "SmolLM2-135M": _hf("llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                        num_attention_heads=9, num_key_value_heads=3, rope_theta=1e5, max_position_embeddings=8192),
    "SmolLM2-360M": _hf("llama", vocab_size=49152, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                        num_attention_heads=15, num_key_value_heads=5, rope_theta=1e5, max_position_embeddings=8192),
    "Llama-3.2-1B": _hf("llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=5e5,
                        max_position_embeddings=131072,
                        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}


def plan_config(name: str):
    """A GPTConfig for a model.GPT_SIZES name (vocab 50257) or a PUBLISHED_CONFIGS name."""
    from model import GPT_SIZES, config_for, config_from_hf
    if name in GPT_SIZES:
        return config_for(name)
    if name in PUBLISHED_CONFIGS:
        return config_from_hf(PUBLISHED_CONFIGS[name], name)
    raise SystemExit(f"plan: unknown model {name!r}; choose from {sorted(GPT_SIZES) + sorted(PUBLISHED_CONFIGS)}")


def count_parameters(config, scalar_head: bool = False) -> tuple[int, int]:
    """(elements, tensors) of the real model, built on the meta device (no memory): tied weights count once,
    as model.parameters() yields them."""
    from model import GPT
    with torch.device("meta"):
        params = list(GPT(dataclasses.replace(config, scalar_head=scalar_head)).parameters())
    return sum(p.numel() for p in params), len(params)


def model_state_bytes(numel: int, tensors: int, trainable: bool, weight_dtype, world_size: int = 1) -> dict:
    """Bytes one GPU holds for one model's weights, gradients and AdamW state, FSDP2-sharded over world_size
    ranks (each rank 1/world_size of every tensor; FSDP2's padding of dim 0 to a multiple of the ranks is
    ignored). Gradients have the weights' dtype; torch.optim.AdamW keeps exp_avg and exp_avg_sq in it too, plus
    a float32 `step` scalar per parameter tensor (not sharded). weight_dtype: runtime.precision(...).weights."""
    size = torch.empty((), dtype=weight_dtype).element_size()
    weights = numel * size / world_size
    if not trainable:
        return {"weights": weights, "grads": 0.0, "adamw": 0.0}
    return {"weights": weights, "grads": weights, "adamw": 2 * weights + 4 * tensors}


def block_saved_bytes(config, tokens: int, act_bytes: int = 2, norm_stat_bytes: int = 4) -> int:
    """Bytes one transformer block of model.py saves for backward at `tokens` = B x T positions, activations in
    bf16 (act_bytes 2), SDPA with a flash-style kernel (no mask: it saves q, k, v, the output and a float32
    logsumexp per head, never the T x T scores), dropout off. With padding (left-padded prompts) SDPA gets a
    boolean mask: on CUDA the memory-efficient kernel saves the same plus that (B, 1, T, T) mask, one tensor for
    all layers (B x T^2 bytes); on CPU the math kernel also keeps the T x T attention weights. Per position, with h = n_embd, q = n_head x
    head_dim, I = the MLP width:
      GPT-2: 2 LayerNorms (input + mean/rstd) 2h + 4 stats, c_attn input h, q/k/v 3q, SDPA output q (c_proj reads
        it without a copy), c_fc input h, GELU input I, c_proj input I: (4h + 4q + 2I) x act_bytes;
        with q = h and I = 4h that is 16h x 2 = 32h bytes, Korthikanti et al. 2022 ("Reducing Activation
        Recomputation", eq. 2) 34·s·b·h less their two dropout masks (2·s·b·h), and no 5·a·s²·b attention term.
      Llama family: 2 RMSNorms, each a float32 copy of its input (4h bytes), the float32 rsqrt and the normalized
        bf16 output; c_attn input h; q after RoPE, k and v repeated to n_head heads (GQA: as SDPA sees them) 3q;
        SDPA output q; SwiGLU: c_fc output (gate and up) 2I, silu(gate) I, the product I (c_proj's input);
        Qwen3's QK-norm adds an RMSNorm over q and over k.
    Checked against a saved-tensors hook on our GPT (tests/test_bench.py: test_activation_formula_matches_saved_tensors)."""
    h, q, I = config.n_embd, config.n_head * config.head_dim, config.intermediate_size
    lse = 4 * config.n_head  # SDPA's float32 logsumexp, one per head and position
    if not config.llama:
        per_token = (4 * h + 4 * q + 2 * I) * act_bytes + 2 * 2 * norm_stat_bytes + lse
    else:
        norms = 2 * (4 * h + 4 + h * act_bytes)  # float32 copy, float32 rsqrt, normalized output
        per_token = norms + (2 * h + 4 * q + 4 * I) * act_bytes + lse
        if config.qk_norm:
            kv = config.n_kv_head * config.head_dim
            per_token += (4 + act_bytes) * (q + kv) + 4 * (config.n_head + config.n_kv_head)
    return per_token * tokens


def head_saved_bytes(config, batch: int, seq: int, response: int, lm: bool, act_bytes: int = 2,
                     norm_stat_bytes: int = 4) -> int:
    """Bytes saved for backward outside the blocks: the token ids (and GPT-2's position ids, or the Llama family's
    RoPE cos/sin), the final norm, the heads' input, and for the LM head (lm=True) the float32 logits of the
    response positions that token_logprobs' logsumexp keeps (batch x response x vocab x 4 bytes: the largest
    single tensor at Qwen's 151,936-token vocabulary)."""
    tokens, h = batch * seq, config.n_embd
    if config.llama:
        inputs = 8 + 2 * config.head_dim * act_bytes  # ids; cos and sin (B, 1, T, hs)
        final_norm = 4 * h + 4 + h * act_bytes
    else:
        inputs = 16  # token and position ids
        final_norm = h * act_bytes + 2 * norm_stat_bytes
    # The heads read the final norm's output at the response positions only (GPT.forward's logits_from): a copy of
    # response + 1 positions per row (the slice is not contiguous over rows).
    head_input = batch * (response + 1) * h * act_bytes
    # The targets are a view of the token ids, already counted; logsumexp keeps its input and its float32 output.
    logits = batch * response * (config.vocab_size * 4 + 4) if lm else 0
    return tokens * (inputs + final_norm) + head_input + logits


def activation_bytes(config, batch: int, seq: int, response: int, lm: bool, checkpointing: bool,
                     act_bytes: int = 2, norm_stat_bytes: int = 4) -> int:
    """Bytes saved for backward by one forward of one model on a micro-batch (the peak of the update, reached
    just before backward). With activation checkpointing (model.GPT.gradient_checkpointing: torch.utils.checkpoint
    per block) each block keeps only its input (h x act_bytes per position), and backward recomputes one block
    at a time, whose saved tensors come on top."""
    tokens = batch * seq
    block = block_saved_bytes(config, tokens, act_bytes, norm_stat_bytes)
    blocks = (config.n_layer * config.n_embd * act_bytes * tokens + block) if checkpointing else config.n_layer * block
    return blocks + head_saved_bytes(config, batch, seq, response, lm, act_bytes, norm_stat_bytes)


def kv_cache_bytes(config, batch: int, seq: int, dtype) -> int:
    """model.KVCache: keys and values of n_kv_head heads for every layer, (L, B, nkv, T, hs) each."""
    size = torch.empty((), dtype=dtype).element_size()
    return 2 * config.n_layer * batch * config.n_kv_head * seq * config.head_dim * size


def saved_tensor_bytes(fn, model):
    """(bytes, fn()): the distinct storages autograd saves for backward while fn() runs, the model's parameters
    left out (they are weights, counted apart). torch.autograd.graph.saved_tensors_hooks sees every tensor saved;
    a view counts as its whole storage, once. How tests/test_bench.py checks `activation_bytes`."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


# The models of each method: (role, trainable, scalar head).
PLAN_METHODS = {
    "PPO": [("policy", True, False), ("critic", True, True), ("reference", False, False), ("reward", False, True)],
    "group": [("policy", True, False), ("reference", False, False), ("reward", False, True)],
}


def lora_state_bytes(config, lora_rank: int, scalar_head: bool, world_size: int = 1) -> dict:
    """Bytes one GPU holds for a LoRA model (ppo.py --lora_rank, targets "all"): the frozen base is loaded as a
    trainable model (runtime.load_model, float32 weights on CUDA like any master copy), the adapters are float32;
    gradients and AdamW state exist for the adapters and a score head only (model.train_lora_only)."""
    lora = dataclasses.replace(config, lora_rank=lora_rank, lora_targets="all")
    total, tensors = count_parameters(lora, scalar_head)
    base, base_tensors = count_parameters(config, scalar_head)
    trained = total - base + (config.n_embd + 1 if scalar_head else 0)
    trained_tensors = tensors - base_tensors + (2 if scalar_head else 0)
    return {"weights": 4 * total / world_size, "grads": 4 * trained / world_size,
            "adamw": 8 * trained / world_size + 4 * trained_tensors}


def memory_plan(config, method: str, world_size: int, batch: int, prompt: int, response: int, rollout: int,
                device_type: str = "cuda", bf16: bool = True, lora_rank: int = 0) -> dict:
    """Expected bytes per GPU for one method's models at `world_size` FSDP2 ranks, dtypes from runtime.precision
    (CUDA + bf16: trainable float32 master weights, gradients and AdamW; frozen bf16):
      weights, grads, adamw: every model sharded over the ranks (frozen ones too, as load_model shards them);
      rollout: the KV cache of this rank's rollout sequences, plus on 2+ GPUs the bf16 policy that
        runtime.unsharded gathers whole for generation (one GPU: the float32 weights are used as they are);
      activations (without / with checkpointing): what the update's forward saves for backward on one
        micro-batch: the policy's, plus the critic's for PPO (ppo_update runs both before one backward).
    peak = weights + grads + adamw + the larger of rollout and activations (the two phases do not overlap).
    lora_rank > 0: the trainable models as `lora_state_bytes`, and no reference model: it is the policy with its
    adapters off (model.BaseModel). Activations are counted as without LoRA (the adapters' own saved tensors, the
    r-wide A x per projection, are under 1% at r = 16 and are left out)."""
    from runtime import precision
    distributed = world_size > 1
    out = {"params": 0, "weights": 0.0, "grads": 0.0, "adamw": 0.0}
    for role, trainable, scalar in PLAN_METHODS[method]:
        if lora_rank and role == "reference":
            continue
        numel, tensors = count_parameters(config, scalar)
        prec = precision(device_type, distributed, bf16, trainable)
        if lora_rank and trainable:
            state = lora_state_bytes(config, lora_rank, scalar, world_size)
        else:
            state = model_state_bytes(numel, tensors, trainable, prec.weights, world_size)
        for key, value in state.items():
            out[key] += value
        out["params"] += numel
    policy = precision(device_type, distributed, bf16, True)
    compute = policy.fsdp_param_dtype or (torch.bfloat16 if policy.autocast else policy.weights)
    act = torch.empty((), dtype=compute).element_size()
    local_rollout = -(-rollout // world_size)
    out["rollout"] = kv_cache_bytes(config, local_rollout, prompt + response, policy.fsdp_param_dtype or policy.weights)
    if distributed:
        out["rollout"] += count_parameters(config)[0] * act
    seq = prompt + response
    for ckpt in (False, True):
        key = "activations_ckpt" if ckpt else "activations"
        out[key] = sum(activation_bytes(config, batch, seq, response, lm=not scalar, checkpointing=ckpt, act_bytes=act)
                       for role, trainable, scalar in PLAN_METHODS[method] if trainable)
    states = out["weights"] + out["grads"] + out["adamw"]
    out["peak"] = states + max(out["rollout"], out["activations"])
    out["peak_ckpt"] = states + max(out["rollout"], out["activations_ckpt"])
    return out


def naive_7b_note() -> str:
    """The seed's figure, 4 x 14 GB of bf16 weights for a 7B PPO, against this plan's bytes per parameter."""
    per_param = sum(model_state_bytes(1, 0, t, torch.float32 if t else torch.bfloat16)[k]
                    for _, t, _ in PLAN_METHODS["PPO"] for k in ("weights", "grads", "adamw"))
    return (f"note: the naive 4 x 14 GB = 56 GB of bf16 weights for a 7B PPO counts weights only; with float32 master "
            f"weights, gradients and AdamW for the 2 trainable models the 4 models hold {per_param:.0f} bytes/param, "
            f"{per_param * 7e9 / 1e9:.0f} GB at 7B on one GPU and {per_param * 7e9 / 8e9:.1f} GB per GPU over 8, "
            f"before activations and the rollout")


def bench_plan(cfg: Config, device, env):
    """Prints the memory plan (memory_plan) for each model, method and GPU count, in GiB per GPU."""
    load = os.getloadavg()
    rows = []
    B, P, N = cfg.plan_micro_batch, cfg.plan_prompt_len, cfg.plan_response_len
    for name in [m for m in cfg.plan_models.split(",") if m]:
        config = plan_config(name)
        for method, lora in [(m, r) for r in sorted({0, cfg.plan_lora_rank}) for m in PLAN_METHODS]:
            for gpus in [int(g) for g in cfg.plan_gpus.split(",") if g]:
                plan = memory_plan(config, method, gpus, B, P, N, cfg.plan_rollout, lora_rank=lora)
                row = {"model": f"{name} ({count_parameters(config)[0] / 1e6:.0f}M)",
                       "method": method + (f" LoRA r{lora}" if lora else ""), "GPUs": gpus}
                row.update({k: v / GiB for k, v in plan.items() if k != "params"})
                rows.append(row)
    print(f"plan: GiB per GPU; update micro-batch {B} x ({P} prompt + {N} response) tokens per GPU, rollout of "
          f"{cfg.plan_rollout} sequences over all GPUs; CUDA, --bf16=true (runtime.precision)")
    record(cfg, "plan", rows, ["model", "method", "GPUs", "weights", "grads", "adamw", "rollout", "activations",
                               "activations_ckpt", "peak", "peak_ckpt"], env, load)
    print(naive_7b_note())


# -----------------------------------------------------------------------------
# 5. MFU (CUDA only)


def bench_mfu(cfg: Config, device, env):
    """SFT step of GPT-2 124M (random init, random tokens) at mfu_seq_len in bf16 autocast, eager and
    torch.compile, alternating (measure_mfu). CUDA only: on CPU a line saying it was not measured."""
    load = os.getloadavg()
    if device.type != "cuda":
        print("mfu: no CUDA device: not measured")
        record(cfg, "mfu", [{"case": "gpt2 124M", "impl": "-", "status": "no CUDA device: not measured"}],
               ["case", "impl", "status"], env, load)
        return
    rows = measure_mfu(cfg, device, "gpt2")
    record(cfg, "mfu", rows, ["case", "impl", "median_s", "tokens_per_s", "mfu"], env, load)


def measure_mfu(cfg: Config, device, size: str, compile_backend: str = "inductor") -> list:
    """mfu_steps SFT steps (forward, float32 cross-entropy, backward, fused AdamW) of a random model.GPT_SIZES
    model on random tokens, mfu_batch x mfu_seq_len, eager and torch.compile, alternating; bf16 autocast on CUDA
    (float32 elsewhere, where MFU is None). MFU = flops_per_token (6N + 12 L H Q T) x tokens/s / the device's
    peak bf16 FLOP/s (runtime.PEAK_BF16_FLOPS)."""
    from model import GPT, config_for
    from runtime import Dist, flops_per_token, peak_flops
    T, B = cfg.mfu_seq_len, cfg.mfu_batch
    model = GPT(config_for(size, block_size=max(T, 1024)))
    model.init_weights(seed=cfg.seed)
    model.to(device).train()
    compiled = torch.compile(model, backend=compile_backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, fused=device.type == "cuda")
    g = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(0, model.config.vocab_size, (B, T + 1), generator=g).to(device)
    x, y = ids[:, :-1], ids[:, 1:]
    cast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext

    def steps(m):
        def run():
            for _ in range(cfg.mfu_steps):
                with cast():
                    logits = m(x)
                loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return run

    fns = {"eager": steps(model), f"torch.compile ({compile_backend})": steps(compiled)}
    times = alternate(fns, cfg.repeats, max(cfg.warmup, 1), device)
    c = model.config
    n_params = sum(p.numel() for p in model.parameters())  # as sft.py counts them
    fpt = flops_per_token(n_params, c.n_layer, c.n_head, c.n_embd // c.n_head, T)
    peak = peak_flops(Dist(device=device))
    rows = []
    for name in fns:
        tok_s = B * T * cfg.mfu_steps / statistics.median(times[name])
        rows.append({"case": f"{size} {n_params / 1e6:.0f}M B{B} T{T} {'bf16' if device.type == 'cuda' else 'fp32'}",
                     "impl": name, "median_s": statistics.median(times[name]), "times_s": times[name],
                     "tokens_per_s": tok_s, "mfu": fpt * tok_s / peak if peak else None, "flops_per_token": fpt,
                     "peak_flops": peak,
                     "max_memory_allocated_GiB": torch.cuda.max_memory_allocated(device) / 2**30
                     if device.type == "cuda" else None})
    return rows


# -----------------------------------------------------------------------------
# 6. GPU check: what needs CUDA, in one command and one JSON file

# The sizes of each part. "cuda": meant to take a few minutes on one H100 (an estimate: not yet run on a GPU);
# "dry" (--dry): every code path on CPU at toy sizes, in under a minute.
GPU_CHECK_SIZES = {
    "cuda": dict(check_size="gpt2", check_vocab=50257, check_batch=16, check_prompt=64, check_response=64,
                 mfu_size="gpt2", mfu_batch=8, mfu_seq_len=1024, mfu_steps=10, compile_backend="inductor",
                 ppo_size="gpt2-xl", ppo_batch=16, ppo_micro_batch=4, ppo_prompt=128, ppo_response=128, ppo_epochs=1,
                 gen_size="gpt2", gen_vocab=50257, gen_batch=64, gen_prompt=16, gen_tokens=512, repeats=3),
    "dry": dict(check_size="tiny", check_vocab=64, check_batch=4, check_prompt=8, check_response=8,
                mfu_size="tiny", mfu_batch=2, mfu_seq_len=32, mfu_steps=2, compile_backend="aot_eager",
                ppo_size="tiny", ppo_batch=4, ppo_micro_batch=2, ppo_prompt=8, ppo_response=8, ppo_epochs=1,
                gen_size="tiny", gen_vocab=64, gen_batch=4, gen_prompt=4, gen_tokens=16, repeats=1),
}
RATIO_TOL = 1e-6  # |ratio - 1| on the first update: equal log-probs give exactly 1 in float32
KV_KL_TOL = 1e-3  # mismatch KL per token, KV-cache sampling vs full forward: test_bug06's bf16-vs-fp32 forward bound
FSDP_ATOL = 1e-5  # weights after one float32 SGD step, N GPUs vs 1 (CPU gloo measures 7.5e-9: reduction order)


def first_ratio_check(cfg: Config, device, s: dict) -> dict:
    """The first PPO update's ratios with old log-probs recomputed (--old_logprobs=recompute), in the run's
    precision (CUDA: the policy under bf16 autocast over float32 weights, frozen models bf16; runtime.precision),
    one epoch of one minibatch, so no optimizer step comes between the recompute and the update's forwards.
    micro-batch = the rollout (same shapes, rows shuffled): every ratio must be 1 (RATIO_TOL). micro-batch = half:
    the update's forwards see other batch shapes than make_experience's, and the gap is bf16 batch variance
    (reported, not judged; tests/test_bug04_batch_invariance.py is the CPU side). Also reports the sampler
    (KV cache) vs recompute gap, ppo's val/logprob_recompute_maxdiff."""
    from model import config_for
    config = config_for(s["check_size"], vocab_size=s["check_vocab"], block_size=s["check_prompt"] + s["check_response"])
    B, P, N = s["check_batch"], s["check_prompt"], s["check_response"]
    query = torch.randint(0, config.vocab_size - 2, (B, P), generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    out = {"model": s["check_size"], "batch": B, "prompt": P, "response": N, "tolerance": RATIO_TOL}
    for name, micro in (("micro_batch_equal_rollout", B), ("micro_batch_half", B // 2)):
        m = random_ours(cfg, config, device, old_logprobs="recompute", num_ppo_epochs=1, rollout_batch_size=B,
                        micro_batch_size=micro, response_length=N)
        exp, stats = our_ppo_iteration(m, query, torch.ones_like(query), 0, 1, config.vocab_size - 2, [])
        mask = exp["action_mask"]
        out[name] = {"max_abs_ratio_minus_1": float((stats["ratios"] - 1).abs().max()),
                     "sampler_vs_recompute_max_abs": float(((exp["recomputed_logp"] - exp["logp"]) * mask).abs().max())
                     if exp["recomputed_logp"] is not None else None}
    out["passed"] = out["micro_batch_equal_rollout"]["max_abs_ratio_minus_1"] <= RATIO_TOL
    return out


def kv_cache_check(cfg: Config, device, s: dict) -> dict:
    """model.generate with the KV cache vs one full forward over the same sequences, on left-padded prompts: the
    per-token log-probs (float32 log-softmax both times), with the weights in float32 and in bf16 (as FSDP2's
    bf16 policy gathers them for the rollout). Passes when the bf16 mismatch KL (ppo.mismatch_kl, k3 per token)
    is below KV_KL_TOL."""
    import ppo
    from model import GPT, config_for, generate, token_logprobs
    B, P, N = s["check_batch"], s["check_prompt"], s["check_response"]
    config = config_for(s["check_size"], vocab_size=s["check_vocab"], block_size=P + N)
    g = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(0, config.vocab_size, (B, P), generator=g)
    mask = torch.ones_like(ids)
    mask[: B // 2, : P // 2] = 0  # half the rows left-padded to half length: positions from the mask
    ids, mask = ids.to(device), mask.to(device)
    model = GPT(config)
    model.init_weights(seed=cfg.seed)
    out = {"model": s["check_size"], "batch": B, "prompt": P, "new_tokens": N, "tolerance_mismatch_kl": KV_KL_TOL}
    for dtype in (torch.float32, torch.bfloat16):
        model.to(device, dtype).eval()
        with torch.no_grad():
            seqs, sample_logp = generate(model, ids, mask, N, temperature=1.0, eos_id=None, pad_id=0,
                                         generator=torch.Generator(device=device).manual_seed(cfg.seed))
            full_mask = torch.cat([mask, torch.ones_like(seqs[:, P:])], 1)
            full = token_logprobs(model(seqs, attention_mask=full_mask, logits_from=P - 1)[:, :-1], seqs[:, P:])
        every = torch.ones_like(full, dtype=torch.bool)
        out[str(dtype).removeprefix("torch.")] = {"max_abs_logp_diff": float((full - sample_logp).abs().max()),
                                                  "mismatch_kl": float(ppo.mismatch_kl(sample_logp, full, every))}
    out["passed"] = out["bfloat16"]["mismatch_kl"] < KV_KL_TOL
    return out


def fsdp_check(cfg: Config, device, s: dict) -> dict:
    """tests/dist_helpers.py's sgd_step (a tiny GPT, one float32 SGD step on a fixed batch split over the ranks)
    under torchrun on every visible GPU (NCCL; --dry: 2 CPU processes, gloo) vs the same step in this process:
    the weights must agree to FSDP_ATOL. Needs 2+ GPUs."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import dist_helpers
    from runtime import Dist
    n = torch.cuda.device_count() if device.type == "cuda" else 2
    out = {"processes": n, "backend": "nccl" if device.type == "cuda" else "gloo", "tolerance": FSDP_ATOL}
    if n < 2:
        return {**out, "passed": None, "status": f"{n} GPU visible: FSDP2 across GPUs needs 2 or more; not run"}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               "tests/dist_helpers.py", "sgd_step", tmp]
        env = {**os.environ, "DIST_HELPERS_DEVICE": device.type, "OMP_NUM_THREADS": "1"}
        env.pop("WORLD_SIZE", None)
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            return {**out, "passed": False, "status": f"torchrun exited {proc.returncode}: {proc.stderr[-2000:]}"}
        got = torch.load(os.path.join(tmp, "sgd_step.rank0.pt"), map_location="cpu", weights_only=True)
    ref = dist_helpers.sgd_step(Dist(device=device))
    diff = max(float((got["weights"][k] - w.cpu()).abs().max()) for k, w in ref["weights"].items())
    out.update(world_size=got["world_size"], max_abs_weight_diff=diff,
               loss_diff=abs(float(got["loss"]) - float(ref["loss"])))
    out["passed"] = got["world_size"] == n and diff <= FSDP_ATOL
    return out


def ppo_iteration_check(cfg: Config, device, s: dict) -> dict:
    """One PPO iteration of 4 random models at ppo_size (our_ppo_iteration: ppo.rollout, make_experience,
    ppo_update, TRL's preset, bf16 on CUDA as runtime.precision gives it), twice; the second is reported (the
    first pays for CUDA's lazy init): seconds and peak memory per phase (peak_memory: CUDA allocated; CPU the
    process's peak resident set), next to the plan's estimate for the same sizes (memory_plan, one GPU)."""
    from model import config_for
    B, P, N = s["ppo_batch"], s["ppo_prompt"], s["ppo_response"]
    config = config_for(s["ppo_size"], block_size=P + N)
    m = random_ours(cfg, config, device, rollout_batch_size=B, micro_batch_size=s["ppo_micro_batch"],
                    num_ppo_epochs=s["ppo_epochs"], response_length=N)
    query = torch.randint(0, config.vocab_size - 2, (B, P), generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    splits, peaks = [], []
    for update in range(2):
        our_ppo_iteration(m, query, torch.ones_like(query), update, 2 * s["ppo_epochs"], config.vocab_size - 2,
                          splits, peaks)
    phases = ("rollout", "score", "update")
    plan = memory_plan(config, "PPO", 1, s["ppo_micro_batch"], P, N, B, device_type=device.type)
    return {"model": s["ppo_size"], "params": count_parameters(config)[0], "batch": B,
            "micro_batch": s["ppo_micro_batch"], "prompt": P, "response": N, "epochs": s["ppo_epochs"],
            "mean_response_len": splits[-1][3], "seconds": dict(zip(phases, splits[-1][:3])),
            "seconds_first_iteration": dict(zip(phases, splits[0][:3])),
            "peak_GiB": {k: v / GiB for k, v in zip(phases, peaks[-1])},
            "plan_GiB": {k: plan[k] / GiB for k in ("weights", "grads", "adamw", "rollout", "activations", "peak")},
            "peak_memory": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process VmHWM (CPU)"}


def bench_gpu(cfg: Config, device, env):
    """The GPU check (see GPU_CHECK_SIZES): (a) first PPO ratio == 1 with recomputed log-probs in bf16, KV cache
    vs full forward in bf16, FSDP2 over all visible GPUs vs one; (b) SFT MFU of GPT-2 124M at 1024 tokens, eager
    and torch.compile; (c) one PPO iteration of gpt2-xl with 4 models, seconds and peak memory per phase; (d)
    rollout new tokens/s at batch 64, 512 new tokens, ours vs HF generate, then again with ours' decode step compiled
    (generate(compile_step=True): CUDA graphs). Each part runs even if one before it
    failed (its error is written instead). Writes one JSON to --gpu_out; exits 1 if a check failed or a part
    raised. --dry: all of it at toy sizes (on CPU: everything but CUDA itself)."""
    import traceback
    if device.type != "cuda" and not cfg.dry:
        raise SystemExit("gpu: no CUDA device; `python bench.py gpu --dry` runs every part on CPU at toy sizes")
    s = GPU_CHECK_SIZES["dry" if cfg.dry else "cuda"]
    result = {"env": env, "dry": cfg.dry, "sizes": s}
    start = time.perf_counter()

    def part(name, fn):
        t0 = time.perf_counter()
        try:
            result[name] = fn()
        except Exception:  # keep going: one GPU session should bring back every part it can
            result[name] = {"error": traceback.format_exc()[-3000:]}
        print(f"gpu: {name} done in {time.perf_counter() - t0:.1f} s: {json.dumps(result[name], default=str)[:600]}")

    part("first_ratio", lambda: first_ratio_check(cfg, device, s))
    part("kv_cache", lambda: kv_cache_check(cfg, device, s))
    part("fsdp", lambda: fsdp_check(cfg, device, s))
    mfu_cfg = dataclasses.replace(cfg, mfu_batch=s["mfu_batch"], mfu_seq_len=s["mfu_seq_len"],
                                  mfu_steps=s["mfu_steps"], repeats=s["repeats"])
    part("mfu", lambda: measure_mfu(mfu_cfg, device, s["mfu_size"], s["compile_backend"]))
    part("ppo_iteration", lambda: ppo_iteration_check(cfg, device, s))
    gen_cfg = dataclasses.replace(cfg, size=s["gen_size"], vocab_size=s["gen_vocab"], gen_batch=s["gen_batch"],
                                  gen_prompt_len=s["gen_prompt"], gen_lengths=str(s["gen_tokens"]), nocache_lengths="",
                                  block_size=max(1024, s["gen_prompt"] + s["gen_tokens"]), repeats=s["repeats"],
                                  greedy=False, profile=False)
    part("rollout", lambda: bench_generate(gen_cfg, device, env))
    # Last, so a slow compile cannot cost the parts above: the same rollout with the decode step compiled (CUDA graphs).
    part("rollout_compiled", lambda: bench_generate_compiled(gen_cfg, device, env))
    checks = {k: result[k].get("passed") for k in ("first_ratio", "kv_cache", "fsdp") if isinstance(result[k], dict)}
    errors = [k for k, v in result.items() if isinstance(v, dict) and "error" in v]
    result.update(checks=checks, errors=errors, seconds=time.perf_counter() - start)
    with open(cfg.gpu_out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"gpu: wrote {cfg.gpu_out} in {result['seconds']:.0f} s; checks {checks}; parts that raised: {errors or 'none'}")
    if errors or any(v is False for v in checks.values()):
        raise SystemExit(1)


# -----------------------------------------------------------------------------


COMMANDS = {"train_step": bench_train_step, "sft": bench_sft, "generate": bench_generate,
            "generate_compiled": bench_generate_compiled, "ppo_iteration": bench_ppo_iteration,
            "grpo_iteration": bench_grpo_iteration, "memory": bench_memory, "mfu": bench_mfu, "plan": bench_plan,
            "gpu": bench_gpu}


def main(argv=None):
    from runtime import parse_config
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "_stage":
        return run_stage_child(argv[1:])
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: python bench.py {{{','.join(COMMANDS)}}} [--key=value ...] (--help for the flags)")
    command, cfg = argv[0], parse_config(Config, argv[1:])
    threads = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    elif os.getloadavg()[0] > (os.cpu_count() or 1):
        print(f"bench: load average {os.getloadavg()[0]:.1f} > {os.cpu_count()} cores: other processes compete for "
              f"the cores, and {threads} torch threads may wait on each other; --threads=1 is steadier")
    use_cuda = torch.cuda.is_available() if cfg.device == "auto" else cfg.device == "cuda"
    device = torch.device("cuda") if use_cuda else torch.device("cpu")
    try:
        COMMANDS[command](cfg, device, environment(device))
    finally:
        torch.set_num_threads(threads)  # main() may be called in-process (tests)


if __name__ == "__main__":
    main()
