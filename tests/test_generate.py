"""llama/generate.py against transformers' generate (greedy) and its top-p / temperature warpers."""

import pytest
import torch
from transformers import LlamaForCausalLM
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from llama.generate import generate, sample
from llama.load import load_llama

PROMPTS = [[1, 5, 9], [1, 17, 3, 99, 42, 8, 64], [1, 100, 2 + 1, 7, 11]]  # ragged on purpose


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from conftest import VARIANTS, write_tiny_llama
    directory = write_tiny_llama(tmp_path_factory.mktemp("gen") / "llama3_rope", **VARIANTS["llama3_rope"])
    hf = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return hf, load_llama(directory, dtype=torch.float32)


def _hf_greedy(hf, prompt, max_new_tokens, eos_id):
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                      eos_token_id=eos_id, pad_token_id=0)[0, len(prompt):].tolist()
    return out[:out.index(eos_id)] if eos_id in out else out   # ours leaves the EOS out


def test_greedy_generation_equals_transformers_generate(models):
    hf, ours = models
    got = generate(ours, PROMPTS, max_new_tokens=20, eos_id=2)
    assert got == [_hf_greedy(hf, p, 20, eos_id=2) for p in PROMPTS]
    assert any(len(row) == 20 for row in got)             # at least one row ran its whole budget
    assert all(layer.self_attn.kv_cache is None for layer in ours.model.layers)  # cache freed


def test_generation_stops_at_eos_like_transformers(models):
    hf, ours = models
    free = generate(ours, PROMPTS, max_new_tokens=8)
    eos = free[1][3]                                        # a token row 1 emits as its 4th
    got = generate(ours, PROMPTS, max_new_tokens=8, eos_id=eos)
    assert got == [_hf_greedy(hf, p, 8, eos_id=eos) for p in PROMPTS]
    assert len(got[1]) == free[1].index(eos) and eos not in got[1]


def test_sampling_follows_transformers_temperature_and_top_p():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, 1.2, 0.3])
    temperature, top_p, n = 0.7, 0.8, 40000
    # reference: transformers' warpers, then softmax in float64
    ref_logits = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits[None].double()))
    expected = torch.softmax(ref_logits, dim=-1)[0]
    draws = sample(logits.expand(n, -1), temperature, top_p, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=logits.numel()).double() / n
    assert torch.all(freq[expected == 0] == 0)               # nothing outside the nucleus
    assert (expected > 0).sum() >= 3                         # the nucleus is not trivial
    sigma = (expected * (1 - expected) / n).sqrt()
    assert torch.all((freq - expected).abs() <= 5 * sigma + 1e-12), (freq, expected)


def test_tiny_top_p_sampling_equals_greedy_and_seeds_reproduce(models):
    hf, ours = models
    greedy = generate(ours, PROMPTS, max_new_tokens=6)
    assert generate(ours, PROMPTS, 6, temperature=1.0, top_p=1e-6) == greedy   # nucleus of one token
    a = generate(ours, PROMPTS, 6, temperature=1.0, generator=torch.Generator().manual_seed(7))
    b = generate(ours, PROMPTS, 6, temperature=1.0, generator=torch.Generator().manual_seed(7))
    assert a == b and [len(r) for r in a] == [6, 6, 6]


@pytest.mark.parametrize("prompts, kwargs, message", [
    ([], {}, "non-empty"), ([[1, 2], []], {}, "non-empty"), ([[1, 500]], {}, "outside the vocabulary"),
    ([[1]], dict(temperature=-1.0), "temperature"), ([[1]], dict(top_p=0.0), "top_p"),
    ([[1]], dict(top_p=1.5), "top_p"), ([[1]], dict(max_new_tokens=-1), "max_new_tokens"),
])
def test_bad_arguments_raise(models, prompts, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(models[1], prompts, **{"max_new_tokens": 4, **kwargs})
