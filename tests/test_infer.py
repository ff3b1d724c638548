"""infer.py on tiny random Llamas (CPU, fp32). References: the model's own full forward (no cache)
for greedy decoding, transformers + PEFT for adapter files and generations, transformers'
from_pretrained for the merged export, hand-checked SQL rows for --eval, and train.py's own adapter
for the end-to-end run."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import infer
import train
from conftest import train_tiny_sentencepiece, write_tiny_llama
from llama.generate import generate
from llama.load import load_llama
from llama.tokenizer import Tokenizer
from qlora.data import format_row
from qlora.adapter import load_adapter, save_adapter
from qlora.sql_dataset import sql_rows, write_jsonl

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 320
PROMPTS = [[1, 5, 9], [1, 17, 3, 99, 42, 8, 64, 200], [1, 100, 3, 7, 11]]  # ragged on purpose


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny HF checkpoint, its tokenizer, a PEFT adapter made by peft on it, and the same adapter
    saved again by our save_adapter."""
    root = tmp_path_factory.mktemp("infer")
    ckpt = write_tiny_llama(root / "base", vocab_size=VOCAB, num_key_value_heads=2)
    tokenizer = train_tiny_sentencepiece(root / "tok", VOCAB)
    torch.manual_seed(3)
    ref = get_peft_model(LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32),
                         LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():                              # B = 0 at init: give the adapter an effect
        g = torch.Generator().manual_seed(1)
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    ref.save_pretrained(root / "peft")
    ours = load_adapter(load_llama(ckpt, dtype=torch.float32), root / "peft")
    save_adapter(ours, root / "ours", base_model_name_or_path=str(ckpt))
    return dict(root=root, ckpt=ckpt, tokenizer=tokenizer, peft=root / "peft", ours=root / "ours",
                reference=ref.eval())


def run_infer(capsys, *argv) -> str:
    assert infer.main([str(a) for a in argv]) == 0
    return capsys.readouterr().out


# ----------------------------------------------------------------------------- greedy decoding

def test_greedy_generation_is_the_argmax_of_a_full_forward_at_every_step(files):
    model = load_adapter(load_llama(files["ckpt"], dtype=torch.float32, load_in_4bit=True), files["ours"]).eval()
    got = generate(model, PROMPTS, max_new_tokens=10)
    assert [len(row) for row in got] == [10, 10, 10]
    with torch.no_grad():
        for prompt, new in zip(PROMPTS, got):
            seq = list(prompt)
            for token in new:                              # no cache: the whole sequence every step
                assert token == model(torch.tensor([seq]))[0, -1].argmax().item()
                seq.append(token)


def test_cached_decode_step_with_a_tensor_position_equals_an_int_position(files):
    # The CUDA-graph path feeds the position as a 0-d tensor; the numbers must not depend on it.
    model = load_llama(files["ckpt"], dtype=torch.float32)
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        model.setup_cache(1, 16)
        model(ids[:, :5], start_pos=0)
        by_int = model(ids[:, 5:6], start_pos=5)
        by_tensor = model(ids[:, 5:6], start_pos=torch.tensor(5))
        model.clear_cache()
    assert torch.equal(by_int, by_tensor)


# ----------------------------------------------------------------------------- adapters: ours and PEFT's

def test_our_and_peft_adapter_files_give_peft_logits_and_generations(files, capsys):
    ref = files["reference"]
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        expected = ref(ids).logits
        for adapter in (files["peft"], files["ours"]):
            model = load_adapter(load_llama(files["ckpt"], dtype=torch.float32), adapter).eval()
            torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-5)

    # The same text from infer.py (streamed) with either file, and from PeftModel.generate.
    tokenizer = Tokenizer(files["tokenizer"])
    prompt = "The quick brown fox"
    prompt_ids = tokenizer.encode(prompt)
    out = ref.generate(input_ids=torch.tensor([prompt_ids]), max_new_tokens=10, do_sample=False,
                       eos_token_id=tokenizer.eos_id, pad_token_id=0)[0, len(prompt_ids):].tolist()
    out = out[:out.index(tokenizer.eos_id)] if tokenizer.eos_id in out else out
    expected_text = tokenizer.decode(out).strip()
    for adapter in (files["peft"], files["ours"]):
        text = run_infer(capsys, "--adapter", adapter, "--bf16", "--tokenizer", files["tokenizer"],
                         "--prompt", prompt, "--max_new_tokens", 10)
        assert text.strip() == expected_text


def test_prompts_file_batched_by_length_gives_each_prompt_its_batch_1_completion(files, tmp_path, capsys):
    prompts = ["The quick brown fox jumps over the lazy dog.", "Hello", "Numbers: 1234 and more numbers 5678",
               "QLoRA", "Tiny tokenizers are trained in tests, hello world"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    common = ["--adapter", files["ours"], "--tokenizer", files["tokenizer"], "--max_new_tokens", 8]
    batched = [json.loads(line) for line in run_infer(capsys, *common, "--prompts", tmp_path / "p.txt",
                                                       "--batch_size", 3).splitlines()]
    alone = [json.loads(line) for line in run_infer(capsys, *common, "--prompts", tmp_path / "p.txt",
                                                     "--batch_size", 1).splitlines()]
    assert [row["prompt"] for row in batched] == prompts                 # the file's order
    assert batched == alone


def test_a_watched_run_shows_loading_and_generation_bars_on_stderr_and_keeps_stdout_clean(files, tmp_path, capsys,
                                                                                          monkeypatch):
    from qlora import progress

    monkeypatch.setattr(progress, "interactive", lambda: True)   # as if stderr were a terminal
    (tmp_path / "p.txt").write_text("Hello\nQLoRA\nNumbers: 1234\n")
    assert infer.main([str(a) for a in ("--adapter", files["ours"], "--tokenizer", files["tokenizer"],
                                        "--max_new_tokens", 4, "--batch_size", 2, "--prompts", tmp_path / "p.txt")]) == 0
    out, err = capsys.readouterr()
    assert "generating: 100%" in err and "3/3" in err and "quantizing: 100%|" in err and "21/21" in err, err
    assert [json.loads(line)["prompt"] for line in out.splitlines()] == ["Hello", "QLoRA", "Numbers: 1234"]


# ----------------------------------------------------------------------------- merge and export

def test_merged_export_reloads_in_our_loader_and_transformers(files, tmp_path, capsys):
    out = tmp_path / "merged"
    run_infer(capsys, "--adapter", files["ours"], "--tokenizer", files["tokenizer"], "--export", out)
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "tokenizer.model"}
    assert not list(tmp_path.glob(".merged*"))            # the temp dir was renamed, nothing left over

    unmerged = load_adapter(load_llama(files["ckpt"], dtype=torch.float32, load_in_4bit=True), files["ours"])
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        expected = unmerged(ids)
        ours = load_llama(out, dtype=torch.float32)(ids)
        theirs = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(ids).logits
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)   # the same bf16 file
        # Merged weights are rounded once to bf16 (8 bits of mantissa): about 0.4% of the logits' range.
        assert (ours - expected).abs().max() < 1e-2 * expected.abs().max()
        merged = infer.merged_model(unmerged)                            # --merge: fp32, no rounding
        torch.testing.assert_close(merged(ids), expected, rtol=1e-4, atol=1e-4)
    assert Tokenizer(out / "tokenizer.model").encode("hello world") == Tokenizer(files["tokenizer"]).encode("hello world")


def test_4bit_export_is_a_bitsandbytes_checkpoint_that_reloads(files, tmp_path, capsys):
    out = tmp_path / "merged4"
    run_infer(capsys, "--adapter", files["ours"], "--tokenizer", files["tokenizer"], "--export", out, "--4bit")
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "tokenizer.model"}
    assert json.loads((out / "config.json").read_text())["quantization_config"]["load_in_4bit"]
    # The bf16 export quantized by us equals the 4-bit export read back, byte for byte.
    run_infer(capsys, "--adapter", files["ours"], "--tokenizer", files["tokenizer"], "--export", tmp_path / "m16")
    ours = load_llama(out, dtype=torch.bfloat16, load_in_4bit=True)
    again = load_llama(tmp_path / "m16", dtype=torch.bfloat16, load_in_4bit=True)
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        assert torch.equal(ours(ids), again(ids))


# ----------------------------------------------------------------------------- --eval

SCHEMA = "CREATE TABLE head (age INTEGER, name VARCHAR)"
EVAL_ROWS = [  # (row, what the fake model answers): exact+runs, runs only, neither, runs only
    ({"context": SCHEMA, "question": "How many heads are older than 56?",
      "answer": "SELECT COUNT(*) FROM head WHERE age > 56"}, "select count(*)  from HEAD where age>56"),
    ({"context": SCHEMA, "question": "Names of heads?", "answer": "SELECT name FROM head"}, "SELECT age FROM head"),
    ({"context": SCHEMA, "question": "Oldest head?", "answer": "SELECT MAX(age) FROM head"}, "SELECT salary FROM head"),
    ({"context": SCHEMA, "question": "Heads named Ann?", "answer": "SELECT * FROM head WHERE name = 'Ann'"},
     "SELECT * FROM head WHERE name = 'Bob'"),
]


def test_eval_scores_exact_match_and_runs_on_schema(files, tmp_path, capsys, monkeypatch):
    tokenizer = Tokenizer(files["tokenizer"])
    answers = {format_row(row, "context_qa")[0]: answer for row, answer in EVAL_ROWS}

    def fake_generate(model, prompt_ids, *args, **kwargs):    # answers each prompt as EVAL_ROWS says
        return [tokenizer.encode(answers[tokenizer.decode(ids)], bos=False) for ids in prompt_ids]

    monkeypatch.setattr(infer, "generate", fake_generate)
    write_jsonl([row for row, _ in EVAL_ROWS], tmp_path / "rows.jsonl")
    table = run_infer(capsys, "--base", files["ckpt"], "--tokenizer", files["tokenizer"], "--eval",
                      tmp_path / "rows.jsonl", "--batch_size", 3, "--max_new_tokens", 16)
    assert "| model | rows | exact match | runs on schema |" in table
    assert f"| {files['ckpt']} (no adapter) | 4 (rows.jsonl) | 1 (25.0%) | 3 (75.0%) |" in table
    table = run_infer(capsys, "--base", files["ckpt"], "--tokenizer", files["tokenizer"], "--eval",
                      tmp_path / "rows.jsonl", "--eval_limit", 1, "--max_new_tokens", 16)
    assert f"| {files['ckpt']} (no adapter) | 1 (rows.jsonl) | 1 (100.0%) | 1 (100.0%) |" in table


def test_eval_on_builtin_sql_warns_that_those_are_training_rows(files, capsys, monkeypatch):
    monkeypatch.setattr(infer, "generate", lambda model, prompt_ids, *a, **k: [[] for _ in prompt_ids])
    assert infer.main([str(a) for a in ("--base", files["ckpt"], "--tokenizer", files["tokenizer"], "--eval",
                                         "builtin:sql", "--eval_limit", 2, "--max_new_tokens", 4)]) == 0
    table, warning = capsys.readouterr()
    assert "| 2 (builtin:sql) | 0 (0.0%) | 0 (0.0%) |" in table
    assert "training rows" in warning and "python -m qlora.sql_dataset --held_out" in warning


def test_prompt_format_comes_from_the_adapters_training_config(files, tmp_path, capsys, monkeypatch):
    """An adapter trained on context_qa.load_v2 rows (the seed's type) is prompted "Context: ...\n
    Question: ...\n" and its "Answer: " prefix is stripped before scoring; infer.py says which format."""
    tokenizer = Tokenizer(files["tokenizer"])
    adapter = tmp_path / "adapter"
    shutil.copytree(files["ours"], adapter)
    (adapter / "training_config.json").write_text(json.dumps({"datasets": [{"path": "x", "type": "context_qa.load_v2"}]}))
    seen = []
    gold = {f"Context: {row['context']}\nQuestion: {row['question']}\n": row["answer"] for row, _ in EVAL_ROWS}

    def fake_generate(model, prompt_ids, *args, **kwargs):    # answers like a load_v2 adapter
        prompts = [tokenizer.decode(ids) for ids in prompt_ids]
        seen.extend(prompts)
        return [tokenizer.encode("Answer: " + gold[p], bos=False) for p in prompts]

    monkeypatch.setattr(infer, "generate", fake_generate)
    write_jsonl([row for row, _ in EVAL_ROWS], tmp_path / "rows.jsonl")
    table = run_infer(capsys, "--base", files["ckpt"], "--adapter", adapter, "--tokenizer", files["tokenizer"],
                      "--eval", tmp_path / "rows.jsonl", "--batch_size", 4, "--max_new_tokens", 16)
    assert f"{adapter} | 4 (rows.jsonl) | 4 (100.0%) | 4 (100.0%) |" in table     # the labelled row
    row = EVAL_ROWS[0][0]
    assert sorted(seen) == sorted(gold)                        # every prompt in the load_v2 format
    assert infer.main([str(a) for a in ["--base", files["ckpt"], "--adapter", adapter, "--tokenizer",
                                        files["tokenizer"], "--context", row["context"], "--question",
                                        row["question"], "--max_new_tokens", 4]]) == 0
    assert f"prompt format: context_qa.load_v2 ({adapter / 'training_config.json'})" in capsys.readouterr().err
    assert seen[-1] == f"Context: {row['context']}\nQuestion: {row['question']}\n"


# ----------------------------------------------------------------------------- bad input

def test_adapter_for_another_base_model_is_refused(files, tmp_path):
    other = write_tiny_llama(tmp_path / "other", vocab_size=VOCAB, hidden_size=32, intermediate_size=48)
    with pytest.raises(SystemExit, match=r"does not fit this model.*--base"):
        infer.main(["--base", str(other), "--adapter", str(files["peft"]), "--tokenizer", str(files["tokenizer"]),
                    "--prompt", "hi"])


def test_help_lists_every_option_with_its_default_and_meaning(capsys, monkeypatch):
    import argparse

    parsers, real_parse = [], argparse.ArgumentParser.parse_args
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args",
                        lambda self, *a, **k: parsers.append(self) or real_parse(self, *a, **k))
    with pytest.raises(SystemExit):
        infer.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())          # argparse wraps long lines
    for action in parsers[0]._actions:
        option = action.option_strings[-1]
        assert action.help, option
        shown = action.default is not None and action.default is not False and action.default != ""
        if shown and option != "--help":
            assert f"{' '.join(action.help.split())} (default: {action.default})" in out, option
    assert "--eval_limit EVAL_LIMIT score only the first N rows (0: all) (default: 0)" in out


@pytest.mark.parametrize("case, message", [
    ("no adapter dir", "adapter directory .* not found"),
    ("no adapter weights", "adapter_model.safetensors not found"),
    ("no base", "does not exist"),
    ("no tokenizer", "no tokenizer.model"),
    ("no prompts file", "prompts file .* not found"),
    ("empty prompt", "empty prompt"),
    ("blank question", "empty prompt"),
    ("blank prompts file", "empty prompt"),
    ("nothing to do", "nothing to do"),
    ("export dir taken", "not an empty directory"),
    ("4bit without export", "--4bit applies to --export"),
])
def test_bad_input_exits_with_one_line_naming_the_fix(files, tmp_path, case, message):
    half = tmp_path / "half"                                   # an adapter dir without its weights
    half.mkdir()
    shutil.copy(files["ours"] / "adapter_config.json", half)
    (tmp_path / "blank.txt").write_text("\n  \n")
    base = ["--adapter", files["ours"], "--tokenizer", files["tokenizer"]]
    argv = {"no adapter dir": ["--adapter", tmp_path / "nope", "--prompt", "hi"],
            "no adapter weights": ["--adapter", half, "--prompt", "hi"],
            "no base": [*base, "--base", tmp_path / "nope", "--prompt", "hi"],
            "no tokenizer": ["--adapter", files["ours"], "--tokenizer", tmp_path / "no.model", "--prompt", "hi"],
            "no prompts file": [*base, "--prompts", tmp_path / "nope.txt"],
            "empty prompt": [*base, "--prompt", ""],
            "blank question": [*base, "--context", SCHEMA, "--question", "  "],
            "blank prompts file": [*base, "--prompts", tmp_path / "blank.txt"],
            "nothing to do": base,
            "export dir taken": [*base, "--export", tmp_path],
            "4bit without export": [*base, "--prompt", "hi", "--4bit"]}[case]
    with pytest.raises(SystemExit, match=message) as e:
        infer.main([str(a) for a in argv])
    assert str(e.value).startswith("error: ") and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- end to end

def test_train_then_infer_end_to_end(tmp_path):
    rows = sql_rows(40, seed=1)
    write_jsonl(rows, tmp_path / "rows.jsonl")
    tiny = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
            "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 512, "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
    (tmp_path / "tiny.json").write_text(json.dumps(tiny))
    # No --tokenizer: the demo trains one on the rows, and train.py keeps it beside the adapter.
    settings = {"base_model": tmp_path / "tiny.json", "datasets": tmp_path / "rows.jsonl",
                "output_dir": tmp_path / "out", "sequence_len": 256, "micro_batch_size": 2, "max_steps": 2,
                "warmup_steps": 1, "lora_r": 4, "lora_alpha": 8, "eval_steps": 2, "save_steps": 2,
                "val_set_size": 2}
    assert train.main([x for k, v in settings.items() for x in (f"--{k}", str(v))]) == 0
    adapter = tmp_path / "out" / "adapter"
    assert {"training_config.json", "tokenizer.model"} <= {p.name for p in adapter.iterdir()}

    write_jsonl(rows[:3], tmp_path / "eval.jsonl")
    done = subprocess.run([sys.executable, "infer.py", "--adapter", str(adapter), "--context", rows[0]["context"],
                           "--question", rows[0]["question"], "--max_new_tokens", "6",
                           "--eval", str(tmp_path / "eval.jsonl")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| model | rows | exact match | runs on schema |" in done.stdout
    assert f" + {tmp_path / 'out' / 'adapter'} | 3 (eval.jsonl) |" in done.stdout
    assert done.stdout.strip().splitlines()[-1].strip()          # the streamed answer
    assert "tokens/s" in done.stderr

    # Bad input from the command line: exit status 1, one line on stderr, no traceback.
    bad = subprocess.run([sys.executable, "infer.py", "--adapter", str(adapter), "--prompt", " "],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.strip().startswith("error: empty prompt")
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
