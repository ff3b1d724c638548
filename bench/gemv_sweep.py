"""GPU sweep of the decode GEMV's variants and tile configs (kernels/gemv.py), with bitsandbytes beside.

    python -m bench.gemv_sweep --json out/gemv_sweep.json

For each weight shape and rows of x it launches the kernels directly (no autotuner) with every
candidate config, checks each result against the float64 product (elementwise, within the rounding
bound the tests use), and times it the way bench/kernels.py does: do_bench medians with L2 flushed,
rotating over > 256 MB of weights. The best configs are then timed again together with bnb's
gemv_4bit / matmul_4bit and a bf16 F.linear, also as CUDA-graph replays (one launch after another,
as in the decode step). This is the tool the configs in kernels/gemv.py were picked with.
"""

import argparse
import json
import os
import math
import sys
import traceback
from dataclasses import replace

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

import kernels.gemv as G
from bench.kernels import ROTATE_BYTES, ceilings, graph_us
from kernels.dequant import kernel_args
from qlora.nf4 import QuantState, dequantize_nf4

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"   # cpu: a dry run under TRITON_INTERPRET=1

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (1024, 4096), (4096, 14336)]
FALCON = [(4672, 4544), (18176, 4544), (4544, 18176)]     # non-power-of-two: partial tiles in N and K
# (BLOCK_N, BLOCK_K, num_warps, num_stages)
FMA_CANDIDATES = [(1, 4096, 4, 1), (2, 2048, 4, 1), (2, 4096, 4, 1), (4, 1024, 4, 1), (4, 2048, 4, 1),
                  (4, 4096, 8, 1), (8, 1024, 4, 1), (8, 2048, 8, 1), (2, 2048, 2, 1), (4, 1024, 2, 1),
                  (2, 2048, 4, 2), (4, 1024, 4, 2), (16, 512, 4, 1), (1, 2048, 2, 1)]
DOT_CANDIDATES = [(16, 256, 4, 2), (32, 256, 4, 2), (64, 256, 4, 2), (32, 512, 4, 2), (64, 512, 8, 2),
                  (16, 512, 4, 3), (32, 256, 4, 3), (64, 128, 4, 3), (128, 256, 8, 2), (32, 256, 2, 2)]


def launch(kind, cfg, x, packed, state, y):
    N, K = state.shape
    M = x.shape[0]
    bn, bk, warps, stages = cfg
    args = kernel_args(packed, state)
    meta = dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    grid = (triton.cdiv(N, bn),)
    consts = (state.blocksize, state.blocksize2, state.double_quant)
    if kind == "fma":     # as gemv_nf4 calls them
        G._gemv_fma_kernel.fn[grid](x, args[0].view(torch.int32), *args[1:], y, M, N, K, K // 8, x.stride(0),
                                    y.stride(0), *consts, triton.next_power_of_2(M), **meta)
    else:
        xp = x.view(torch.int32)
        G._gemv_dot_kernel.fn[grid](xp, *args, y, M, N, K, K // 2, xp.stride(0), y.stride(0), *consts, 16, **meta)
    return y


def worst_vs_bound(y, x, w, rounded_operands):
    """max |y - exact| / bound over the elements, the bound of tests/test_kernels.py::error_bound."""
    x, w = x.double(), w.double()
    exact = x @ w.T
    u = torch.finfo(y.dtype).eps / 2
    first = (rounded_operands * u * (1 + u) + (x.shape[-1] + 2) * 2.0**-24) * (x.abs() @ w.abs().T)
    v = (exact.abs() + first).clamp(min=torch.finfo(y.dtype).tiny)
    bound = first + torch.exp2(torch.floor(torch.log2(v))) * torch.finfo(y.dtype).eps / 2
    return ((y.double() - exact).abs() / bound).max().item(), ((y.double() - exact).norm() / exact.norm()).item()


def bnb_quantize(bnb_f, out_f, in_f, count):
    """`count` random weights quantized by bitsandbytes -> list of (bnb packed, bnb state, our state)."""
    weights = []
    for _ in range(count):
        w = torch.randn(out_f, in_f, device=DEVICE, dtype=torch.bfloat16) * 0.02
        packed, qs = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        ours = QuantState(absmax=qs.absmax, shape=torch.Size((out_f, in_f)), dtype=torch.bfloat16, blocksize=64,
                          code=qs.code, absmax2=qs.state2.absmax, code2=qs.state2.code, offset=qs.offset,
                          blocksize2=qs.state2.blocksize)
        weights.append((packed, qs, ours))
    return weights


def time_us(fn, rotate, rep=100):
    if DEVICE == "cpu":
        fn(0)
        return 1.0
    counter = iter(range(10**9))
    return 1e3 * do_bench(lambda: fn(next(counter) % rotate), warmup=10, rep=rep, return_mode="median")


def weights_for(bnb_f, N, K):
    n = N * K
    nbytes = n // 2 + n // 64 + 4 * math.ceil(n / 64 / 256)
    count = max(2, math.ceil(ROTATE_BYTES / nbytes)) if DEVICE == "cuda" else 2
    return bnb_quantize(bnb_f, N, K, count), nbytes


def sweep_shape(N, K, bnb_f, bnb, rows_list, out):
    weights, nbytes = weights_for(bnb_f, N, K)
    rotate = len(weights)
    P = lambda i: weights[i][0].view(-1)
    S = lambda i: weights[i][2]
    w0 = dequantize_nf4(P(0), replace(S(0), dtype=torch.float32))      # the fp32 weight the kernels decode
    res = {"shape": f"{N}x{K}", "bytes": nbytes, "rotate": rotate, "runs": []}
    for M in rows_list:
        x = torch.randn(M, K, device=DEVICE, dtype=torch.bfloat16)
        y = torch.empty(M, N, device=DEVICE, dtype=torch.bfloat16)
        variants = [("fma", c) for c in FMA_CANDIDATES] if M <= 4 else []
        variants += [("dot", c) for c in DOT_CANDIDATES] if M >= 2 else []
        for kind, cfg in variants:
            try:
                y.fill_(float("nan"))
                launch(kind, cfg, x, P(0), S(0), y)
                worst, rel = worst_vs_bound(y, x, w0, 0 if kind == "fma" else 1)
                us = time_us(lambda i: launch(kind, cfg, x, P(i), S(i), y), rotate)
                r = dict(M=M, kind=kind, cfg=cfg, us=us, TBps=nbytes / us / 1e6, worst=worst, rel=rel)
            except Exception as e:
                r = dict(M=M, kind=kind, cfg=cfg, error=repr(e)[:300])
            res["runs"].append(r)
            print(json.dumps(r), flush=True)
        # peers, same method
        xm = x
        try:
            res[f"bnb{M}_us"] = time_us(lambda i: bnb.matmul_4bit(xm, weights[i][0].t(), weights[i][1]), rotate)
        except Exception as e:
            res[f"bnb{M}_us"] = None
            print("bnb failed", repr(e)[:200])
        dense_count = max(2, math.ceil(ROTATE_BYTES / (2 * N * K))) if DEVICE == "cuda" else 2
        dense = [torch.randn(N, K, device=DEVICE, dtype=torch.bfloat16) for _ in range(dense_count)]
        res[f"dense{M}_us"] = time_us(lambda i: F.linear(xm, dense[i]), dense_count)
        del dense
        # the best of each kind, again with more repetitions and as graph replays, beside bnb and dense
        ok = [r for r in res["runs"] if r["M"] == M and "us" in r and r["worst"] <= 1]
        best = {}
        for r in ok:
            if r["kind"] not in best or r["us"] < best[r["kind"]]["us"]:
                best[r["kind"]] = r
        for kind, r in best.items():
            fn = lambda i, r=r: launch(r["kind"], r["cfg"], x, P(i), S(i), y)
            r["us_rep300"] = time_us(fn, rotate, rep=300)
            r["graph_us"] = graph_us(fn, rotate)
        try:
            res[f"bnb{M}_graph_us"] = graph_us(lambda i: bnb.matmul_4bit(xm, weights[i][0].t(), weights[i][1]), rotate)
        except Exception as e:
            res[f"bnb{M}_graph_us"] = None
            print("bnb graph failed", repr(e)[:200])
        res[f"best{M}"] = {k: dict(v) for k, v in best.items()}
        print(json.dumps({"shape": res["shape"], "M": M, "best": res[f"best{M}"], "bnb_us": res[f"bnb{M}_us"],
                          "bnb_graph_us": res[f"bnb{M}_graph_us"], "dense_us": res[f"dense{M}_us"]}), flush=True)
    out.append(res)
    del weights
    torch.cuda.empty_cache()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json")
    p.add_argument("--rows", default="1,4,16")
    p.add_argument("--shapes", default="all")
    args = p.parse_args()
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("bench.gemv_sweep needs a CUDA GPU (or TRITON_INTERPRET=1 for a dry run at small --shapes)")
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_f
    torch.manual_seed(0)
    info = {"gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
            "triton": triton.__version__, "bitsandbytes": bnb.__version__, **(ceilings() if DEVICE == "cuda" else {})}
    print(json.dumps(info), flush=True)
    rows = [int(r) for r in args.rows.split(",")]
    shapes = SHAPES + FALCON if args.shapes == "all" else [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    out = []
    for N, K in shapes:
        try:
            falcon = (N, K) in FALCON
            sweep_shape(N, K, bnb_f, bnb, [r for r in rows if r != 4] if falcon else rows, out)
        except Exception:
            traceback.print_exc()
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"info": info, "shapes": out}, f, indent=1)
    print("\n| shape | M | best fma (cfg) us / TB/s / graph us | best dot us / graph us | bnb us / graph us | bf16 us |")
    for res in out:
        for M in rows:
            if f"best{M}" not in res:
                continue
            b = res.get(f"best{M}", {})
            fma, dot = b.get("fma"), b.get("dot")
            f = (f"{fma['cfg']} {fma['us']:.1f} / {fma['TBps']:.2f} / {fma['graph_us']:.1f}" if fma else "-")
            d = (f"{dot['cfg']} {dot['us']:.1f} / {dot['graph_us']:.1f}" if dot else "-")
            bn, bg = res.get(f"bnb{M}_us"), res.get(f"bnb{M}_graph_us")
            print(f"| {res['shape']} | {M} | {f} | {d} | {bn and round(bn, 1)} / {bg and round(bg, 1)} | "
                  f"{res.get(f'dense{M}_us', 0):.1f} |")
    # configs ranked by the geometric mean of time over the big shapes, per kind and M
    for M in rows:
        for kind in ("fma", "dot"):
            score = {}
            for res in out:
                for r in res["runs"]:
                    if r["M"] == M and r["kind"] == kind and "us" in r:
                        score.setdefault(tuple(r["cfg"]), []).append(math.log(r["us"]))
            most = max((len(v) for v in score.values()), default=0)
            full = [(sum(v) / len(v), k) for k, v in score.items() if len(v) == most]
            full.sort()
            print(f"M={M} {kind} ranking:", ", ".join(f"{k} {math.exp(s):.1f}" for s, k in full[:6]))


if __name__ == "__main__":
    main()
