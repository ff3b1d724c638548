"""Decode benchmark (issue #7): batch-1 greedy decoding of a Llama-2-7B-shaped NF4 model, ours beside
transformers + bitsandbytes, in one run.

    python -m bench.decode --json out/bench/decode.json          # GPU: 7B shapes, 128 new tokens
    python -m bench.decode --tiny --json /tmp/decode.json        # the same code at test size, on the CPU

Both sides load one random checkpoint (bench/random_model.py, written once and reused) in NF4 with
double quantization and bf16 compute, and continue the same short prompt by exactly 128 tokens:
ours with llama.generate.generate (no EOS stop), eager and, on a GPU, with the decode step replayed
as a CUDA graph; the peer with generate(do_sample=False, max_new_tokens=128, min_new_tokens=128).
Each side runs once untimed (Triton autotuning, cuBLAS set-up), then --repeats timed runs; the
median counts. tokens/s = new tokens / wall time of the whole generate call (prefill included);
"decode tokens/s" leaves out the prefill: tokens after the first / time from the first to the last.
Random weights: speed does not depend on their values. Peer reference: 12.6 tokens/s on an H100.

    python -m bench.decode --shape llama3_8b --sides ours,ours_graph   # Llama-3-8B shapes, ours only

--shape llama3_8b (GQA with 8 key/value heads, 14336 MLP, 128k vocabulary) builds our model with
random NF4 projections directly on the device instead of writing and loading a 16 GB checkpoint;
the peer needs the checkpoint, so it is not run for that shape.
"""

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch

from bench.random_model import LLAMA2_7B, TINY, write_random_checkpoint
from bench.common import CHECKPOINT_7B, CHECKPOINT_TINY, load_ours, load_peer
from qlora.atomic import write_text
from qlora.trainer import pick_device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_runs(run, device: torch.device, repeats: int) -> dict:
    """run(on_token) -> new token ids; once untimed, then `repeats` times: tokens and median speeds."""
    run(lambda _: None)                                              # warm-up
    totals, decodes = [], []
    for _ in range(repeats):
        stamps = []
        sync(device)
        t0 = time.perf_counter()
        tokens = run(lambda _: stamps.append(time.perf_counter()))
        sync(device)
        totals.append(len(tokens) / (time.perf_counter() - t0))
        decodes.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))  # both sides sync every step
    return {"tokens": tokens, "tokens_per_s": statistics.median(totals),
            "decode_tokens_per_s": statistics.median(decodes), "runs_tokens_per_s": totals}


LLAMA3_8B = dict(LLAMA2_7B, intermediate_size=14336, num_key_value_heads=8, vocab_size=128256,
                 max_position_embeddings=8192, rope_theta=500000.0)


def random_ours(shape: dict, device: torch.device):
    """Our Llama with random weights made on the device: NF4 projections (blocksize 64, double
    quantization, bf16 compute), bf16 embeddings / lm_head / norms, as load_ours gives."""
    from llama.model import Llama, LlamaConfig, rope_inv_freq
    from qlora.linear4bit import Linear4bit

    config = LlamaConfig(**shape)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Llama(config)
    model.to_empty(device=device)
    randn = lambda *size: torch.randn(*size, device=device, dtype=torch.bfloat16) * 0.02
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(randn(config.vocab_size, config.hidden_size))
        model.lm_head.weight.copy_(randn(config.vocab_size, config.hidden_size))
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
            for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                                  (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
                for name in names:
                    old = getattr(parent, name)
                    setattr(parent, name, Linear4bit.from_weight(randn(old.out_features, old.in_features)))
        model.model.norm.weight.fill_(1.0)
    model.to(torch.bfloat16)
    model.inv_freq = rope_inv_freq(config, device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def bench_ours(path, device, prompt: list[int], new_tokens: int, repeats: int, cuda_graph: bool,
               shape: dict | None = None) -> dict:
    from llama.generate import generate

    model = (load_ours(path, device) if shape is None else random_ours(shape, device)).eval()

    def run(on_token):
        return generate(model, [prompt], new_tokens, eos_id=None, on_token=on_token, cuda_graph=cuda_graph)[0]

    result = timed_runs(run, device, repeats)
    del model
    return result


def peer_greedy(model, prompt: list[int], new_tokens: int, device):
    """transformers' greedy generate of exactly new_tokens, as a run(on_token) for timed_runs."""
    ids = torch.tensor([prompt], device=device)

    class Stamps:              # a transformers streamer: put() gets the prompt first, then each new token
        def __init__(self, on_token):
            self.on_token, self.seen_prompt = on_token, False

        def put(self, value):
            if self.seen_prompt:
                self.on_token(value)
            self.seen_prompt = True

        def end(self):
            pass

    def run(on_token):
        with torch.no_grad():
            out = model.generate(ids, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 pad_token_id=0, streamer=Stamps(on_token))
        return out[0, len(prompt):].tolist()
    return run


def bench_peer(path, device, prompt: list[int], new_tokens: int, repeats: int) -> dict:
    model = load_peer(path, device).eval()
    run = peer_greedy(model, prompt, new_tokens, device)
    result = timed_runs(run, device, repeats)
    del model
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help=f"checkpoint directory (default {CHECKPOINT_7B}, or {CHECKPOINT_TINY} "
                                        "with --tiny); written first if absent")
    p.add_argument("--tiny", action="store_true", help="test-size model (runs on the CPU)")
    p.add_argument("--shape", default="llama2_7b", choices=["llama2_7b", "llama3_8b"],
                   help="llama3_8b: random weights made on the device, ours only")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--prompt_len", type=int, default=16, help="prompt tokens (BOS + random ids)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--agree", type=int, default=32, help="compare the first N greedy tokens of the sides")
    p.add_argument("--sides", default="ours,ours_graph,peer", help="comma-separated: ours, ours_graph, peer")
    p.add_argument("--json", help="write the details here")
    args = p.parse_args(argv)

    device = pick_device(args.device)
    shape = TINY if args.tiny else LLAMA3_8B if args.shape == "llama3_8b" else LLAMA2_7B
    in_memory = args.shape == "llama3_8b" and not args.tiny
    if in_memory and "peer" in args.sides.split(","):
        p.error("--shape llama3_8b runs our model only (no checkpoint is written): pass --sides ours,ours_graph")
    path = None if in_memory else write_random_checkpoint(
        args.checkpoint or (CHECKPOINT_TINY if args.tiny else CHECKPOINT_7B), shape)
    gen = torch.Generator().manual_seed(0)
    prompt = [1] + torch.randint(3, shape["vocab_size"], (args.prompt_len - 1,), generator=gen).tolist()
    sides = args.sides.split(",")
    if device.type != "cuda" and "ours_graph" in sides:
        sides.remove("ours_graph")                                  # CUDA graphs need a GPU
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, shape {args.shape}, "
          f"checkpoint {path or 'none (random weights made on the device)'}, "
          f"prompt {len(prompt)} tokens, {args.new_tokens} new tokens, median of {args.repeats}")

    results = {}
    for side in sides:
        if side == "peer":
            results[side] = bench_peer(path, device, prompt, args.new_tokens, args.repeats)
        else:
            results[side] = bench_ours(path, device, prompt, args.new_tokens, args.repeats,
                                       cuda_graph=side == "ours_graph", shape=shape if in_memory else None)
        if device.type == "cuda":
            results[side]["peak_allocated_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        gc.collect()                                                # free this side before the next loads
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

    # ---- the table
    peer = results.get("peer")
    n = args.agree
    print(f"\n| side | tokens/s | decode tokens/s | x peer | first {n} greedy tokens = peer's |")
    print("| --- | --- | --- | --- | --- |")
    for side, r in results.items():
        ratio = f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f}" if peer else "-"
        if peer and side != "peer":
            agree = r["tokens"][:n] == peer["tokens"][:n]
            first_diff = next((i for i, (a, b) in enumerate(zip(r["tokens"], peer["tokens"])) if a != b), None)
            r.update(agrees_with_peer=agree, first_difference=first_diff)
            agree = f"{agree} (first difference at {first_diff})" if first_diff is not None else str(agree)
        else:
            agree = "-"
        print(f"| {side} | {r['tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.1f} | {ratio} | {agree} |")
    if "ours" in results and "ours_graph" in results:     # the graph replays the eager step: same tokens
        same = results["ours_graph"]["tokens"] == results["ours"]["tokens"]
        results["ours_graph"]["equals_eager"] = same
        print(f"CUDA-graph tokens == eager tokens: {same}")
    if args.json:
        details = {"device": str(device), "checkpoint": str(path), "shape": shape, "prompt": prompt,
                   "new_tokens": args.new_tokens, "repeats": args.repeats, "peer_reference_h100_tokens_per_s": 12.6,
                   "results": results}
        write_text(args.json, json.dumps(details, indent=2) + "\n")
        print(f"details in {args.json}")


if __name__ == "__main__":
    main()
