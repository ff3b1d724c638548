"""The training-step benchmarks' own logic (issue #17), without a GPU: the side specs, the long-context
search, the stand-in attention's saved tensors, and the replay of a memory-history trace."""

import pytest
import torch

from bench.long_context import search, stand_in_sdpa
from bench.memory_at_peak import BEFORE, peak_breakdown
from bench.train_step import parse_side


def test_side_specs():
    assert parse_side("ours") == ("ours", ())
    assert parse_side("ours:offload+shared") == ("ours", ("offload", "shared"))
    assert parse_side("unsloth:offload") == ("unsloth", ("offload",))
    for bad in ("ours:fast", "peer:offload", "hf", "ours:none+offload"):
        with pytest.raises(ValueError, match="side"):
            parse_side(bad)


@pytest.mark.parametrize("limit", [16384, 50_000, 300_000, 1_000])
def test_search_brackets_the_longest_length_that_fits(limit):
    result = search(lambda T: (T <= limit, None), start=16384, granularity=4096, time_cap=60)
    assert result["bracket_closed"]
    assert result["longest"] <= limit < result["shortest_failed"]
    assert result["shortest_failed"] - result["longest"] <= 4096
    assert all(t["fits"] == (t["tokens"] <= limit) for t in result["tries"])


def test_search_never_goes_past_its_limit():
    result = search(lambda T: (True, None), start=16384, granularity=4096, time_cap=60, limit=100_000)
    assert [t["tokens"] for t in result["tries"]] == [16384, 32768, 65536, 100_000]
    assert result["longest"] == 100_000 and result["reached_limit"] and result["shortest_failed"] is None


def test_search_stops_at_its_time_cap():
    result = search(lambda T: (True, None), start=1024, granularity=1024, time_cap=0.0)
    assert result["tries"] == [] and not result["bracket_closed"]


def test_stand_in_attention_holds_what_flash_attention_holds():
    # q (B, H, T, hd) and grouped-query k, v: the output is q's shape and dtype; backward gives each
    # input a gradient of its shape; the node saves q, k, v, out and an fp32 (B, H, T) logsumexp.
    q = torch.randn(1, 4, 6, 8, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, 2, 6, 8, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    out = stand_in_sdpa(q, k, v, is_causal=True, enable_gqa=True)
    assert out.shape == q.shape and out.dtype == q.dtype and out.grad_fn.name().startswith("LinearTimeAttention")
    saved = out.grad_fn.saved_tensors
    assert [t.shape for t in saved] == [q.shape, k.shape, v.shape, q.shape, q.shape[:-1]]
    assert saved[-1].dtype == torch.float32
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


def test_peak_breakdown_replays_allocations_and_frees():
    ours = [{"filename": "/x/torch/nn/functional.py", "line": 1, "name": "linear"},
            {"filename": "/repo/qlora/lora.py", "line": 150, "name": "forward"}]
    peer = [{"filename": "/env/site-packages/transformers/models/llama/modeling_llama.py", "line": 9, "name": "fwd"}]
    trace = [dict(action="alloc", addr=1, size=100, frames=ours),
             dict(action="alloc", addr=2, size=50, frames=peer),
             dict(action="free_requested", addr=1, size=100),
             dict(action="free_completed", addr=1, size=100),
             dict(action="free_completed", addr=99, size=30),          # allocated before the step
             dict(action="alloc", addr=3, size=120, frames=ours),      # the peak: 1000 - 30 + 50 + 120
             dict(action="free_completed", addr=3, size=120)]
    figures = peak_breakdown(trace, baseline=1000)
    assert figures["peak"] == 1000 + 150 and figures["baseline"] == 1000     # the first peak: 100 + 50 live
    trace[4]["action"] = "free_requested"                                     # ignored: free_completed exists
    assert peak_breakdown(trace, 1000)["peak"] == 1000 + 170
    at = peak_breakdown(trace, 1000)["at_peak"]
    assert at == {BEFORE: 1000, "qlora/lora.py:150 forward": 120,
                  "transformers/models/llama/modeling_llama.py:9 fwd": 50}
    # Buffers of compiled code (inductor's generated files, a new name per graph) count as one site.
    compiled = [{"filename": f"/tmp/torchinductor_root/{k}/c{k}.py", "line": k, "name": "call"} for k in (7, 8)]
    trace = [dict(action="alloc", addr=k, size=10 * k, frames=[compiled[k - 7]]) for k in (7, 8)]
    assert peak_breakdown(trace, 0)["at_peak"] == {BEFORE: 0, "compiled code (torch.compile's generated kernels "
                                                               "and buffers)": 150}


def test_profiling_compiled_blocks_runs_the_compiled_step_as_timed(tiny_llama):
    # The profile's named ranges (module hooks, wrapped apply_rope) inside a compiled block changed its
    # code: the profiled step recompiled every block with graph breaks and autotuned its kernels, so
    # what it measured was not the step that was timed (H200, 2026-12-01). Compiled blocks are now
    # profiled as they run: no new graph, no graph break.
    import torch._dynamo
    from torch._dynamo.utils import counters
    from bench.step_profile import profile_step
    from llama.load import load_llama
    from qlora.checkpointing import compile_blocks
    from qlora.lora import apply_lora
    from qlora.loss import causal_lm_loss
    model = load_llama(tiny_llama("gqa"), "cpu", torch.float32, load_in_4bit=True)
    apply_lora(model, "all-linear", r=4, alpha=8, dropout=0.1, verbose=False)
    model.train().gradient_checkpointing = True
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))

    def step(ids):
        causal_lm_loss(model(ids, return_hidden=True), model.lm_head.weight, ids).backward()
    torch._dynamo.reset()
    counters.clear()
    compile_blocks(model)
    step(ids)
    graphs = counters["stats"]["unique_graphs"]
    profiled = profile_step(model, step, (ids,), torch.device("cpu"))
    assert counters["stats"]["unique_graphs"] == graphs and not dict(counters["graph_break"])
    assert "compiled blocks" in profiled["measures"] and sum(profiled["rows"].values()) > 0
