"""Gradient checkpointing settings (qlora/checkpointing.py) on a tiny 4-bit Llama with LoRA and dropout:
offloaded block inputs and selective recompute give the gradients of plain checkpointing bit for
bit (the same ops on the same values), plain checkpointing gives those of no checkpointing (to
rounding), and what each setting keeps between forward and backward is what it says."""

import os
import weakref

import pytest
import torch

from llama.load import load_llama
from qlora.checkpointing import check_settings, run_blocks
from qlora.config import from_dict
from qlora.linear4bit import Linear4bit
from qlora.lora import apply_lora, lora_layers
from qlora.loss import causal_lm_loss


def tiny_lora_llama(tiny_llama, dropout=0.1, variant="gqa"):
    model = load_llama(tiny_llama(variant), "cpu", torch.float32, load_in_4bit=True)
    torch.manual_seed(0)
    apply_lora(model, "all-linear", r=4, alpha=8, dropout=dropout, verbose=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():                      # B != 0, so the adapters change the loss
        for layer in lora_layers(model).values():
            layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=g) * 0.1)
    return model.train()


def loss_and_grads(model, ids, checkpointing, recompute="full", seed=3):
    model.gradient_checkpointing, model.recompute = checkpointing, recompute
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(seed)                    # the same dropout masks in every run
    loss = causal_lm_loss(model(ids, return_hidden=True), model.lm_head.weight, ids)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def ids_of(seed=4, shape=(2, 12)):
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", ["gqa", "mha"])
def test_offload_and_selective_give_the_gradients_of_plain_checkpointing_exactly(tiny_llama, variant):
    model, ids = tiny_lora_llama(tiny_llama, variant=variant), ids_of()
    loss, grads = loss_and_grads(model, ids, True)
    for setting in [("offload", "full"), (True, "selective"), ("offload", "selective")]:
        other_loss, other = loss_and_grads(model, ids, *setting)
        assert torch.equal(other_loss, loss), setting
        for name, g in grads.items():
            assert torch.equal(other[name], g), (setting, name)


def test_checkpointing_gives_the_gradients_of_no_checkpointing(tiny_llama):
    model, ids = tiny_lora_llama(tiny_llama), ids_of()
    loss, grads = loss_and_grads(model, ids, False)
    for setting in [(True, "full"), (True, "none")]:
        other_loss, other = loss_and_grads(model, ids, *setting)
        torch.testing.assert_close(other_loss, loss, rtol=0, atol=1e-6)
        for name, g in grads.items():
            torch.testing.assert_close(other[name], g, rtol=1e-5, atol=1e-7, msg=f"{setting} {name}")


def block_inputs_alive_after_forward(model, ids, checkpointing):
    """Weak references to each block's input, taken in forward; which are alive before backward."""
    refs, handles = [], []
    for layer in model.model.layers:
        handles.append(layer.register_forward_pre_hook(lambda m, args: refs.append(weakref.ref(args[0]))))
    model.gradient_checkpointing = checkpointing
    hidden = model(ids, return_hidden=True)
    for h in handles:
        h.remove()
    alive = [r() is not None for r in refs]
    hidden.sum().backward()
    return alive


def test_offload_keeps_no_block_input_but_the_last_in_device_memory(tiny_llama):
    model, ids = tiny_lora_llama(tiny_llama, variant="mha"), ids_of()
    # Plain checkpointing keeps every block's input until backward; offloading only the last one
    # (backward needs it first), the others wait in (here: CPU) host copies.
    assert block_inputs_alive_after_forward(model, ids, True) == [True, True]
    assert block_inputs_alive_after_forward(model, ids, "offload") == [False, True]


def test_offload_host_copies_are_freed_when_backward_ends_without_the_garbage_collector(tiny_llama, monkeypatch):
    # Pinned host copies must go back to the caching host allocator as soon as backward is done with
    # them; left to Python's cyclic collector (a reference cycle), every next step would pin fresh memory.
    import gc
    from qlora import checkpointing
    model, ids = tiny_lora_llama(tiny_llama, variant="mha"), ids_of()
    model.gradient_checkpointing = "offload"
    copies = []
    offload = checkpointing.HostOffload._offload
    monkeypatch.setattr(checkpointing.HostOffload, "_offload",
                        lambda self, t: copies.append(weakref.ref(entry := offload(self, t))) or entry)
    gc.collect()
    gc.disable()
    try:
        loss = causal_lm_loss(model(ids, return_hidden=True), model.lm_head.weight, ids)
        assert copies and all(r() is not None for r in copies)      # held for the backward pass
        loss.backward()
        del loss
        assert all(r() is None for r in copies)
    finally:
        gc.enable()


def count_base_forwards(model):
    calls = {}

    def hook(module, args, out):
        calls[module] = calls.get(module, 0) + 1
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, Linear4bit)]
    return calls, handles


def test_selective_recompute_skips_the_kept_products(tiny_llama):
    model, ids = tiny_lora_llama(tiny_llama, variant="mha"), ids_of()
    names = {m: n.rsplit(".", 2)[-2] for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    for recompute, kept_runs in [("full", 2), ("selective", 1), ("none", 1)]:
        calls, handles = count_base_forwards(model)
        loss_and_grads(model, ids, True, recompute)
        for h in handles:
            h.remove()
        for module, n in calls.items():
            expected = kept_runs if names[module] in model.KEEP_NAMES else (1 if recompute == "none" else 2)
            assert n == expected, (recompute, names[module], n)


def test_run_blocks_without_grad_runs_each_block_once():
    seen = []
    layers = [lambda x, tag=i: (seen.append(tag), x + 1)[1] for i in range(3)]
    with torch.no_grad():
        out = run_blocks(layers, torch.zeros(2), (), "offload", "selective")
    assert seen == [0, 1, 2] and torch.equal(out, torch.full((2,), 3.0))


@pytest.mark.parametrize("checkpointing, recompute, message", [
    ("yes", "full", "true, false or offload"),
    (True, "some", "full, selective, none"),
    ("offload", "none", "offload needs recompute full or selective"),
])
def test_bad_settings_are_refused(checkpointing, recompute, message):
    with pytest.raises(ValueError, match=message):
        check_settings(checkpointing, recompute)


def test_config_reads_offload_and_recompute():
    cfg = from_dict({"gradient_checkpointing": "offload", "recompute": "selective"})
    assert cfg.gradient_checkpointing == "offload" and cfg.recompute == "selective"
    assert from_dict({"gradient_checkpointing": "true"}).gradient_checkpointing is True
    assert from_dict({"gradient_checkpointing": False}).recompute == "full"
    with pytest.raises(ValueError, match="true, false or offload"):
        from_dict({"gradient_checkpointing": "sometimes"})
    with pytest.raises(ValueError, match="offload needs recompute"):
        from_dict({"gradient_checkpointing": "offload", "recompute": "none"})
    assert from_dict({"embeddings_on_host": True}).embeddings_on_host is True
    assert from_dict({}).embeddings_on_host is False


def test_pinned_pool_reuses_exact_buffers_and_drops_the_too_small():
    # The pool behind offloading (CPU here: the same bookkeeping, nothing pinned): a freed block copy's
    # buffer serves the next request that fits, a longer step's requests replace the shorter ones'.
    from qlora.checkpointing import PinnedPool
    pool = PinnedPool()
    a = pool.take((3, 5), torch.bfloat16, pinned=False)
    shape, dtype = a.shape, a.dtype
    assert shape == (3, 5) and dtype == torch.bfloat16 and pool.held == 30
    ptr = a.data_ptr()
    del a                                                    # back to the pool
    b = pool.take((2, 5), torch.bfloat16, pinned=False)      # fits in the freed 30 bytes: reused
    reused = b.data_ptr() == ptr                             # (no tensor inside an assert: pytest keeps it)
    assert reused and pool.held == 30
    c = pool.take((4, 5), torch.float32, pinned=False)       # nothing free fits: a new exact buffer
    assert pool.held == 30 + 80 and pool.free_bytes() == 0
    del b, c
    assert pool.free_bytes() == 110
    d = pool.take((8, 5), torch.float32, pinned=False)       # longer than all: the free ones go
    assert pool.held == 160 and pool.free == []
    d.fill_(1.0)
    del d
    pool.empty()
    assert pool.held == 0 and pool.free == []


def test_host_embedding_gives_the_lookup_and_the_same_training_step(tiny_llama):
    # embeddings_on_host keeps a frozen, untied embedding table on the host (on a GPU; here the
    # module is put in by hand): the same rows, the same loss and LoRA gradients, the same
    # state_dict keys, and model.to() leaves the table where it is.
    from qlora.adapter import merged_state_dict
    from qlora.checkpointing import HostEmbedding
    model, ids = tiny_lora_llama(tiny_llama, variant="gqa"), ids_of()
    keys = list(model.state_dict())
    loss, grads = loss_and_grads(model, ids, True)
    merged = merged_state_dict(model, torch.float32)
    table = model.model.embed_tokens.weight
    model.model.embed_tokens = HostEmbedding(table)
    torch.testing.assert_close(model.model.embed_tokens(ids), torch.nn.functional.embedding(ids, table), rtol=0, atol=0)
    other_loss, other = loss_and_grads(model, ids, "offload")
    assert torch.equal(other_loss, loss)
    for name, g in grads.items():
        assert torch.equal(other[name], g), name
    assert list(model.state_dict()) == keys
    for key, tensor in merged_state_dict(model, torch.float32).items():
        assert torch.equal(tensor, merged[key]), key
    model.to(torch.float64)                                   # a parameter-wide move: not the table
    same_dtype = model.model.embed_tokens.table.dtype == table.dtype
    assert same_dtype


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the kernel path needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("kernels_setting, kernel_calls", [("auto", 1), ("0", 0)])
def test_host_embedding_gathers_with_the_kernel_unless_kernels_are_off(monkeypatch, kernels_setting, kernel_calls):
    # On a GPU the rows come from kernels/embedding.py reading the pinned table (no ids.cpu(), so no
    # wait); with the kernels off, the CPU looks them up. Both give F.embedding's rows exactly.
    import kernels.common
    import qlora.checkpointing as checkpointing
    calls = []
    monkeypatch.setattr(checkpointing, "gather_rows", lambda *a: calls.append(1) or kernels.embedding.gather_rows(*a))
    monkeypatch.setattr(kernels.common, "KERNELS", kernels_setting)
    table, ids = torch.randn(40, 24).bfloat16(), ids_of(shape=(3, 5)) % 40
    rows = checkpointing.HostEmbedding(table)(ids)
    assert torch.equal(rows, torch.nn.functional.embedding(ids, table)) and len(calls) == kernel_calls


def test_offload_reuses_the_pool_from_step_to_step(tiny_llama, monkeypatch):
    # After the first step every block copy comes from a buffer the pool already holds: the steps of
    # a run pin memory once (on a GPU each new buffer is a cudaHostRegister, milliseconds per block).
    from qlora.checkpointing import PINNED_POOL, PinnedPool
    model, ids = tiny_lora_llama(tiny_llama, variant="mha"), ids_of()
    PINNED_POOL.empty()
    made = []
    take = PinnedPool.take

    def counting_take(self, shape, dtype, pinned):
        before = self.held
        host = take(self, shape, dtype, pinned)
        made.append(self.held != before)
        return host
    monkeypatch.setattr(PinnedPool, "take", counting_take)
    for _ in range(3):
        loss_and_grads(model, ids, "offload")
    per_step = len(made) // 3
    assert per_step == len(model.model.layers) - 1                 # every block's input but the last
    assert all(made[:per_step]) and not any(made[per_step:])


def test_compiled_blocks_give_the_eager_step(tiny_llama):
    # torch_compile: true compiles each block (qlora.checkpointing.compile_blocks): the loss and every
    # LoRA gradient of the eager step, plain and with offloaded checkpoints, with no graph break, and
    # the blocks share their compiled graphs (one per setting, not one per block).
    import torch._dynamo
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters
    from qlora.checkpointing import compile_blocks
    # The compiled blocks trace the PyTorch references of the Triton kernels (kernels.common.use_kernel),
    # the eager step runs the kernels where they run (here: the interpreter): equal to rounding.
    model, ids = tiny_lora_llama(tiny_llama, variant="gqa"), ids_of()
    settings = (False, "offload")
    eager = {s: loss_and_grads(model, ids, s) for s in settings}
    torch._dynamo.reset()
    counters.clear()
    assert compile_blocks(model) == len(model.model.layers) >= 2
    with inductor_config.patch(fallback_random=True):                  # compiled dropout draws eager's masks
        for s in settings:
            loss, grads = eager[s]
            other_loss, other = loss_and_grads(model, ids, s)
            torch.testing.assert_close(other_loss, loss, rtol=1e-5, atol=1e-6)
            for name, g in grads.items():
                torch.testing.assert_close(other[name], g, rtol=1e-4, atol=1e-6, msg=f"{s} {name}")
    breaks, graphs = dict(counters["graph_break"]), counters["stats"]["unique_graphs"]
    assert not breaks and graphs <= len(settings), (breaks, graphs)
    with torch.no_grad():                                               # evaluation runs the blocks eagerly
        model(ids)
    assert counters["stats"]["unique_graphs"] == graphs


def test_compiled_blocks_take_a_second_shape_without_graph_breaks(tiny_llama):
    # A second (B, T) makes torch.compile recompile the blocks with dynamic shapes; there T > 1 was a
    # SymBool that SDPA's is_causal refused: a graph break at the attention of every block (seen on
    # the 13B bench's second micro-batch shape). Still eager's loss and gradients, and a third shape
    # reuses the dynamic graphs.
    import torch._dynamo
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters
    from qlora.checkpointing import compile_blocks
    model = tiny_lora_llama(tiny_llama, variant="gqa")
    shapes = [(1, 24), (4, 6), (2, 12)]
    eager = [loss_and_grads(model, ids_of(shape=shape), True) for shape in shapes]
    torch._dynamo.reset()
    counters.clear()
    compile_blocks(model)
    with inductor_config.patch(fallback_random=True):
        for shape, (loss, grads) in zip(shapes, eager):
            other_loss, other = loss_and_grads(model, ids_of(shape=shape), True)
            torch.testing.assert_close(other_loss, loss, rtol=1e-5, atol=1e-6)
            for name, g in grads.items():
                torch.testing.assert_close(other[name], g, rtol=1e-4, atol=1e-6, msg=f"{shape} {name}")
            if shape == shapes[1]:
                graphs = counters["stats"]["unique_graphs"]
    assert not dict(counters["graph_break"]), dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == graphs


def test_compiled_blocks_save_no_dequantized_weight(tiny_llama):
    # With AOT autograd's CSE on, a compiled block's partitioner kept the dequantized W of the 4-bit
    # layers for backward (+0.34 GiB at a 7B step's peak); compile_blocks turns it off, so what the
    # compiled forward saves holds no [out, in] weight and is no more than what the eager block saves.
    import torch._dynamo
    from qlora.checkpointing import compile_blocks
    model, ids = tiny_lora_llama(tiny_llama, variant="gqa"), ids_of()
    weights = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, Linear4bit)}
    assert ids.numel() not in {n for shape in weights for n in shape}   # no activation has a weight's shape

    def saved_by_blocks():
        saved = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = (tuple(t.shape), t.untyped_storage().nbytes())
            return t
        model.gradient_checkpointing = False                            # every block's saved tensors
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids, return_hidden=True).sum().backward()
        return saved

    eager = saved_by_blocks()
    torch._dynamo.reset()
    compile_blocks(model)
    compiled = saved_by_blocks()
    assert not {shape for shape, _ in compiled.values()} & weights
    assert sum(n for _, n in compiled.values()) <= sum(n for _, n in eager.values())


def test_config_reads_torch_compile_and_refuses_what_it_cannot_do():
    assert from_dict({"torch_compile": True}).torch_compile is True
    with pytest.raises(ValueError, match="torch_compile: true with recompute: selective"):
        from_dict({"torch_compile": True, "gradient_checkpointing": True, "recompute": "selective"})
    with pytest.raises(ValueError, match="torch_compile: true with distributed: fsdp"):
        from_dict({"torch_compile": True, "distributed": "fsdp"})


def test_compiled_dropout_draws_the_same_masks_in_the_recompute(tiny_llama):
    # With inductor's own random numbers (not eager's), checkpointing's recompute must still draw the
    # masks of the forward pass (it restores the RNG state first): the same loss and gradients with
    # checkpoints (plain and offloaded) as without.
    import torch._dynamo
    from qlora.checkpointing import compile_blocks
    model, ids = tiny_lora_llama(tiny_llama, variant="gqa"), ids_of()
    torch._dynamo.reset()
    compile_blocks(model)
    loss, grads = loss_and_grads(model, ids, False)
    for s in (True, "offload"):
        other_loss, other = loss_and_grads(model, ids, s)
        assert torch.equal(other_loss, loss), s
        for name, g in grads.items():
            assert torch.equal(other[name], g), (s, name)
