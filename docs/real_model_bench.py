"""float32 against bf16 on a CPU, side by side in one process, on SmolLM2-135M-Instruct (docs/real-model.md):

    HF_HUB_OFFLINE=1 RLHF_CPU_BF16=1 python docs/real_model_bench.py [--parts=rollout,sft,updates] [--rollout=16,64] [--out=FILE.json]

1. SFT step: forward + loss + backward + AdamW on 4 HH examples (prompt <= 64 + response <= 32 tokens); bf16 is
   autocast over float32 weights (what sft.py does with --bf16 and RLHF_CPU_BF16=1). Tokens/s counts real tokens.
2. Rollout, batch 16 (prompts <= 64 tokens), 64 new tokens sampled (no EOS stop, so every row makes 64): ours (model.generate, KV cache)
   in float32, under bf16 autocast (what ppo.py's rollout does), and with bf16 weights; HF `generate` on the same
   weights in float32 and bf16 weights. Tokens/s = 16 * 64 / seconds.
3. One PPO (--preset=trl, 4 prompts) and one GRPO update (1 prompt x 4 samples; rollout + scoring + update), 32 new tokens, with --bf16=false and --bf16=true, old
   log-probs recomputed: the first ratio, and the sampler/trainer mismatch KL (ppo.mismatch_kl, the sampling
   log-probs against the update's forward) of each.
Timings are wall clock on whatever else the machine runs: report them with `uptime`.
"""

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("RLHF_CPU_BF16", "1")

import torch  # noqa: E402

import data  # noqa: E402
import model as M  # noqa: E402
import ppo  # noqa: E402
import sft  # noqa: E402
from runtime import Dist, adamw, apply_preset  # noqa: E402

HH = os.environ.get("HH", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "hh-rlhf",
                                       "harmless-base", "test.jsonl.gz"))


def bf16_ctx(on):
    return torch.autocast("cpu", dtype=torch.bfloat16) if on else torch.autocast("cpu", enabled=False)


def sft_step_tokens_per_s(hf_dir, tok, records, bf16, steps=2):
    policy = M.GPT.from_pretrained(hf_dir).train()
    opt = adamw([{"params": list(policy.parameters()), "lr": 1e-5}])
    stats = data.TruncationStats()
    pairs = [data.encode_pair(tok, r["prompt"], r["response"], 64, 32, stats) for r in records[:4]]
    batch = data.collate_sft(pairs, tok.pad_id)
    first = sft.loss_start(batch["loss_mask"])
    times = []
    for _ in range(steps + 1):  # the first is a warm-up
        t = time.perf_counter()
        with bf16_ctx(bf16):
            logits = policy(batch["input_ids"], attention_mask=batch["attention_mask"], logits_from=first)
        s, c = sft.sft_loss(logits, batch["input_ids"], batch["loss_mask"], first)
        (s / c).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return int(batch["attention_mask"].sum()) / (sum(times[1:]) / steps)


@torch.no_grad()
def rollout_tokens_per_s(hf_dir, ids, mask, new=64):
    from transformers import AutoModelForCausalLM
    out = {}
    ours = M.GPT.from_pretrained(hf_dir).eval()
    for name, model, autocast in (("ours fp32", ours, False), ("ours bf16 autocast", ours, True),
                                  ("ours bf16 weights", None, False)):
        if model is None:
            model = ours.to(torch.bfloat16)
        M.generate(model, ids[:2], mask[:2], 2, temperature=1.0)  # warm-up
        t = time.perf_counter()
        with bf16_ctx(autocast):
            seq, _ = M.generate(model, ids, mask, new, temperature=1.0, eos_id=None,
                                generator=torch.Generator().manual_seed(0))
        assert seq.shape[1] == ids.shape[1] + new
        out[name] = ids.shape[0] * new / (time.perf_counter() - t)
        print(f"rollout {name}: {out[name]:.1f} tokens/s", flush=True)
    del ours, model
    for name, dtype in (("HF generate fp32", torch.float32), ("HF generate bf16 weights", torch.bfloat16)):
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval()
        kw = dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, pad_token_id=2)
        hf.generate(ids[:2], attention_mask=mask[:2], max_new_tokens=2, **kw)  # warm-up
        t = time.perf_counter()
        seq = hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, **kw)
        assert seq.shape[1] == ids.shape[1] + new
        out[name] = ids.shape[0] * new / (time.perf_counter() - t)
        print(f"rollout {name}: {out[name]:.1f} tokens/s", flush=True)
        del hf
    return out


def one_update(hf_dir, rm_dir, tok, ids, mask, bf16, group):
    """One rollout + make_experience + ppo_update, as ppo.main runs them, with old log-probs recomputed."""
    flags = [f"--sft={hf_dir}", f"--reward_model={rm_dir}", "--response_length=32", "--micro_batch_size=4",
             "--num_ppo_epochs=1", "--old_logprobs=recompute", "--lr=1e-5", f"--bf16={str(bf16).lower()}"]
    if group:  # as launch.sh smollm2 runs GRPO, on 1 prompt x 4 samples
        flags += ["--advantage_estimator=grpo", "--kl_location=loss", "--kl_estimator=k3", "--kl_is_weight",
                  "--loss_aggregation=global_token_mean", "--samples_per_prompt=4", "--rollout_batch_size=1",
                  "--advantage_whitening=none", "--kl_coef=0.05"]
        preset = {}
    else:
        flags += ["--rollout_batch_size=4"]
        preset = apply_preset(["--preset=trl"], ppo.PRESETS)
    cfg = ppo.parse_config(ppo.Config, flags, **preset)
    d = Dist()
    policy, ref, rm, critic = ppo.build_models(cfg, d)
    trainable = torch.nn.ModuleDict({"policy": policy} | ({"critic": critic} if critic is not None else {}))
    optimizer = ppo.make_optimizer(policy, critic, cfg)
    n = cfg.rollout_batch_size
    q, qm = ids[:n].repeat_interleave(cfg.samples_per_prompt, 0), mask[:n].repeat_interleave(cfg.samples_per_prompt, 0)
    t = time.perf_counter()
    qr, logp = ppo.rollout(policy, q, qm, 0, tok, cfg, d)
    t_roll = time.perf_counter() - t
    exp = ppo.make_experience(policy, critic, ref, rm, qr, qm, logp, cfg.kl_coef, tok, cfg, d)
    stats = ppo.ppo_update(policy, critic, trainable, optimizer, [g["lr"] for g in optimizer.param_groups], exp, 0, 1, cfg, d)
    total = time.perf_counter() - t
    return {"seconds": total, "rollout_seconds": t_roll, "first_ratio": stats["first_ratio"].item(),
            "mismatch_kl": exp["mismatch_kl"].item(), "sequences": qr.shape[0]}


def main():
    out_path = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--out=")), "")
    parts = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--parts=")), "rollout,sft,updates").split(",")
    torch.manual_seed(0)
    hf_dir = M.gguf_to_hf_dir(M.fetch_smollm2())
    tok = data.get_tokenizer(hf_dir)
    records = data.apply_chat_template(data.load_records(HH, "sft", "test", max_records=16, seed=0), tok)
    ids, mask = data.pad_left([tok.encode(r["prompt"])[-64:] for r in records], tok.pad_id)
    flags = open("/proc/cpuinfo").read()
    result = {"native_bf16": "avx512_bf16" in flags or "amx_bf16" in flags, "torch_threads": torch.get_num_threads(),
              "load_before": os.getloadavg()}
    for bf16 in (False, True) if "sft" in parts else ():
        result[f"sft tokens/s {'bf16' if bf16 else 'fp32'}"] = sft_step_tokens_per_s(hf_dir, tok, records, bf16)
        print(result, flush=True)
    if "rollout" in parts:  # --rollout=B,N: a smaller rollout where the machine is too slow for B16 x 64
        B, N = map(int, next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--rollout=")), "16,64").split(","))
        result[f"rollout tokens/s (B{B}, {N} new)"] = rollout_tokens_per_s(hf_dir, ids[:B], mask[:B], N)
        print(result, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if "updates" not in parts:
            parts = []
        if parts:
            M.GPT.from_pretrained(hf_dir, scalar_head=True).save_pretrained(os.path.join(tmp, "rm"))
        for group in (False, True) if parts else ():
            for bf16 in (False, True):
                key = f"{'grpo' if group else 'ppo'} update {'bf16' if bf16 else 'fp32'}"
                result[key] = one_update(hf_dir, os.path.join(tmp, "rm"), tok, ids, mask, bf16, group)
                print(key, result[key], flush=True)
    result["load_after"] = os.getloadavg()
    print(json.dumps(result, indent=2))
    if out_path:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
