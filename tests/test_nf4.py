"""NF4 / FP4 quantization against bitsandbytes 0.50 on the CPU, bit for bit."""

import pytest
import torch

bnb_functional = pytest.importorskip("bitsandbytes.functional")

from qlora.nf4 import (bits_per_parameter, dequantize_nf4, dynamic_code, fp4_code, nf4_code,
                       quantization_error, quantize_nf4)

SHAPES = [(1,), (2,), (3,), (63,), (64,), (65,), (255,), (257,), (7, 9), (33, 1000), (3, 5, 7),
          (128, 128), (64 * 256 * 3 + 5,), (11, 64 * 256 + 1)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _assert_same_as_bnb(w, blocksize, double_quant, quant_type):
    packed, state = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant, quant_type=quant_type)
    ref_packed, ref_state = bnb_functional.quantize_4bit(
        w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)
    assert torch.equal(packed, ref_packed.view(-1)), "packed 4-bit codes differ"
    assert torch.equal(state.absmax, ref_state.absmax), "absmax (or its 8-bit codes) differ"
    if double_quant:
        assert torch.equal(state.absmax2, ref_state.state2.absmax), "second-level scales differ"
        assert torch.equal(state.code2, ref_state.state2.code), "8-bit absmax code differs"
        assert torch.equal(state.offset, ref_state.offset), "absmax offset differs"
    out = dequantize_nf4(packed, state)
    ref_out = bnb_functional.dequantize_4bit(ref_packed, ref_state)
    assert out.shape == w.shape and out.dtype == w.dtype
    assert torch.equal(out, ref_out.view(w.shape)), "dequantized values differ"


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_and_dequantize_equal_bitsandbytes(shape, dtype, double_quant, quant_type):
    torch.manual_seed(hash((shape, str(dtype))) % 2**31)
    _assert_same_as_bnb(torch.randn(shape, dtype=dtype) * 0.02, 64, double_quant, quant_type)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_llama_mlp_matrix_equals_bitsandbytes(dtype):
    torch.manual_seed(0)
    _assert_same_as_bnb(torch.randn(4096, 11008, dtype=dtype) * 0.02, 64, True, "nf4")


@pytest.mark.parametrize("blocksize", [32, 128, 256, 1024, 4096])
def test_other_blocksizes_equal_bitsandbytes(blocksize):
    torch.manual_seed(blocksize)
    _assert_same_as_bnb(torch.randn(70, 300, dtype=torch.bfloat16), blocksize, True, "nf4")


def test_zero_blocks_and_constant_tensor_equal_bitsandbytes():
    w = torch.zeros(4, 64 * 300)
    w[1, 5] = 3.0
    _assert_same_as_bnb(w, 64, True, "nf4")
    _assert_same_as_bnb(torch.full((3, 64), 0.5), 64, True, "nf4")


def test_code_books_match_bitsandbytes_tables():
    # NF4 is derived in code from normal quantiles; bitsandbytes hard-codes the table.
    assert torch.equal(nf4_code(), bnb_functional.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(fp4_code(), bnb_functional.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(dynamic_code(), bnb_functional.create_dynamic_map(signed=True))


def test_nf4_round_trip_error_is_below_fp4_on_normal_data():
    # The paper's claim (section 3, Table 2 context): NF4 fits normally distributed weights better.
    torch.manual_seed(0)
    w = torch.randn(1024, 1024)
    nf4, fp4 = quantization_error(w, "nf4"), quantization_error(w, "fp4")
    print(f"\nround-trip MSE on N(0,1), blocksize 64: NF4 {nf4:.5f}  FP4 {fp4:.5f}")
    assert nf4 < fp4


def test_bits_per_parameter_matches_the_paper():
    assert bits_per_parameter(64, double_quant=False) == pytest.approx(4.5)
    assert bits_per_parameter(64, double_quant=True) - 4 == pytest.approx(0.127, abs=5e-4)


@pytest.mark.parametrize("bad, match", [
    (torch.arange(10), "dtype"),
    (torch.ones(10, dtype=torch.float64), "dtype"),
    (torch.empty(0, 4), "empty"),
    (torch.tensor([1.0, float("nan")]), "NaN"),
    (torch.tensor([1.0, float("inf")]), "NaN/Inf"),
])
def test_bad_weights_raise_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        quantize_nf4(bad)


def test_bad_blocksize_and_quant_type_raise():
    with pytest.raises(ValueError, match="blocksize 100"):
        quantize_nf4(torch.randn(128), blocksize=100)
    with pytest.raises(ValueError, match="quant_type"):
        quantize_nf4(torch.randn(128), quant_type="int4")


def test_dequantize_rejects_bytes_of_the_wrong_size():
    packed, state = quantize_nf4(torch.randn(10, 10))
    with pytest.raises(ValueError, match="50 bytes"):
        dequantize_nf4(packed[:-1], state)
