"""data.py's HF tokenizer backend and chat templates, on a small byte-level BPE trained at test time on the
Anthropic HH text in ../shared/data (read in place, never copied), saved as tokenizer.json + a
tokenizer_config.json that holds a Qwen-style chat template (<|im_start|>role ... <|im_end|>), EOS <|im_end|>
and a different pad <|endoftext|>, as Qwen2.5-Instruct's tokenizer has.

What is checked: EOS and pad come from the tokenizer; prompts render to a hand-written string that ends with the
generation prompt; the loss mask covers exactly the assistant's answer + EOS and the reward model reads the EOS;
TRL conversational records load like HH text; and a tiny Qwen2 with this tokenizer loads, generates, carries
its tokenizer into the checkpoint it saves, and trains one SFT step through sft.main.
"""

import gzip
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import data

transformers = pytest.importorskip("transformers", reason="transformers (requirements-dev.txt) is needed for HF tokenizers")
tokenizers = pytest.importorskip("tokenizers", reason="tokenizers is needed to build the test tokenizer")

HH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "hh-rlhf",
                  "harmless-base", "test.jsonl.gz")
SYSTEM = "You are a helpful assistant."
TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\n" + SYSTEM + "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_tokenizer(directory, trained, **config):
    os.makedirs(directory, exist_ok=True)
    trained.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", **config}, f)
    return str(directory)


@pytest.fixture(scope="module")
def trained_bpe():
    if not os.path.exists(HH):
        pytest.skip(f"{HH} is absent (the shared HH-RLHF test split); it is read in place, never copied")
    with gzip.open(HH, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["chosen"] for line in f]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIALS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


@pytest.fixture(scope="module")
def tok_dir(trained_bpe, tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tok"), trained_bpe, eos_token="<|im_end|>",
                           pad_token="<|endoftext|>", chat_template=TEMPLATE)


def test_eos_and_pad_come_from_the_tokenizer(trained_bpe, tok_dir, tmp_path):
    tok = data.get_tokenizer(tok_dir)
    assert isinstance(tok, data.HFTokenizer) and tok.name == tok_dir
    assert tok.eos_id == trained_bpe.token_to_id("<|im_end|>") and tok.pad_id == trained_bpe.token_to_id("<|endoftext|>")
    assert tok.eos_id != tok.pad_id and tok.vocab_size == 512
    text = "\n\nHuman: What's up?  \n\nAssistant: Not much."
    assert tok.decode(tok.encode(text)) == text
    # A base tokenizer: another EOS, no pad token -> pad with EOS. Nothing is hard-coded.
    base = data.get_tokenizer(write_tokenizer(tmp_path / "base", trained_bpe, eos_token="<|endoftext|>"))
    assert base.eos_id == base.pad_id == trained_bpe.token_to_id("<|endoftext|>") and base.chat_template is None
    with pytest.raises(ValueError, match="cannot load tokenizer"):
        data.get_tokenizer(str(tmp_path / "nowhere"))


def test_hh_text_and_messages_round_trip():
    text = "\n\nHuman: Hi there\n\nAssistant: Hello.\n\nHuman: How are you?\n\nAssistant:"
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "How are you?"}]
    assert data.text_to_messages(text) == messages
    assert data.messages_to_text(messages) + "\n\nAssistant:" == text
    with pytest.raises(data.DataError, match="chat_template=none"):
        data.text_to_messages("Instruction: reverse abc\n\nResponse:")


def test_prompt_rendering_and_masks_cover_exactly_the_response(tok_dir):
    """The hand-written rendering of a two-turn HH prompt, and the token spans of SFT's loss mask and the
    reward model's score index, computed by hand from it."""
    tok = data.get_tokenizer(tok_dir)
    records = [{"prompt": "\n\nHuman: Hi there\n\nAssistant: Hello.\n\nHuman: How are you?\n\nAssistant:",
                "response": " I am fine, thanks."}]
    (rec,) = data.apply_chat_template(records, tok, "auto")
    expected_prompt = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                       "<|im_start|>user\nHi there<|im_end|>\n"
                       "<|im_start|>assistant\nHello.<|im_end|>\n"
                       "<|im_start|>user\nHow are you?<|im_end|>\n"
                       "<|im_start|>assistant\n")  # ends with the generation prompt
    assert rec == {"prompt": expected_prompt, "response": "I am fine, thanks."}

    stats = data.TruncationStats()
    prompt_ids, response_ids = data.encode_pair(tok, rec["prompt"], rec["response"], 512, 512, stats)
    batch = data.collate_sft([(prompt_ids, response_ids)], tok.pad_id)
    ids, mask = batch["input_ids"][0].tolist(), batch["loss_mask"][0].tolist()
    # Expected spans by hand: [0, P) the prompt, [P, P + R) the answer's tokens, P + R the EOS, nothing after.
    P, R = len(tok.encode(expected_prompt)), len(tok.encode("I am fine, thanks."))
    assert mask == [0] * P + [1] * (R + 1)
    assert ids[P + R] == tok.eos_id == tok.hf.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "I am fine, thanks.<|im_end|>"
    assert tok.decode(ids[:P]) == expected_prompt
    assert ids[:P].count(tok.eos_id) == 4  # earlier turns' ends are in the prompt, never trained on
    # What the model sees at inference, tokenized in one piece by HF, is the same ids: the prompt/response
    # boundary does not change the tokenization.
    convo = data.text_to_messages(records[0]["prompt"]) + [{"role": "assistant", "content": "I am fine, thanks."}]
    whole = tok.hf.apply_chat_template(convo, tokenize=False)
    assert tok.encode(whole)[:P + R + 1] == ids
    # The reward model scores the last real token: the EOS that ends the answer.
    import evaluate
    pair = data.collate_pairs([(prompt_ids, response_ids, tok.encode("No.") + [tok.eos_id])], tok.pad_id)
    last = evaluate.last_token_index(pair["attention_mask"])
    assert pair["input_ids"][torch.arange(2), last].tolist() == [tok.eos_id, tok.eos_id]
    assert last.tolist() == [P + R, P + len(tok.encode("No."))]


def test_trl_conversational_records_load_like_hh(tok_dir, tmp_path):
    """TRL's conversational formats and the equivalent HH text give the same rendered records."""
    user, answer, worse = "Name a color.", "Blue.", "No."
    u, a, w = ({"role": "user", "content": user}, {"role": "assistant", "content": answer},
               {"role": "assistant", "content": worse})
    files = {
        "sft_messages": ("sft", {"messages": [u, a]}),
        "sft_prompt_completion": ("sft", {"prompt": [u], "completion": [a]}),
        "sft_hh": ("sft", {"prompt": f"\n\nHuman: {user}\n\nAssistant:", "response": f" {answer}"}),
        "pref_explicit": ("preference", {"prompt": [u], "chosen": [a], "rejected": [w]}),
        "pref_implicit": ("preference", {"chosen": [u, a], "rejected": [u, w]}),
        "pref_hh": ("preference", {"chosen": f"\n\nHuman: {user}\n\nAssistant: {answer}",
                                   "rejected": f"\n\nHuman: {user}\n\nAssistant: {worse}"}),
    }
    tok = data.get_tokenizer(tok_dir)
    rendered = {}
    for name, (kind, rec) in files.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(rec) + "\n")
        rendered[name] = data.apply_chat_template(data.load_records(str(path), kind), tok, "auto")
    prompt = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    for name in ("sft_messages", "sft_prompt_completion", "sft_hh"):
        assert rendered[name] == [{"prompt": prompt, "response": answer}], name
    for name in ("pref_explicit", "pref_implicit", "pref_hh"):
        assert rendered[name] == [{"prompt": prompt, "chosen": answer, "rejected": worse}], name


def test_hh_file_rendered_end_to_end(tok_dir):
    """The real HH file: every chosen/rejected response is masked as exactly its text + EOS, and the
    prompt ends with the generation prompt."""
    tok = data.get_tokenizer(tok_dir)
    records = data.apply_chat_template(data.load_records(HH, "preference", max_records=40, seed=0), tok, "auto")
    stats = data.TruncationStats()
    for rec in records:
        assert rec["prompt"].endswith("<|im_end|>\n<|im_start|>assistant\n")
        p, c, r = data.encode_preference(tok, rec["prompt"], rec["chosen"], rec["rejected"], 4096, 4096, stats)
        batch = data.collate_pairs([(p, c, r)], tok.pad_id)
        for row, text in enumerate((rec["chosen"], rec["rejected"])):
            masked = [i for i, m in zip(batch["input_ids"][row].tolist(), batch["loss_mask"][row].tolist()) if m]
            assert tok.decode(masked) == text + "<|im_end|>"
    assert stats.prompts_truncated == stats.responses_truncated == 0


def test_template_choices_and_eos_check(tok_dir, trained_bpe, tmp_path):
    tok = data.get_tokenizer(tok_dir)
    records = [{"prompt": "\n\nHuman: Hi\n\nAssistant:", "response": " Hello."}]
    assert data.apply_chat_template(records, tok, "none") == records
    path = tmp_path / "plain.jinja"  # a template file given by path overrides the tokenizer's own
    path.write_text("{%- for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|im_end|>' }}{%- endfor %}"
                    "{%- if add_generation_prompt %}{{ 'assistant: ' }}{%- endif %}")
    assert data.apply_chat_template(records, tok, str(path))[0]["prompt"] == "user: Hi<|im_end|>assistant: "
    with pytest.raises(data.DataError, match="no such file"):
        data.apply_chat_template(records, tok, str(tmp_path / "missing.jinja"))
    base = data.get_tokenizer(write_tokenizer(tmp_path / "base", trained_bpe, eos_token="<|endoftext|>"))
    assert data.apply_chat_template(records, base, "auto") == records  # no template of its own: plain text
    # The template ends turns with <|im_end|>, the tokenizer's EOS is <|endoftext|>: generation would never stop.
    with pytest.raises(data.DataError, match="not the tokenizer's EOS"):
        data.apply_chat_template(records, base, str(tmp_path / "plain.jinja"))


@pytest.fixture(scope="module")
def qwen_dir(tok_dir, tmp_path_factory):
    """A tiny random Qwen2ForCausalLM over the test tokenizer, its tokenizer files next to it (as on the hub)."""
    import shutil
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   tie_word_embeddings=True, eos_token_id=2, pad_token_id=0)
    out = tmp_path_factory.mktemp("qwen")
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok_dir, name), out / name)
    return str(out)


def test_tokenizer_travels_with_the_checkpoint(qwen_dir, tmp_path):
    from model import GPT, generate
    policy = GPT.from_pretrained(qwen_dir).eval()
    assert policy.config.tokenizer == qwen_dir  # an HF model directory with its own tokenizer
    tok = data.get_tokenizer(policy.config.tokenizer)
    prompts = [r["prompt"] for r in data.apply_chat_template(
        [{"prompt": "\n\nHuman: Hi\n\nAssistant:"}, {"prompt": "\n\nHuman: Tell me a joke\n\nAssistant:"}], tok, "auto")]
    ids, mask = data.pad_left([tok.encode(p) for p in prompts], tok.pad_id)
    seqs, _ = generate(policy, ids, mask, 6, temperature=1.0, eos_id=tok.eos_id, pad_id=tok.pad_id,
                       generator=torch.Generator().manual_seed(0))
    assert seqs.shape[0] == 2 and seqs.shape[1] <= ids.shape[1] + 6
    policy.save_pretrained(str(tmp_path / "out"))
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(tmp_path / "out"))
    with open(tmp_path / "out" / "config.json") as f:
        assert json.load(f)["rlhf_tokenizer"] == qwen_dir
    again = GPT.from_pretrained(str(tmp_path / "out"))
    assert again.config.tokenizer == str(tmp_path / "out")  # its own copy: the checkpoint is self-contained
    assert data.get_tokenizer(again.config.tokenizer).eos_id == tok.eos_id
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert hf_tok.eos_token == "<|im_end|>" and hf_tok.chat_template == TEMPLATE


def test_sft_stage_runs_on_qwen2_with_hf_tokenizer(qwen_dir, tmp_path):
    """sft.main loads the Qwen2 directory, takes the tokenizer from it, trains two steps on the HH file and
    publishes a final/policy that is a Qwen2ForCausalLM with the tokenizer alongside."""
    import sft
    sft.main([f"--init_from={qwen_dir}", f"--dataset={HH}", f"--run_dir={tmp_path / 'run'}", "--max_steps=2",
              "--batch_size=4", "--micro_batch_size=4", "--max_prompt_tokens=48", "--max_response_tokens=16",
              "--eval_every=2", "--eval_examples=4", "--num_samples_shown=1", "--max_train_examples=16", "--save_every=2", "--log_every=1",
              "--device=cpu", "--warmup_steps=0"])
    final = tmp_path / "run" / "final" / "policy"
    with open(final / "config.json") as f:
        assert json.load(f)["architectures"] == ["Qwen2ForCausalLM"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(final))
    assert type(hf).__name__ == "Qwen2ForCausalLM" and os.path.exists(final / "tokenizer.json")


@pytest.mark.parametrize("chat_template", ["auto", "none"])
def test_stages_render_prompts_with_the_chat_template(qwen_dir, tmp_path, capsys, chat_template):
    """--chat_template=auto (the default) renders HH prompts with the tokenizer's template in every stage (here
    SFT: its printed samples show the prompt the model saw, ending with the generation prompt); none keeps text."""
    import sft
    sft.main([f"--init_from={qwen_dir}", f"--dataset={HH}", f"--run_dir={tmp_path / 'run'}", "--max_steps=1",
              "--batch_size=4", "--micro_batch_size=4", "--max_prompt_tokens=48", "--max_response_tokens=4",
              "--eval_every=1", "--eval_examples=4", "--num_samples_shown=2", "--max_train_examples=8",
              "--device=cpu", "--warmup_steps=0", f"--chat_template={chat_template}"])
    shown = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  [step 1]")]
    assert len(shown) == 2
    for line in shown:
        prompt = line.split("] ", 1)[1].split(" -> ")[0]
        assert prompt.endswith("<|im_start|>assistant\\n\"") == (chat_template == "auto"), line
        assert ("Assistant:" in prompt) == (chat_template == "none"), line
