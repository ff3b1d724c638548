"""PagedAdamW against torch.optim.AdamW (the reference implementation of the same update)."""

import copy
import io

import pytest
import torch

import qlora.paged_adamw
from qlora.paged_adamw import PagedAdamW, is_managed


def _tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 16),
                                torch.nn.GELU(), torch.nn.Linear(16, 4))
    model[2].bias.requires_grad_(False)  # a parameter that never gets a gradient: both must skip it
    return model


def _groups(model: torch.nn.Module) -> list[dict]:
    # three groups: default hyperparameters, own lr and weight decay, own lr, betas and eps
    return [{"params": model[0].parameters()},
            {"params": model[2].parameters(), "lr": 3e-3, "weight_decay": 0.1},
            {"params": model[4].parameters(), "lr": 2e-2, "betas": (0.8, 0.99), "eps": 1e-6}]


def _train(model, optimizer, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(5, 8, generator=generator)
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()


@pytest.mark.parametrize("chunk_numel, page_out", [(2**26, False), (100, False), (1, True)],
                         ids=["one chunk", "chunks of 100 values", "a tensor per chunk, page_out"])
def test_updates_equal_torch_adamw_over_20_steps(monkeypatch, chunk_numel, page_out):
    # (torch's foreach=True variant is compared on the GPU by bench/paged_adamw_gpu.py; on the CPU its
    # first step spends seconds importing torch._dynamo.) The update runs chunk by chunk (the layers
    # hold 128, 16, 256, 16, 64 and 4 values); on the CPU page_out has nothing to move.
    monkeypatch.setattr(qlora.paged_adamw, "UPDATE_CHUNK_NUMEL", chunk_numel)
    ours_model, ref_model = _tiny_model(), _tiny_model()
    ours = PagedAdamW(_groups(ours_model), lr=1e-2, weight_decay=0.01, page_out=page_out)
    ref = torch.optim.AdamW(_groups(ref_model), lr=1e-2, weight_decay=0.01, foreach=False)
    _train(ours_model, ours, 20, seed=1)
    _train(ref_model, ref, 20, seed=1)
    for p, p_ref in zip(ours_model.parameters(), ref_model.parameters()):
        # same ops in the same order as torch's single-tensor AdamW: equal to the bit on the CPU
        assert torch.equal(p, p_ref)
    for p, p_start in zip(ours_model.parameters(), _tiny_model().parameters()):
        assert torch.equal(p, p_start) != p.requires_grad  # trained ones moved, the frozen bias did not
    for p, p_ref in zip(ours_model.parameters(), ref_model.parameters()):
        if p.requires_grad:
            assert torch.equal(ours.state[p]["exp_avg"], ref.state[p_ref]["exp_avg"])
            assert torch.equal(ours.state[p]["exp_avg_sq"], ref.state[p_ref]["exp_avg_sq"])
            assert ours.state[p]["step"] == int(ref.state[p_ref]["step"]) == 20


def test_state_dict_round_trip_continues_identically():
    # uninterrupted: 20 steps; interrupted: 10 steps, save, a fresh model and optimizer, load, 10 more
    full_model = _tiny_model()
    full = PagedAdamW(_groups(full_model), lr=1e-2, weight_decay=0.01)
    _train(full_model, full, 10, seed=1)
    _train(full_model, full, 10, seed=2)

    first_model = _tiny_model()
    first = PagedAdamW(_groups(first_model), lr=1e-2, weight_decay=0.01)
    _train(first_model, first, 10, seed=1)
    buffer = io.BytesIO()
    torch.save({"model": first_model.state_dict(), "optimizer": first.state_dict()}, buffer)
    saved = first.state_dict()
    for state in saved["state"].values():  # ordinary fp32 CPU tensors, a snapshot (not aliases)
        assert state["exp_avg"].device.type == "cpu" and state["exp_avg"].dtype == torch.float32
    p0 = next(first_model.parameters())
    assert saved["state"][0]["exp_avg"].data_ptr() != first.state[p0]["exp_avg"].data_ptr()

    buffer.seek(0)
    checkpoint = torch.load(buffer)
    resumed_model = _tiny_model(seed=123)  # different weights: everything must come from the file
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = PagedAdamW(_groups(resumed_model), lr=5.0, weight_decay=0.0)  # overwritten by the load
    resumed.load_state_dict(checkpoint["optimizer"])
    assert [g["lr"] for g in resumed.param_groups] == [1e-2, 3e-3, 2e-2]
    _train(resumed_model, resumed, 10, seed=2)
    for p, q in zip(full_model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)


def test_load_state_dict_rejects_foreign_state():
    model = _tiny_model()
    optimizer = PagedAdamW(model.parameters(), lr=1e-3)
    _train(model, optimizer, 1, seed=0)
    sd = optimizer.state_dict()
    broken = copy.deepcopy(sd)
    del broken["state"][0]["exp_avg_sq"]
    with pytest.raises(ValueError, match="lacks"):
        PagedAdamW(_tiny_model().parameters(), lr=1e-3).load_state_dict(broken)
    wrong_shape = copy.deepcopy(sd)
    wrong_shape["state"][0]["exp_avg"] = torch.zeros(3)
    with pytest.raises(ValueError, match="shape"):
        PagedAdamW(_tiny_model().parameters(), lr=1e-3).load_state_dict(wrong_shape)


def test_bf16_parameters_update_in_fp32_and_round_once():
    # Reference: torch.optim.AdamW on an fp32 copy whose weights are rounded to bf16 after each step,
    # fed the same (bf16-representable) gradients: our fp32 state must give exactly that.
    torch.manual_seed(0)
    start = torch.randn(64, 33).bfloat16()
    ours_p = torch.nn.Parameter(start.clone())
    ref_p = torch.nn.Parameter(start.float())
    ours = PagedAdamW([ours_p], lr=1e-2, weight_decay=0.05)
    ref = torch.optim.AdamW([ref_p], lr=1e-2, weight_decay=0.05, foreach=False)
    for _ in range(20):
        grad = torch.randn(64, 33).bfloat16()
        ours_p.grad, ref_p.grad = grad, grad.float()
        ours.step()
        ref.step()
        with torch.no_grad():
            ref_p.copy_(ref_p.bfloat16().float())
    assert ours.state[ours_p]["exp_avg"].dtype == torch.float32
    assert ours_p.dtype == torch.bfloat16
    assert torch.equal(ours_p.float(), ref_p)


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-1e-3), "lr"),
    (dict(lr=1e-3, betas=(1.0, 0.999)), "betas"),
    (dict(lr=1e-3, betas=(0.9, -0.1)), "betas"),
    (dict(lr=1e-3, eps=-1e-8), "eps"),
    (dict(lr=1e-3, weight_decay=-0.1), "weight_decay"),
    (dict(lr=float("nan")), "lr"),
])
def test_bad_hyperparameters_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PagedAdamW(_tiny_model().parameters(), **kwargs)


def test_bad_hyperparameters_in_a_param_group_raise_value_error():
    model = _tiny_model()
    with pytest.raises(ValueError, match="betas"):
        PagedAdamW([{"params": model[0].parameters()},
                    {"params": model[4].parameters(), "betas": (0.9, 1.5)}], lr=1e-3)


def test_cpu_state_is_ordinary_memory():
    # paged=True on the CPU is a plain AdamW: nothing to page, and no CUDA runtime is touched
    model = _tiny_model()
    optimizer = PagedAdamW(model.parameters(), lr=1e-3, paged=True)
    _train(model, optimizer, 2, seed=0)
    state = optimizer.state[model[0].weight]
    assert state["exp_avg"].device.type == "cpu" and not is_managed(state["exp_avg"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_state_lives_in_managed_memory_and_matches_torch():
    torch.manual_seed(0)
    w = torch.randn(512, 256, device="cuda")  # 131072 elements: above the paging threshold
    ours_p, ref_p = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    ours = PagedAdamW([ours_p], lr=1e-3, weight_decay=0.01)
    ref = torch.optim.AdamW([ref_p], lr=1e-3, weight_decay=0.01, foreach=False)
    for _ in range(20):
        grad = torch.randn_like(w)
        ours_p.grad, ref_p.grad = grad, grad.clone()
        ours.step()
        ref.step()
    assert is_managed(ours.state[ours_p]["exp_avg"]) and is_managed(ours.state[ours_p]["exp_avg_sq"])
    assert not is_managed(ref.state[ref_p]["exp_avg"])
    torch.testing.assert_close(ours_p, ref_p, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_state_paged_out_each_step_updates_as_resident_state(monkeypatch):
    # page_out moves each chunk's managed state to host RAM after its update and the next step's
    # prefetch brings it back: the same numbers as state that stays on the GPU, bit for bit.
    monkeypatch.setattr(qlora.paged_adamw, "UPDATE_CHUNK_NUMEL", 200_000)   # 2 chunks of the 3 tensors
    torch.manual_seed(0)
    shapes = [(512, 256), (384, 300), (1000, 130)]                        # each above the paging threshold
    start = [torch.randn(shape, device="cuda") for shape in shapes]
    resident_p = [torch.nn.Parameter(w.clone()) for w in start]
    paged_p = [torch.nn.Parameter(w.clone()) for w in start]
    resident = PagedAdamW(resident_p, lr=1e-3, weight_decay=0.01)
    paged = PagedAdamW(paged_p, lr=1e-3, weight_decay=0.01, page_out=True)
    for _ in range(5):
        grads = [torch.randn_like(w) for w in start]
        for p, q, g in zip(resident_p, paged_p, grads):
            p.grad, q.grad = g, g.clone()
        resident.step()
        paged.step()
    assert len(paged.paged_state()) == 6 and all(is_managed(m) for m in paged.paged_state())
    assert paged.evict_state() == 2 * 4 * sum(a * b for a, b in shapes)
    torch.cuda.synchronize()
    for p, q in zip(resident_p, paged_p):
        assert torch.equal(p, q)
    for p, q in zip(resident_p, paged_p):
        assert torch.equal(resident.state[p]["exp_avg_sq"], paged.state[q]["exp_avg_sq"])   # read back from the host


@pytest.mark.parametrize("chunk_numel", [2**26, 300], ids=["one chunk", "chunks of 300 values"])
def test_paged_moments_are_one_slab_and_one_prefetch_per_chunk(monkeypatch, chunk_numel):
    # The paging decision and the CUDA calls stood in for on the CPU (tests above run them on a GPU):
    # the paged moments are views of one slab, each chunk's state is prefetched (and paged out) as one
    # range, and the updates stay torch.optim.AdamW's to the bit, through a state-dict round trip too.
    slabs, calls = [], []
    monkeypatch.setattr(qlora.paged_adamw, "UPDATE_CHUNK_NUMEL", chunk_numel)
    monkeypatch.setattr(qlora.paged_adamw, "managed_zeros", lambda shape, device: slabs.append(torch.zeros(shape))
                        or slabs[-1])
    monkeypatch.setattr(qlora.paged_adamw, "prefetch", lambda t: calls.append(("in", t.data_ptr(), t.numel())))
    monkeypatch.setattr(qlora.paged_adamw, "page_out", lambda t: calls.append(("out", t.data_ptr(), t.numel())))
    monkeypatch.setattr(PagedAdamW, "_is_paged", lambda self, t: t.numel() >= 64)   # the three weights
    ours_model, ref_model = _tiny_model(), _tiny_model()
    ours = PagedAdamW(_groups(ours_model), lr=1e-2, weight_decay=0.01, page_out=True)
    ref = torch.optim.AdamW(_groups(ref_model), lr=1e-2, weight_decay=0.01, foreach=False)
    _train(ours_model, ours, 3, seed=1)
    _train(ref_model, ref, 3, seed=1)
    assert len(slabs) == 1 and slabs[0].numel() == 2 * (128 + 256 + 64)
    # Groups of one paged weight each (128, 256, 64 values; m and v back to back): one range per
    # group and step, in and out; the 300-value chunks split nothing that is paged.
    base = slabs[0].data_ptr()
    per_step = [(d, base + 4 * a, n) for a, n in [(0, 256), (256, 512), (768, 128)] for d in ("in", "out")]
    assert calls == per_step * 3
    for p in ours_model.parameters():
        if p.requires_grad:
            for key in ("exp_avg", "exp_avg_sq"):
                in_slab = ours.state[p][key].untyped_storage().data_ptr() == slabs[0].untyped_storage().data_ptr()
                assert in_slab == (p.numel() >= 64)
    restored_model = copy.deepcopy(ours_model)
    restored = PagedAdamW(_groups(restored_model), lr=1e-2, weight_decay=0.01)
    restored.load_state_dict(ours.state_dict())
    assert len(slabs) == 2
    _train(restored_model, restored, 2, seed=2)
    _train(ref_model, ref, 2, seed=2)
    for p, p_ref in zip(restored_model.parameters(), ref_model.parameters()):
        assert torch.equal(p, p_ref)
