"""4-bit NormalFloat (NF4) quantization with double quantization, in plain PyTorch.

This is section 3 of the QLoRA paper (Dettmers et al. 2023, arXiv 2305.14314) written as tensor ops:

* NF4 (section 3, "4-bit NormalFloat Quantization"): 16 levels placed at quantiles of N(0, 1),
  so that for normally distributed weights every level is used about equally often.
* Block-wise absmax scaling (eq. 1-2): the weight is cut into blocks of `blocksize` values; each
  block is divided by its largest magnitude (its `absmax`) so it lands in [-1, 1], and each value
  is replaced by the index of the nearest code-book level. Two 4-bit indices share a byte.
* Double quantization (section 3, "Double Quantization"): the fp32 absmax of every block is itself
  quantized to 8 bits (blocks of 256, after subtracting their mean), cutting the scale overhead
  from 32/64 = 0.5 to 8/64 + 32/(64*256) = 0.127 bits per parameter.

Every detail (nibble order, rounding, the 8-bit code) follows bitsandbytes 0.50 so that the bytes
are identical; tests/test_nf4.py checks that bit for bit.
"""

import math
from dataclasses import dataclass, replace
from functools import lru_cache

import torch

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ABSMAX_BLOCKSIZE = 256  # blocksize of the second-level (double) quantization, as in the paper


# ----------------------------------------------------------------------------- code books

@lru_cache(maxsize=None)
def _nf4_code_cpu() -> torch.Tensor:
    # Paper section 3: estimate 2^k + 1 quantiles of N(0, 1) and normalise to [-1, 1]. To get an
    # exact zero, the negative and positive halves are built separately: 8 levels from the
    # quantiles of [delta, 0.5) for the positive side, 7 for the negative side, plus 0. The outer
    # quantile is offset = 0.9677083 (= 1/2 (1/(2*15) + 1/(2*16)) mirrored), as in bitsandbytes.
    # The probabilities are float32 (torch.linspace) and the quantiles float64, like bitsandbytes'
    # scipy-based generator, so the float32 result is identical to its table.
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())  # 8 values > 0
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())  # 7 values < 0
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float()
    levels = levels.sort().values
    return levels / levels.max()


def nf4_code(device=None) -> torch.Tensor:
    """The 16 NF4 levels (fp32, sorted, in [-1, 1]); the 4-bit value i stands for level i."""
    return _nf4_code_cpu().to(device)


def fp4_code(device=None) -> torch.Tensor:
    """bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit), indexed by the 4-bit pattern."""
    magnitudes = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]  # bit patterns 0b000 .. 0b111
    code = torch.tensor(magnitudes + [-m for m in magnitudes], dtype=torch.float32)
    return (code / 12.0).to(device)


@lru_cache(maxsize=None)
def _dynamic_code_cpu() -> torch.Tensor:
    # The signed 8-bit "dynamic" data type (Dettmers 2015, arXiv 1511.04561) used for the absmax
    # of double quantization: a sign bit, a run of zero bits that sets a decimal exponent
    # 10^-6 .. 10^0, and the remaining bits as a linear fraction in [0.1, 1]. Built exactly as
    # bitsandbytes' create_dynamic_map(signed=True).
    values = []
    for exponent in range(7):
        steps = torch.linspace(0.1, 1, 2**exponent + 1, dtype=torch.float32)
        means = (steps[:-1] + steps[1:]) / 2.0
        scale = 10.0 ** (exponent - 6)
        values += (scale * means).tolist() + (-scale * means).tolist()  # fp32 products, as bnb
    values += [0.0, 1.0]
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_code(device=None) -> torch.Tensor:
    """The 256 levels (fp32, sorted) of the signed 8-bit dynamic code used for absmax values."""
    return _dynamic_code_cpu().to(device)


# ----------------------------------------------------------------------------- the state

@dataclass
class QuantState:
    """What dequantize_nf4 needs besides the packed bytes."""
    absmax: torch.Tensor           # fp32 [n_blocks]; uint8 [n_blocks] codes if double-quantized
    shape: torch.Size              # original shape
    dtype: torch.dtype             # original dtype, also the dtype dequantization returns
    blocksize: int                 # values per absmax block
    code: torch.Tensor             # fp32 [16] code book (NF4 or FP4)
    quant_type: str = "nf4"
    # double quantization: absmax = code2[absmax] * absmax2[block // 256] + offset
    absmax2: torch.Tensor | None = None  # fp32 [ceil(n_blocks / 256)] second-level scales
    code2: torch.Tensor | None = None    # fp32 [256] dynamic 8-bit code
    offset: torch.Tensor | None = None   # fp32 scalar: mean absmax, subtracted before quantizing
    blocksize2: int = ABSMAX_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    def to(self, device) -> "QuantState":
        move = lambda t: None if t is None else t.to(device)
        return replace(self, absmax=move(self.absmax), code=move(self.code), absmax2=move(self.absmax2),
                       code2=move(self.code2), offset=move(self.offset))


# ----------------------------------------------------------------------------- checks

def check_weight(w: torch.Tensor, blocksize: int, finite: bool = True) -> None:
    """Raise a ValueError naming what keeps w from being quantized (finite=False: skip the NaN/Inf scan)."""
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise ValueError(f"cannot quantize dtype {w.dtype}: pass a float32, float16 or bfloat16 tensor")
    if w.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {tuple(w.shape)})")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize {blocksize} is not supported: use one of {BLOCKSIZES}")
    # A NaN or Inf would become its block's absmax and silently turn the whole block into NaN after
    # dequantization, so we refuse the weight instead and name the fix.
    if finite and not torch.isfinite(w).all():
        bad = (~torch.isfinite(w)).sum().item()
        raise ValueError(f"weight has {bad} NaN/Inf value(s): fix or drop them before quantizing")


# ----------------------------------------------------------------------------- block-wise scaling

def _blockwise_absmax_scale(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: fp32 [n] -> (x / absmax of its block, clamped to [-1, 1]) [n], absmax fp32 [n_blocks]."""
    n = x.numel()
    n_blocks = math.ceil(n / blocksize)
    padded = torch.nn.functional.pad(x, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    absmax = padded.abs().amax(dim=1)                               # (n_blocks,)
    safe = absmax.clamp(min=1e-38)                                   # an all-zero block stays zero
    scaled = (padded * (1.0 / safe).unsqueeze(1)).view(-1)[:n]      # (n,)
    if n % blocksize:
        # bitsandbytes divides (rather than multiplies by the reciprocal) in the last, partial
        # block; the two can differ in the last bit, so we do the same.
        tail = n - n % blocksize
        scaled[tail:] = x[tail:] / safe[-1]
    return scaled.clamp(-1, 1), absmax


def code_midpoints(sorted_code: torch.Tensor) -> torch.Tensor:
    """fp32 [15]: the points halfway between neighbouring levels of a sorted code book."""
    return (sorted_code[:-1] + sorted_code[1:]) / 2


def _nearest_index(scaled: torch.Tensor, sorted_code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level of a sorted code book (ties go to the lower level)."""
    return torch.bucketize(scaled, code_midpoints(sorted_code))


# ----------------------------------------------------------------------------- 8-bit absmax codes

@lru_cache(maxsize=None)
def _dynamic_code_lookup_cpu() -> torch.Tensor:
    # bitsandbytes (CPU) does not search the 256-level code for every value: it first rounds the
    # value in [-1, 1] onto a grid of 65536 points and reads the nearest level of that grid point
    # from a table. We build the same table so that our absmax codes are byte-identical to theirs.
    grid = torch.arange(65536, dtype=torch.float64) / 32767.5 - 1
    code = _dynamic_code_cpu().double()
    return (grid.unsqueeze(1) - code.unsqueeze(0)).abs().argmin(dim=1).to(torch.uint8)


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = ABSMAX_BLOCKSIZE):
    """fp32 [n] -> (uint8 codes [n] of the dynamic code, fp32 absmax [ceil(n / blocksize)])."""
    n = x.numel()
    n_blocks = math.ceil(n / blocksize)
    padded = torch.nn.functional.pad(x, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    scaled = (padded * (1.0 / absmax).unsqueeze(1)).view(-1)[:n]
    # An all-zero block gives 0 * inf = NaN; bitsandbytes stores code 0 there (it is multiplied
    # by the block's absmax, 0, when dequantized), so we map NaN to the first grid point.
    scaled = torch.nan_to_num(scaled, nan=-1.0)
    grid_index = torch.floor((scaled + 1) * 32767.5 + 0.5).long().clamp(0, 65535)
    codes = _dynamic_code_lookup_cpu().to(x.device)[grid_index]
    return codes, absmax


def dequantize_blockwise_8bit(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                              blocksize: int = ABSMAX_BLOCKSIZE) -> torch.Tensor:
    """uint8 codes [n] -> fp32 [n]: code[codes] * absmax of the block."""
    block = torch.arange(codes.numel(), device=codes.device) // blocksize
    return code[codes.long()] * absmax[block]


# ----------------------------------------------------------------------------- 4-bit

def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                 quant_type: str = "nf4") -> tuple[torch.Tensor, QuantState]:
    """Quantize a float tensor of any shape to packed 4-bit codes.

    Returns uint8 [ceil(numel / 2)] (first value in the high nibble, as bitsandbytes) and the
    QuantState. quant_type "fp4" uses bitsandbytes' FP4 code instead, for comparison.
    """
    check_weight(w, blocksize)
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    code = nf4_code(w.device) if quant_type == "nf4" else fp4_code(w.device)

    scaled, absmax = _blockwise_absmax_scale(w.reshape(-1).float(), blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))  # an odd count: the last nibble codes 0.0
    order = torch.argsort(code)                         # NF4 is sorted already; FP4 is not
    q = order[_nearest_index(scaled, code[order])].to(torch.uint8)
    packed = (q[0::2] << 4) | q[1::2]                   # two 4-bit codes per byte

    state = QuantState(absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize,
                       code=code, quant_type=quant_type)
    return packed, double_quantize(state) if double_quant else state


def double_quantize(state: QuantState) -> QuantState:
    """The state with its fp32 absmax quantized again (paper section 3, "Double Quantization"): the
    mean is subtracted and the rest stored as 8-bit dynamic codes in blocks of 256, one fp32 scale each."""
    offset = state.absmax.mean()
    codes, absmax2 = quantize_blockwise_8bit(state.absmax - offset)
    return replace(state, absmax=codes, absmax2=absmax2, code2=dynamic_code(state.absmax.device), offset=offset)


def dequantize_absmax(state: QuantState) -> torch.Tensor:
    """The fp32 absmax of every block [n_blocks], undoing double quantization if it was used."""
    if not state.double_quant:
        return state.absmax
    scales = dequantize_blockwise_8bit(state.absmax, state.absmax2, state.code2, state.blocksize2)
    return scales + state.offset


def dequantize_nf4(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """Packed 4-bit codes + QuantState -> tensor of state.shape and state.dtype."""
    n = math.prod(state.shape)
    if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        raise ValueError(f"packed must be uint8 with {(n + 1) // 2} bytes for shape {tuple(state.shape)}, "
                         f"got {packed.dtype} with {packed.numel()}")
    packed = packed.reshape(-1)
    q = torch.stack([packed >> 4, packed & 0xF], dim=1).view(-1)[:n]   # (n,) high nibble first
    absmax = dequantize_absmax(state)
    block = torch.arange(n, device=packed.device) // state.blocksize
    values = state.code[q.long()] * absmax[block]                     # fp32, like bitsandbytes
    return values.to(state.dtype).view(state.shape)


# ----------------------------------------------------------------------------- memory accounting

def bits_per_parameter(blocksize: int = 64, double_quant: bool = True,
                       blocksize2: int = ABSMAX_BLOCKSIZE) -> float:
    """Storage per weight in bits: 4 for the code plus the scale overhead (paper section 3)."""
    if double_quant:
        overhead = 8 / blocksize + 32 / (blocksize * blocksize2)  # 8-bit absmax + fp32 per 256
    else:
        overhead = 32 / blocksize                                # one fp32 absmax per block
    return 4 + overhead


def quantization_error(w: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64) -> float:
    """Mean squared error of a quantize/dequantize round trip, in float64."""
    packed, state = quantize_nf4(w, blocksize=blocksize, double_quant=False, quant_type=quant_type)
    return (dequantize_nf4(packed, state).double() - w.double()).pow(2).mean().item()


def _demo() -> None:
    torch.manual_seed(0)
    w = torch.randn(4096, 4096)
    print("NF4 code book:", " ".join(f"{v:+.4f}" for v in nf4_code().tolist()))
    print(f"round-trip MSE on N(0,1), blocksize 64:  NF4 {quantization_error(w, 'nf4'):.5f}   "
          f"FP4 {quantization_error(w, 'fp4'):.5f}")
    for dq in (False, True):
        bits = bits_per_parameter(64, dq)
        print(f"bits per parameter (double_quant={dq!s:5}): {bits:.3f}  (overhead {bits - 4:.3f}); "
              f"a 7B model: {7e9 * bits / 8 / 2**30:.2f} GiB")


if __name__ == "__main__":
    _demo()
