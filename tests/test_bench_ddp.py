"""bench/ddp_scaling.py at test size on the CPU (gloo, 2 processes): the sides issue #19 runs on 2 GPUs
train to the end, and each FSDP2 rank holds half the base weights, at 7B's layout and at 70B's (a
model written in NF4 by bench/random_model.py). (It found train.py's FSDP2 eval hang: a validation
set whose batches the ranks do not divide.)"""

import json
import re

from bench.ddp_scaling import main


def test_single_ddp_and_fsdp_sides_run_and_fsdp_halves_the_base(tmp_path):
    out = tmp_path / "ddp.json"
    assert main(["--tiny", "--nproc", "2", "--steps", "4", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for side in ("single", "ddp_2", "fsdp_2"):
        assert result[side]["tokens_per_s"] > 0 and result[side]["ratio"] > 0, side
    shares = [re.search(r"\(([\d.]+)\)", line).group(1) for line in result["fsdp_2"]["rank_lines"]]
    assert [float(s) for s in shares] == [0.5, 0.5]


def test_70b_sides_load_the_nf4_checkpoint_and_fsdp_halves_it(tmp_path):
    # --shape 70b: the model written once in NF4 (bitsandbytes' format), loaded by train.py as it is,
    # one process against FSDP2 (tiny grouped-query shapes on the CPU).
    out = tmp_path / "fsdp70.json"
    assert main(["--tiny", "--nproc", "2", "--shape", "70b", "--steps", "4", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) >= {"single", "fsdp_2"} and "ddp_2" not in result
    shares = [re.search(r"\(([\d.]+)\)", line).group(1) for line in result["fsdp_2"]["rank_lines"]]
    assert [round(float(s), 1) for s in shares] == [0.5, 0.5]


def test_prequantized_checkpoint_holds_the_model_it_was_drawn_from(tmp_path):
    # write_prequantized_checkpoint -> our loader gives back the 4-bit model random_quantized_llama
    # draws with the same seed: the same packed codes and absmax, the same dense weights; several shards.
    import torch
    from bench.random_model import TINY, write_prequantized_checkpoint
    from llama.load import load_llama, random_quantized_llama
    from llama.model import LlamaConfig
    from qlora.linear4bit import Linear4bit
    shape = dict(TINY, num_key_value_heads=2)
    path = write_prequantized_checkpoint(tmp_path / "nf4", shape, shard_bytes=200_000, device="cpu")
    assert len(list(path.glob("*.safetensors"))) > 2
    loaded = load_llama(path, "cpu", torch.bfloat16, load_in_4bit=True)
    drawn = random_quantized_llama(LlamaConfig.from_hf(shape), "cpu", torch.bfloat16, 0)
    layers = [(n, m) for n, m in drawn.named_modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 7 * shape["num_hidden_layers"]
    for name, layer in layers:
        other = loaded.get_submodule(name)
        assert torch.equal(other.packed, layer.packed) and torch.equal(other.state.absmax, layer.state.absmax), name
        assert torch.equal(other.dequantize(torch.float32), layer.dequantize(torch.float32)), name
    dense = dict(drawn.named_parameters())
    assert dense.keys() == dict(loaded.named_parameters()).keys()
    for name, p in loaded.named_parameters():
        assert torch.equal(p, dense[name]), name
    written = (path / "config.json").stat().st_mtime_ns
    assert write_prequantized_checkpoint(path, shape, device="cpu") == path      # a finished one is kept
    assert (path / "config.json").stat().st_mtime_ns == written
