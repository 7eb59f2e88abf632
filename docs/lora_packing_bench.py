"""SFT tokens/s, padded vs packed, on the HH harmless-base file, side by side in one process (docs/lora-and-packing.md).

    python docs/lora_packing_bench.py --model=gpt2 --steps=3
    python docs/lora_packing_bench.py --model=/path/to/SmolLM2-135M-Instruct --steps=3

The same micro-batches of 8 examples (prompt <= 384, response <= 128 tokens, as sft.py --profile=real) go through
sft.py's forward + loss + backward, padded (data.collate_sft, logits_from=loss_start) and packed (data.pack_sft),
alternating so both see the same machine load. tokens/s counts real (non-pad) tokens. --model=gpt2 is a randomly
initialized GPT-2 124M (speed does not depend on the weights); a directory is loaded with GPT.from_pretrained.
"""
import argparse
import time

import torch

import data
from model import GPT, config_for
from sft import loss_start, sft_loss

p = argparse.ArgumentParser()
p.add_argument("--model", default="gpt2")
p.add_argument("--data", default="/work/shared/data/hh-rlhf/harmless-base/test.jsonl.gz")
p.add_argument("--steps", type=int, default=3)
p.add_argument("--micro", type=int, default=8)
p.add_argument("--lora_rank", type=int, default=0)
args = p.parse_args()
torch.manual_seed(0)
lora = dict(lora_rank=args.lora_rank) if args.lora_rank else {}
if args.model == "gpt2":
    model = GPT(config_for("gpt2", block_size=1024, **lora))
    model.init_weights(seed=0)
    tok = data.get_tokenizer("gpt2")
else:
    model = GPT.from_pretrained(args.model, **lora)
    tok = data.get_tokenizer(model.config.tokenizer)
if args.lora_rank:
    from model import train_lora_only
    train_lora_only(model)
records = data.load_records(args.data, "sft", "all", max_records=args.micro * args.steps, seed=0)
records = data.apply_chat_template(records, tok, "auto")
stats = data.TruncationStats()
pairs = [data.encode_pair(tok, r["prompt"], r["response"], 384, 128, stats) for r in records]
batches = [pairs[i:i + args.micro] for i in range(0, len(pairs), args.micro)]


def step(batch, packed):
    b = (data.pack_sft if packed else data.collate_sft)(batch, tok.eos_id)
    first = 0 if packed else loss_start(b["loss_mask"])
    t = time.perf_counter()
    logits = model(b["input_ids"], attention_mask=b["attention_mask"], logits_from=first,
                   position_ids=b.get("position_ids"), document_ids=b.get("document_ids"))
    s, c = sft_loss(logits, b["input_ids"], b["loss_mask"], first)
    (s / c).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t, int(b["attention_mask"].sum()), tuple(b["input_ids"].shape), (s / c).item()


step(batches[0], False)  # warm-up
totals = {False: [0.0, 0], True: [0.0, 0]}
for batch in batches:
    for packed in (False, True):
        dt, n, shape, loss = step(batch, packed)
        totals[packed][0] += dt
        totals[packed][1] += n
        print(f"{'packed' if packed else 'padded'} rows x len {shape}: {n} tokens, {dt:.2f}s, loss {loss:.6f}")
for packed in (False, True):
    sec, n = totals[packed]
    print(f"{'packed' if packed else 'padded'}: {n / sec:.0f} tokens/s ({n} tokens, {sec:.1f}s)")
print(f"speedup packed / padded: {(totals[True][1] / totals[True][0]) / (totals[False][1] / totals[False][0]):.2f}x")
