"""Bad input through the real command line (subprocess): exit status 1, exactly one line on stderr,
`error: ...` naming the thing and the fix, no traceback, and nothing written. References: the file
listing before and after, and the exit status the shell sees."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from llama.tokenizer import train_tokenizer
from qlora.data import format_row
from qlora.sql_dataset import sql_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "vocab_size": 512, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
SMALL = {"micro_batch_size": 2, "max_steps": 2, "save_steps": 2, "eval_steps": 2, "val_set_size": 2,
         "lora_r": 2, "lora_alpha": 4, "warmup_steps": 1}


def flags(**values) -> list[str]:
    return [x for k, v in values.items() for x in (f"--{k}", str(v))]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Rows, a tiny model config, its tokenizer, and a finished 2-step run (checkpoint + adapter)."""
    root = tmp_path_factory.mktemp("cli")
    rows = sql_rows(24, seed=1)
    write_jsonl(rows, root / "rows.jsonl")
    (root / "tiny.json").write_text(json.dumps(TINY))
    (root / "tiny256.json").write_text(json.dumps({**TINY, "vocab_size": 256}))
    train_tokenizer(["".join(format_row(r, "context_qa")) for r in rows], 512, root / "tok.model")
    common = {"base_model": root / "tiny.json", "tokenizer": root / "tok.model", "datasets": root / "rows.jsonl"}
    here = os.getcwd()
    os.chdir(root)                                         # the run names its base model by a relative path
    try:
        assert train.main(flags(**{**common, "base_model": "tiny.json"}, **SMALL, output_dir="run")) == 0
    finally:
        os.chdir(here)
    return dict(root=root, rows=rows, common=common, run=root / "run", adapter=root / "run" / "adapter")


def listing(directory: Path) -> dict:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*"))}


def run(script: str, argv: list, cwd: Path = ROOT, home: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    if home is not None:                                   # an empty hub cache: nothing to find offline
        env["HF_HOME"] = str(home)
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_one_line_error(done: subprocess.CompletedProcess, *names: str) -> str:
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------- train.py

def train_case(case: str, files: dict, tmp: Path) -> tuple[list, tuple[str, ...]]:
    """(argv, what the line must name) of each bad train.py command line; output_dir is tmp/out."""
    root, common, out = files["root"], files["common"], tmp / "out"
    if case == "offline hub dataset":
        return flags(**{**common, "datasets": "someone/no-such-dataset"}, output_dir=out), \
            ("'someone/no-such-dataset'", "hub", "local JSON/JSONL")
    if case == "offline hub model":
        return flags(**{**common, "base_model": "someone/no-such-model"}, output_dir=out), \
            ("'someone/no-such-model'", "hub", "local checkpoint directory")
    if case == "output_dir is a file":
        (tmp / "afile").write_text("x")
        return flags(**common, output_dir=tmp / "afile"), (str(tmp / "afile"), "is a file")
    if case == "output_dir under /proc":
        return flags(**common, output_dir="/proc/qlora-out"), ("/proc", "choose a directory")
    if case == "device tpu9":
        return flags(**common, output_dir=out, device="tpu9"), ("'tpu9'", "cpu")
    if case == "device cuda without a GPU":
        return flags(**common, output_dir=out, device="cuda"), ("'cuda'", "no CUDA GPU", "--device cpu")
    if case == "lora_alpha 0":
        return flags(**common, output_dir=out, lora_alpha=0), ("lora_alpha",)
    if case == "tokenizer larger than the vocab":
        return flags(**{**common, "base_model": root / "tiny256.json"}, output_dir=out), \
            ("tok.model", "512", "256", "--tokenizer")
    if case == "every answer empty":
        write_jsonl([{**r, "answer": ""} for r in files["rows"]], tmp / "empty.jsonl")
        return flags(**{**common, "datasets": tmp / "empty.jsonl"}, output_dir=out), ("empty.jsonl", "empty")
    if case == "non-UTF-8 dataset":
        (tmp / "latin1.jsonl").write_bytes('{"context": "caf\u00e9", "question": "q", "answer": "a"}\n'
                                           .encode("latin-1"))
        return flags(**{**common, "datasets": tmp / "latin1.jsonl"}, output_dir=out), \
            ("latin1.jsonl", "not UTF-8", "0xe9")
    if case == "bad JSON in the model config":
        (tmp / "bad.json").write_text('{"hidden_size": 32,, }')
        return flags(**{**common, "base_model": tmp / "bad.json"}, output_dir=out), ("bad.json", "not valid JSON")
    if case == "resume with another lora_r":
        copy = tmp / "run"
        shutil.copytree(files["run"], copy)
        return flags(**common, **{**SMALL, "lora_r": 4}, output_dir=copy, resume_from_checkpoint="true"), \
            ("lora_r", "2", "4")
    raise KeyError(case)


TRAIN_CASES = ["offline hub dataset", "offline hub model", "output_dir is a file", "output_dir under /proc",
               "device tpu9", "device cuda without a GPU", "lora_alpha 0", "tokenizer larger than the vocab",
               "every answer empty", "non-UTF-8 dataset", "bad JSON in the model config",
               "resume with another lora_r"]


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_train_bad_input_is_one_line_and_writes_nothing(files, tmp_path, case):
    if case == "device cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("a GPU is here")
    argv, names = train_case(case, files, tmp_path)
    before = listing(tmp_path)
    done = run("train.py", argv, home=tmp_path / "hf")
    assert_one_line_error(done, *names)
    assert listing(tmp_path) == before                      # no output_dir, no tokenizer, no checkpoint


def test_debug_shows_the_traceback(files, tmp_path):
    done = run("train.py", flags(**files["common"], output_dir=tmp_path / "out", device="tpu9") + ["--debug"])
    assert done.returncode == 1 and "Traceback" in done.stderr and "tpu9" in done.stderr


# ----------------------------------------------------------------------------- infer.py

def adapter_copy(files: dict, tmp: Path, weights: bytes | None = None, config: str | None = None) -> Path:
    adapter = tmp / "adapter"
    shutil.copytree(files["adapter"], adapter)
    if weights is not None:
        (adapter / "adapter_model.safetensors").write_bytes(weights)
    if config is not None:
        (adapter / "adapter_config.json").write_text(config)
    return adapter


def infer_case(case: str, files: dict, tmp: Path) -> tuple[list, tuple[str, ...]]:
    weights = (files["adapter"] / "adapter_model.safetensors").read_bytes()
    if case == "garbage safetensors":
        adapter = adapter_copy(files, tmp, weights=b"\x13garbage, not safetensors: " * 12)   # fixed: random bytes open with 0x80 (pickle) 1 time in 256
        return ["--adapter", adapter, "--prompt", "hi"], ("adapter_model.safetensors", "not a readable safetensors")
    if case == "truncated safetensors":
        adapter = adapter_copy(files, tmp, weights=weights[: len(weights) // 2])
        return ["--adapter", adapter, "--prompt", "hi"], ("adapter_model.safetensors", "truncated")
    if case == "pickle safetensors":
        adapter = adapter_copy(files, tmp, weights=pickle.dumps({"lora_A": [1.0, 2.0]}))
        return ["--adapter", adapter, "--prompt", "hi"], ("adapter_model.safetensors", "pickle")
    if case == "bad JSON in adapter_config.json":
        adapter = adapter_copy(files, tmp, config='{"peft_type": "LORA",')
        return ["--adapter", adapter, "--prompt", "hi"], ("adapter_config.json", "not valid JSON")
    if case == "device tpu9":
        return ["--adapter", files["adapter"], "--prompt", "hi", "--device", "tpu9"], ("'tpu9'",)
    if case == "offline hub model":
        return ["--base", "someone/no-such-model", "--tokenizer", files["root"] / "tok.model", "--prompt", "hi"], \
            ("'someone/no-such-model'", "hub")
    raise KeyError(case)


@pytest.mark.parametrize("case", ["garbage safetensors", "truncated safetensors", "pickle safetensors",
                                  "bad JSON in adapter_config.json", "device tpu9", "offline hub model"])
def test_infer_bad_input_is_one_line_and_writes_nothing(files, tmp_path, case):
    argv, names = infer_case(case, files, tmp_path)
    before = listing(tmp_path)
    assert_one_line_error(run("infer.py", argv, home=tmp_path / "hf"), *names)
    assert listing(tmp_path) == before


# ----------------------------------------------------------------------------- what works

def test_the_adapter_names_its_base_by_absolute_path_and_loads_from_any_directory(files, tmp_path):
    config = json.loads((files["adapter"] / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]).is_absolute()
    done = run("infer.py", ["--adapter", files["adapter"], "--prompt", "SELECT", "--max_new_tokens", 3], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
