"""bench/large.py at test size on the CPU: its memory accounting against a count from the config, and
one run end to end in this process (what the GPU run does per model, minus the GPU figures)."""

import json
import math

import torch

from bench.large import Run, model_parts, run_child, state_bytes
from llama.load import random_quantized_llama
from llama.model import LlamaConfig
from qlora.lora import apply_lora
from qlora.paged_adamw import PagedAdamW

SHAPE = dict(vocab_size=100, hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def test_model_parts_equal_a_count_from_the_config():
    model = random_quantized_llama(LlamaConfig(**SHAPE), "cpu", torch.bfloat16)
    apply_lora(model, "all-linear", r=8, alpha=16, verbose=False)
    C, I, L, V, kv = 96, 200, 2, 100, 48
    proj = [(C, C), (C, kv), (C, kv), (C, C), (C, I), (C, I), (I, C)]           # (in, out)
    # per weight: 4-bit codes, one 8-bit absmax per 64, one fp32 scale per 256 blocks, the fp32 offset,
    # and the fp32 code books (16 + 256 values; on the CPU all layers share one cached copy of each)
    nf4 = L * sum(i * o // 2 + math.ceil(i * o / 64) + 4 * math.ceil(i * o / 64 / 256) + 4 for i, o in proj)
    parts = model_parts(model)
    assert parts["nf4_weights"] == nf4 + 4 * (16 + 256)
    assert parts["dense_weights"] == 2 * (2 * V * C + (2 * L + 1) * C) + 4 * (C // 4 // 2)   # bf16, fp32 RoPE
    assert parts["lora_values"] == 4 * L * sum(8 * (i + o) for i, o in proj)                # fp32 A and B


def test_state_bytes_of_a_cpu_optimizer_are_host_bytes():
    params = [torch.nn.Parameter(torch.randn(30, 7)), torch.nn.Parameter(torch.randn(5))]
    optimizer = PagedAdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert state_bytes(optimizer) == dict(managed=0, device=0, host=2 * 4 * (30 * 7 + 5))   # m and v, fp32


def test_one_tiny_run_writes_its_figures(tmp_path):
    run = Run("ours-tiny", "ours", "70b", tiny=True, lora_r=4, micro_batches=[[1, 16], [2, 8]], warmup=0, steps=1,
              budget=0)
    out = tmp_path / "run.json"
    run_child(run, torch.device("cpu"), out)
    result = json.loads(out.read_text())
    assert result["trainable_params"] > 0 and result["parts"]["lora_values"] == 4 * result["trainable_params"]
    for shape in ("1x16", "2x8"):
        m = result["micro_batches"][shape]
        assert len(m["losses"]) == 1 and math.isfinite(m["losses"][0]) and m["tokens_per_s"] > 0
        assert m["lora_grads"] == result["parts"]["lora_values"]      # fp32 gradients of every adapter
        assert m["optimizer_state"]["host"] == 2 * result["parts"]["lora_values"]
    assert result["budget"] == {"skipped": "needs CUDA (managed memory)"}
