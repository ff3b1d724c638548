"""GPU benchmark of the NF4 kernels against bitsandbytes and bf16 cuBLAS, in one run.

    python -m bench.kernels [--tokens 4096] [--json results.json]

For each Llama weight shape it times: dequantization (ours vs bnb.functional.dequantize_4bit),
decode with 1, 4 and 16 rows (our GEMV vs bnb.matmul_4bit vs bf16 F.linear), and the training path
for `--tokens` rows: y = x @ W^T, grad_x = grad_y @ W and forward + backward through autograd (our
Triton dequant + cuBLAS, bnb.matmul_4bit, bf16 cuBLAS on a dense weight), with the ratio ours / bf16.
The copy and bf16 matmul ceilings are measured in the same run. Weights are quantized once by
bitsandbytes and shared by both sides (the bytes are the same format); each timing rotates over
enough weights (> 256 MB) that they do not fit in the 50 MB L2, and triton's do_bench also flushes
L2 before every call. Times are medians.
"""

import argparse
import json
import math
import sys
import time
import traceback

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from kernels import NF4Matmul, dequantize_nf4_triton, gemv_nf4, matmul_nf4, matmul_nf4_grad
from qlora.atomic import write_text
from qlora.nf4 import QuantState, dequantize_nf4

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]   # [out, in]
ROTATE_BYTES = 256 * 2**20    # each timing cycles through at least this many bytes of weights
DECODE_ROWS = (1, 4, 16)


def median_us(fn, rotate: int) -> float:
    """Median time of fn(i) in microseconds, i cycling over range(rotate)."""
    counter = iter(range(10**9))
    return 1e3 * do_bench(lambda: fn(next(counter) % rotate), warmup=50, rep=300, return_mode="median")


def ceilings() -> dict:
    n = 2**30                                             # 1 GiB copy: bytes read + bytes written
    src, dst = torch.randn(n // 4, device="cuda"), torch.empty(n // 4, device="cuda")
    copy_s = do_bench(lambda: dst.copy_(src), return_mode="median") / 1e3
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mm_s = do_bench(lambda: a @ b, return_mode="median") / 1e3
    del src, dst
    return {"copy_TBps": 2 * n / copy_s / 1e12, "matmul_bf16_8192_TFLOPs": 2 * 8192**3 / mm_s / 1e12}


def bnb_quantize(bnb_f, out_f: int, in_f: int, count: int):
    """`count` random weights quantized by bitsandbytes -> list of (bnb packed, bnb state, our state)."""
    weights = []
    for _ in range(count):
        w = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16) * 0.02
        packed, qs = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        ours = QuantState(absmax=qs.absmax, shape=torch.Size((out_f, in_f)), dtype=torch.bfloat16, blocksize=64,
                          code=qs.code, absmax2=qs.state2.absmax, code2=qs.state2.code, offset=qs.offset,
                          blocksize2=qs.state2.blocksize)
        weights.append((packed, qs, ours))
    return weights


def check(weights, bnb_f, bnb, tokens: int) -> dict:
    """Correctness on the GPU for one weight: exactness of dequant, relative errors of the products."""
    packed, qs, ours = weights[0]
    ref = dequantize_nf4(packed.view(-1), ours)                           # pure PyTorch reference
    deq = dequantize_nf4_triton(packed.view(-1), ours, torch.bfloat16)
    bnb_deq = bnb_f.dequantize_4bit(packed, qs)
    w64 = ref.double()
    rel = lambda out, exact: ((out.double() - exact).norm() / exact.norm()).item()
    x = torch.randn(tokens, ours.shape[1], device="cuda", dtype=torch.bfloat16)
    gy = torch.randn(tokens, ours.shape[0], device="cuda", dtype=torch.bfloat16)
    x1 = x[:1].contiguous()
    return {"dequant_equals_reference": torch.equal(deq, ref), "dequant_equals_bnb": torch.equal(deq, bnb_deq),
            "matmul_rel_err": rel(matmul_nf4(x, packed.view(-1), ours), x.double() @ w64.T),
            "matmul_grad_rel_err": rel(matmul_nf4_grad(gy, packed.view(-1), ours), gy.double() @ w64),
            "gemv_rel_err": rel(gemv_nf4(x1, packed.view(-1), ours), x1.double() @ w64.T),
            "gemv16_rel_err": rel(gemv_nf4(x[:16].contiguous(), packed.view(-1), ours), x[:16].double() @ w64.T),
            "bnb_matmul_rel_err": rel(bnb.matmul_4bit(x, packed.t(), qs), x.double() @ w64.T)}


def graph_us(fn, rotate: int, replays: int = 20) -> float:
    """Per-call time of fn(0), ..., fn(rotate - 1) captured back to back in one CUDA graph: launch
    gaps as in a graphed decode step, weights still rotated beyond L2. On the CPU (a smoke run under
    the interpreter) there are no graphs: one call, and 1.0."""
    if not torch.cuda.is_available():
        fn(0)
        return 1.0
    for i in range(rotate):
        fn(i)                                             # compile / autotune outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(rotate):
            fn(i)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return 1e3 * start.elapsed_time(end) / (replays * rotate)


def host_us(fn, rotate: int, calls: int = 200) -> float:
    """Host time per call of fn (what an eager step pays before the GPU sees the kernel)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(calls):
        fn(i % rotate)
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return 1e6 * (t1 - t0) / calls


def bench_shape(out_f: int, in_f: int, tokens: int, bnb_f, bnb, decode_only: bool = False) -> dict:
    n = out_f * in_f
    packed_bytes = n // 2 + n // 64 + 4 * math.ceil(n / 64 / 256)      # codes + u8 absmax + fp32 absmax2
    count = max(2, math.ceil(ROTATE_BYTES / packed_bytes))
    weights = bnb_quantize(bnb_f, out_f, in_f, count)
    r = {"shape": f"{out_f}x{in_f}", "rotate": count, **check(weights, bnb_f, bnb, tokens)}
    P = lambda i: weights[i][0].view(-1)
    S = lambda i: weights[i][2]

    if decode_only:
        return bench_decode(r, weights, packed_bytes, bnb)
    # dequantization: packed + absmax read, bf16 written
    r["dequant_us"] = median_us(lambda i: dequantize_nf4_triton(P(i), S(i), torch.bfloat16), count)
    r["bnb_dequant_us"] = median_us(lambda i: bnb_f.dequantize_4bit(weights[i][0], weights[i][1]), count)
    moved = packed_bytes + 2 * n
    r["dequant_TBps"], r["bnb_dequant_TBps"] = moved / r["dequant_us"] / 1e6, moved / r["bnb_dequant_us"] / 1e6

    bench_decode(r, weights, packed_bytes, bnb)
    dense_count = max(2, math.ceil(ROTATE_BYTES / (2 * n)))
    dense = [torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16) for _ in range(dense_count)]

    # training path: forward, input gradient, and both through autograd (what Linear4bit runs)
    x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
    gy = torch.randn(tokens, out_f, device="cuda", dtype=torch.bfloat16)
    xg = x.clone().requires_grad_()
    grad = lambda y: torch.autograd.grad(y, xg, gy)
    r["fwd_us"] = median_us(lambda i: matmul_nf4(x, P(i), S(i)), count)
    r["bnb_fwd_us"] = median_us(lambda i: bnb.matmul_4bit(x, weights[i][0].t(), weights[i][1]), count)
    r["dense_fwd_us"] = median_us(lambda i: F.linear(x, dense[i]), dense_count)
    r["grad_us"] = median_us(lambda i: matmul_nf4_grad(gy, P(i), S(i)), count)
    r["dense_grad_us"] = median_us(lambda i: gy @ dense[i], dense_count)
    r["fwdbwd_us"] = median_us(lambda i: grad(NF4Matmul.apply(xg, None, P(i), S(i))), count)
    r["bnb_fwdbwd_us"] = median_us(lambda i: grad(bnb.matmul_4bit(xg, weights[i][0].t(), weights[i][1])), count)
    r["dense_fwdbwd_us"] = median_us(lambda i: grad(F.linear(xg, dense[i])), dense_count)
    flops = 2 * tokens * n
    for key in ("fwd", "bnb_fwd", "dense_fwd", "grad", "dense_grad"):
        r[key + "_TFLOPs"] = flops / r[key + "_us"] / 1e6
    for key in ("fwd", "grad", "fwdbwd"):
        r[key + "_vs_bf16"] = r[key + "_us"] / r["dense_" + key + "_us"]
    return r


def bench_decode(r: dict, weights, packed_bytes: int, bnb) -> dict:
    """Decode with 1, 4 and 16 rows: our GEMV vs bnb.matmul_4bit (its gemv_4bit at 1 row; more rows
    dequantize + matmul) vs bf16 F.linear; do_bench medians and, for 1 row, CUDA-graph replays."""
    out_f, in_f = weights[0][2].shape
    count = len(weights)
    P = lambda i: weights[i][0].view(-1)
    S = lambda i: weights[i][2]
    dense_count = max(2, math.ceil(ROTATE_BYTES / (2 * out_f * in_f)))
    dense = [torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16) for _ in range(dense_count)]
    for m in DECODE_ROWS:
        xm = torch.randn(m, in_f, device="cuda", dtype=torch.bfloat16)
        ours = lambda i: gemv_nf4(xm, P(i), S(i))
        peer = lambda i: bnb.matmul_4bit(xm, weights[i][0].t(), weights[i][1])
        r[f"gemv{m}_us"] = median_us(ours, count)
        r[f"bnb_gemv{m}_us"] = median_us(peer, count)
        r[f"dense_gemv{m}_us"] = median_us(lambda i: F.linear(xm, dense[i]), dense_count)
        r[f"gemv{m}_graph_us"] = graph_us(ours, count)
        r[f"bnb_gemv{m}_graph_us"] = graph_us(peer, count)
        r[f"dense_gemv{m}_graph_us"] = graph_us(lambda i: F.linear(xm, dense[i]), dense_count)
        r[f"gemv{m}_host_us"] = host_us(ours, count)          # Python + launch time of one call
        r[f"bnb_gemv{m}_host_us"] = host_us(peer, count)
    r["gemv1_TBps"] = (packed_bytes + 2 * (in_f + out_f)) / r["gemv1_us"] / 1e6
    r["gemv1_graph_TBps"] = (packed_bytes + 2 * (in_f + out_f)) / r["gemv1_graph_us"] / 1e6
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="rows of x for the training-path products")
    parser.add_argument("--json", help="write all numbers to this file")
    parser.add_argument("--decode_only", action="store_true", help="only the decode GEMV rows (1, 4, 16)")
    parser.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES), help="out x in, comma-separated")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench.kernels needs a CUDA GPU")
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_f

    torch.manual_seed(0)
    info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "bitsandbytes": bnb.__version__, **ceilings()}
    print(json.dumps(info), flush=True)
    rows = []
    for out_f, in_f in [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]:
        try:
            rows.append(bench_shape(out_f, in_f, args.tokens, bnb_f, bnb, args.decode_only))
            print(json.dumps(rows[-1]), flush=True)
        except Exception:
            traceback.print_exc()
        torch.cuda.empty_cache()
    if args.json:
        write_text(args.json, json.dumps({"info": info, "rows": rows}, indent=1))

    print(f"\ncopy {info['copy_TBps']:.2f} TB/s, bf16 matmul 8192^3 {info['matmul_bf16_8192_TFLOPs']:.0f} TFLOP/s")
    print("CUDA-graph replays, us per call (do_bench medians / host us per call in the JSON):")
    print("| weight | " + " | ".join(f"b{m} ours / bnb / bf16" for m in DECODE_ROWS) + " | b1 TB/s | bnb / ours b1 | "
          "b16 / b1 |")
    for r in rows:
        cells = " | ".join(f"{r[f'gemv{m}_graph_us']:.1f} / {r[f'bnb_gemv{m}_graph_us']:.1f} / "
                           f"{r[f'dense_gemv{m}_graph_us']:.1f}" for m in DECODE_ROWS)
        print(f"| {r['shape']} | {cells} | {r['gemv1_graph_TBps']:.2f} | "
              f"{r['bnb_gemv1_graph_us'] / r['gemv1_graph_us']:.2f} | {r['gemv16_graph_us'] / r['gemv1_graph_us']:.2f} |")
    print("host us per call, ours / bnb: " + ", ".join(
        f"{r['shape']} " + " ".join(f"b{m} {r[f'gemv{m}_host_us']:.0f}/{r[f'bnb_gemv{m}_host_us']:.0f}" for m in DECODE_ROWS)
        for r in rows))
    if args.decode_only:
        return
    print("| weight | dequant us (TB/s) | bnb dequant us (TB/s) | "
          + " | ".join(f"b{m} gemv / bnb / bf16 us" for m in DECODE_ROWS) + " | b1 gemv TB/s |")
    for r in rows:
        decode = " | ".join(f"{r[f'gemv{m}_us']:.1f} / {r[f'bnb_gemv{m}_us']:.1f} / {r[f'dense_gemv{m}_us']:.1f}"
                            for m in DECODE_ROWS)
        print(f"| {r['shape']} | {r['dequant_us']:.1f} ({r['dequant_TBps']:.2f}) | {r['bnb_dequant_us']:.1f} "
              f"({r['bnb_dequant_TBps']:.2f}) | {decode} | {r['gemv1_TBps']:.2f} |")
    print(f"\n{args.tokens} rows; ours = Triton dequant + cuBLAS")
    print("| weight | fwd ours / bnb / bf16 us | ours/bf16 | grad_x ours / bf16 us | ours/bf16 | "
          "fwd+bwd ours / bnb / bf16 us | ours/bf16 |")
    for r in rows:
        print(f"| {r['shape']} | {r['fwd_us']:.0f} / {r['bnb_fwd_us']:.0f} / {r['dense_fwd_us']:.0f} | "
              f"{r['fwd_vs_bf16']:.3f} | {r['grad_us']:.0f} / {r['dense_grad_us']:.0f} | {r['grad_vs_bf16']:.3f} | "
              f"{r['fwdbwd_us']:.0f} / {r['bnb_fwdbwd_us']:.0f} / {r['dense_fwdbwd_us']:.0f} | "
              f"{r['fwdbwd_vs_bf16']:.3f} |")


if __name__ == "__main__":
    main()
