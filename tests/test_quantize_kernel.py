"""kernels/quantize.py (NF4 quantization in Triton) against its reference qlora.nf4.quantize_nf4, bit for
bit, under TRITON_INTERPRET=1 at odd sizes; and Linear4bit.from_weight on the kernel path."""

import pytest
import torch

import kernels.common
from kernels.common import INTERPRET
from kernels.quantize import quantize_nf4_triton
from qlora.linear4bit import Linear4bit
from qlora.nf4 import code_midpoints, nf4_code, quantize_nf4

pytestmark = pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(),
                                reason="Triton kernels need a GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MIDPOINTS = code_midpoints(nf4_code(DEVICE))


@pytest.mark.parametrize("shape", [(1,), (3,), (63,), (64,), (65,), (7, 9), (33, 100), (130, 71), (71 * 8, 73)],
                         ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("blocksize", [64, 256])
def test_bytes_and_absmax_equal_the_reference(shape, dtype, blocksize):
    torch.manual_seed(hash((shape, str(dtype), blocksize)) % 2**31)
    w = (torch.randn(shape) * torch.rand(shape[:1] + (1,) * (len(shape) - 1)) * 0.1).to(dtype).to(DEVICE)
    w.view(-1)[0] = 0.0
    if w.numel() > blocksize:                      # an all-zero block and values on both clamps
        w.view(-1)[blocksize:2 * blocksize] = 0.0
    packed, state = quantize_nf4(w, blocksize=blocksize, double_quant=False)
    got_packed, got_absmax, bad = quantize_nf4_triton(w.contiguous(), MIDPOINTS, blocksize, blocks_per_program=4)
    assert torch.equal(got_packed, packed), f"{(got_packed != packed).sum().item()} bytes differ"
    assert torch.equal(got_absmax, state.absmax)
    assert bad.item() == 0


def test_values_on_the_midpoints_go_to_the_lower_level():
    # s exactly on a midpoint: bucketize puts it in the lower bucket; the kernel counts midpoints < s.
    absmax = 1.0
    w = torch.cat([MIDPOINTS.cpu(), torch.tensor([absmax])]).to(DEVICE)    # 16 values, absmax 1
    packed, _ = quantize_nf4(w, blocksize=64, double_quant=False)
    assert torch.equal(quantize_nf4_triton(w, MIDPOINTS, 64)[0], packed)


def test_non_finite_values_are_counted():
    w = torch.zeros(300, device=DEVICE)
    w[5], w[150], w[299] = float("nan"), float("inf"), -float("inf")
    assert quantize_nf4_triton(w, MIDPOINTS, 64)[2].item() == 3


@pytest.mark.parametrize("shape, chunk_numel", [((96, 64), 1000), ((37, 50), 64), ((5, 3000), 1), ((7, 9), 10**6)])
def test_from_weight_on_the_kernel_path_equals_the_reference_path(monkeypatch, shape, chunk_numel):
    weight = torch.randn(shape, dtype=torch.bfloat16)
    monkeypatch.setattr(kernels.common, "KERNELS", "0")
    ref = Linear4bit.from_weight(weight, chunk_numel=chunk_numel, device=DEVICE)
    monkeypatch.setattr(kernels.common, "KERNELS", "1")
    got = Linear4bit.from_weight(weight, chunk_numel=chunk_numel, device=DEVICE)
    for name, buffer in ref.named_buffers():
        assert torch.equal(getattr(got, name), buffer), name


def test_from_weight_on_the_kernel_path_refuses_nan(monkeypatch):
    weight = torch.randn(8, 64)
    weight[3, 7] = float("nan")
    monkeypatch.setattr(kernels.common, "KERNELS", "1")
    with pytest.raises(ValueError, match="1 NaN/Inf value"):
        Linear4bit.from_weight(weight, device=DEVICE)
