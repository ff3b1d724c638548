"""Large models on one GPU (issue 23): the QLoRA step at Llama-2-13B, CodeLlama-34B and Llama-2-70B
shapes, what each part of memory holds, and the paged optimizer under a memory budget.

    python -m bench.large                        # every part on the GPU, 70b, 34b then 13b (~7 min)
    python -m bench.large --parts 70b,34b        # some parts (13b: a 26 GB checkpoint and the peers)
    python -m bench.large --tiny                 # the same code at test size on the CPU (ours only)
    python -m bench.large --show out/bench/large.json   # the tables of an earlier run again

Settings, as the QLoRA paper trains its 33B and 65B models (appendix B.2; it uses dropout 0.1 and
lr 2e-4 up to 13B): NF4 + double quantization, bf16 compute, LoRA r 64 alpha 16 dropout 0.05 on
every linear layer but lm_head (70B also at r 16), gradient checkpointing (--checkpointing
offload: block inputs in host memory, issue 17's option, passed through to TrainConfig), paged
AdamW 32-bit lr 1e-4, no weight decay, grad-norm clip 0.3; one fixed random batch, labels =
inputs, micro-batch 1 x 2048 and 4 x 512.
Each run is its own process (its peak memory its own); timed: the median after warm-up steps.

Models. 34B and 70B have no checkpoint: llama.load.random_quantized_llama draws each weight on the
GPU and quantizes it to NF4 before drawing the next (70B in bf16 is 138 GB; the device's disk holds
64 GB). At 13B a random checkpoint written by transformers (26 GB, deleted at the end) is what the
three sides load: ours (llama.load), transformers + PEFT + bitsandbytes, Unsloth.

Memory per part, ours (bytes of the tensors): NF4 weights (codes, absmax, double-quant state), dense
weights (embeddings, lm_head, norms), LoRA values, LoRA gradients (fp32 like the values, summed at
the optimizer step), optimizer state in CUDA managed memory (qlora/paged_adamw.py) and in ordinary
device memory (the moments of tensors under PAGED_MIN_NUMEL). torch.cuda.max_memory_allocated counts
the caching allocator only, so the managed state is NOT in "peak allocated" (the peers' bnb paged state
neither). "activations" = the forward + backward peak minus weights, LoRA values and LoRA gradients:
exact when the peak falls at the end of backward (all gradients made, no checkpoints left), an
underestimate when it falls earlier.

The memory budget (the paged optimizer put to the test). torch.cuda.set_per_process_memory_fraction
caps the caching allocator alone (it compares the bytes the allocator itself cudaMalloc'd with the
cap); cudaMallocManaged memory is outside it, so a cap by itself pages nothing: the state stays on a
GPU that has room. Making the driver evict pages by itself needs a GPU oversubscribed with managed
memory, which the device's notes warn can hang the GPU; this run moves the pages on purpose instead:
  1. the allocator is capped at budget - CUDA context - one chunk of optimizer state;
  2. the managed state is paged out to host RAM (PagedAdamW.evict_state) and training goes on with
     page_out=True: each chunk of state is paged in for its update and out again, so the device holds
     at most one chunk of it, and the process at most peak reserved + context + one chunk <= budget;
     the cost per step is the paged-out median minus the resident one (same batch);
  3. the same optimizer with its state in ordinary device memory (adamw_torch: PagedAdamW(paged=False),
     the update of torch.optim.AdamW, tested against it) runs under the same cap: expected out of memory.
Budgets: 70B r 64 the paper's 48 GB GPU; 13B its own resident peak allocated + a quarter of the state.
"""

import argparse
import gc
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from bench import train_step
from bench.common import (LINEAR, REPO, GiB, load_ours, measure_load, ratio, run_side_subprocess, size, time_steps,
                          versions)
from bench.random_model import CODELLAMA_34B, LLAMA2_13B, LLAMA2_70B, TINY, write_random_checkpoint
from bench.train_step import (Settings, flops_per_token, matmul_ceiling_tflops, mfu, ours_step, peer_info, peer_step,
                              random_batch)
from qlora import errors
from qlora.atomic import write_text

SHAPES = {"13b": LLAMA2_13B, "34b": CODELLAMA_34B, "70b": LLAMA2_70B}
# --tiny: the same parts at test size; 34b and 70b with grouped-query attention, as the real ones.
TINY_SHAPES = {"13b": TINY, "34b": dict(TINY, num_key_value_heads=2), "70b": dict(TINY, num_key_value_heads=2)}
CHECKPOINT_13B, CHECKPOINT_TINY = "/tmp/llama2-13b-random", "/tmp/llama-large-tiny"
PAPER_GPU = 48e9                 # the paper's "single 48GB GPU" (44.7 GiB)
GOAL_70B = {64: PAPER_GPU, 16: 41 * GiB}          # issue 23: 70B peak allocated at 1 x 2048, by LoRA rank
GOAL_SPEEDUP = {"peer": 1.3, "unsloth": 1.1}      # issue 23: 13B tokens/s over each peer
TOKENIZER_PLACES = [REPO / ".gpu-data" / "llama2-tokenizer.model",
                    REPO.parent / "shared" / "data" / "llama2-tokenizer.model"]


@dataclass
class Run:
    """One process: a side on one model, at each micro-batch shape, optionally then the budget."""
    name: str
    side: str                                  # ours, peer, unsloth, or checkpoint (writes the 13B files)
    shape: str                                 # 13b, 34b, 70b
    tiny: bool = False
    lora_r: int = 64
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    learning_rate: float = 1e-4
    max_grad_norm: float = 0.3
    MICRO_BATCHES = [[1, 2048], [4, 512]]
    micro_batches: list = field(default_factory=lambda: [list(mb) for mb in Run.MICRO_BATCHES])
    warmup: int = 1
    steps: int = 2
    checkpoint: str = ""                       # load this checkpoint; "": random_quantized_llama
    checkpointing: str = "true"                # gradient_checkpointing: true or offload
    torch_compile: bool = False                # our blocks compiled (the warm-up steps take the compile)
    embeddings_on_host: bool = False           # our embedding table in host memory (embeddings_on_host: true)
    lora_shared_dropout: bool = False          # q/k/v and gate/up share one dropout mask and A product
    budget: float | None = None                # bytes of device memory; 0: auto (see the top); None: no budget run
    unsloth_checkpointing: str = "unsloth"     # Unsloth's use_gradient_checkpointing: unsloth (offloads) or true
    tokenizer: str = ""                        # for Unsloth, which loads one with the model
    seed: int = 0
    timeout: float = 300                       # seconds before the parent kills the process

    @property
    def config(self) -> dict:
        return (TINY_SHAPES if self.tiny else SHAPES)[self.shape]


def plan(parts: list[str], tiny: bool, checkpointing: str, unsloth_checkpointing: str, tokenizer: str,
         torch_compile: bool = False, embeddings_on_host: bool = False, lora_shared_dropout: bool = False) -> list[Run]:
    """The runs of each part, in the order given. Time limits from the H200 estimates in the report."""
    common = dict(tiny=tiny, checkpointing=checkpointing, torch_compile=torch_compile,
                  embeddings_on_host=embeddings_on_host, lora_shared_dropout=lora_shared_dropout)
    if tiny:
        common.update(micro_batches=[[1, 64], [4, 16]], warmup=1, steps=2)
    runs = []
    for part in parts:
        if part == "70b":
            first_shape = dict(common, micro_batches=common.get("micro_batches", Run.MICRO_BATCHES)[:1])
            runs += [Run("ours-70b-r64", "ours", "70b", budget=PAPER_GPU, timeout=300, **common),
                     Run("ours-70b-r16", "ours", "70b", lora_r=16, timeout=200, **first_shape)]
        elif part == "34b":
            runs.append(Run("ours-34b-r64", "ours", "34b", timeout=200, **{"steps": 3, **common}))
        elif part == "13b":
            path = CHECKPOINT_TINY if tiny else CHECKPOINT_13B
            at13 = dict(common, checkpoint=path, **({} if tiny else dict(warmup=2, steps=4)))
            runs += [Run("checkpoint-13b", "checkpoint", "13b", timeout=300, **at13),
                     Run("ours-13b", "ours", "13b", budget=0, timeout=240, **at13),
                     Run("peer-13b", "peer", "13b", timeout=240, **at13),
                     Run("unsloth-13b", "unsloth", "13b", unsloth_checkpointing=unsloth_checkpointing,
                         tokenizer=tokenizer, timeout=300, **at13)]
        else:
            raise ValueError(f"unknown part {part!r}: use 70b, 34b and/or 13b")
    return runs


def train_config(run: Run):
    """The TrainConfig of our side, through from_dict's checks (so `offload` is refused where this
    checkout's TrainConfig does not know it)."""
    from qlora.config import from_dict
    return from_dict(dict(base_model=run.checkpoint or "random", load_in_4bit=True, lora_r=run.lora_r,
                          lora_alpha=run.lora_alpha, lora_dropout=run.lora_dropout, learning_rate=run.learning_rate,
                          weight_decay=0.0, lr_scheduler="constant", warmup_steps=0, max_grad_norm=run.max_grad_norm,
                          optimizer="paged_adamw_32bit", gradient_checkpointing=run.checkpointing,
                          torch_compile=run.torch_compile, embeddings_on_host=run.embeddings_on_host,
                          lora_shared_dropout=run.lora_shared_dropout, gradient_accumulation_steps=1, micro_batch_size=run.micro_batches[0][0],
                          sequence_len=max(t for _, t in run.micro_batches), seed=run.seed))


# ----------------------------------------------------------------------------- memory, measured

def device_used(device: torch.device) -> int:
    """Bytes in use on the GPU as the driver sees it (all of this process: context, allocator, managed)."""
    free, total = torch.cuda.mem_get_info(device)
    return total - free


def model_parts(model) -> dict:
    """Bytes of our model by part: NF4 weights, dense weights, LoRA values (each tensor counted once)."""
    from llama.load import resident_bytes
    from qlora.linear4bit import Linear4bit
    nf4 = {id(b): b.numel() * b.element_size() for m in model.modules() if isinstance(m, Linear4bit)
           for b in m.buffers(recurse=False)}
    lora = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return dict(nf4_weights=sum(nf4.values()), dense_weights=resident_bytes(model) - sum(nf4.values()) - lora,
                lora_values=lora)


def state_bytes(optimizer) -> dict:
    """Bytes of the optimizer's state tensors: in CUDA managed memory, in ordinary GPU memory, on the host."""
    from qlora.paged_adamw import is_managed
    found = {}
    for state in optimizer.state.values():
        for v in state.values():
            if torch.is_tensor(v) and v.numel() > 1:               # not the step counters
                where = "managed" if is_managed(v) else "device" if v.is_cuda else "host"
                found[v.data_ptr()] = (where, v.numel() * v.element_size())
    return {where: sum(n for w, n in found.values() if w == where) for where in ("managed", "device", "host")}


class PeakWatch:
    """Each step's peak memory in two phases, read in the optimizer's step hooks: forward + backward
    (and the grad-norm clip, which comes before optimizer.step) and the update; and the bytes of the
    gradients at the update."""

    def __init__(self, optimizer, params, device: torch.device):
        self.params, self.device, self.cuda = params, device, device.type == "cuda"
        self.forward_backward = self.update = self.reserved = self.grads = 0
        self.hooks = [optimizer.register_step_pre_hook(self._before_update),
                      optimizer.register_step_post_hook(self._after_update)]

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def _read(self) -> int:
        self.reserved = max(self.reserved, torch.cuda.max_memory_reserved(self.device))
        return torch.cuda.max_memory_allocated(self.device)

    def _before_update(self, optimizer, args, kwargs) -> None:
        self.grads = max(self.grads, sum(p.grad.numel() * p.grad.element_size() for p in self.params
                                         if p.grad is not None))
        if self.cuda:
            self.forward_backward = max(self.forward_backward, self._read())
            self.reset()

    def _after_update(self, optimizer, args, kwargs) -> None:
        if self.cuda:
            self.update = max(self.update, self._read())

    def figures(self) -> dict:
        for hook in self.hooks:
            hook.remove()
        if not self.cuda:
            return dict(lora_grads=self.grads)
        return dict(lora_grads=self.grads, forward_backward_peak=self.forward_backward, update_peak=self.update,
                    peak_allocated=max(self.forward_backward, self.update), peak_reserved=self.reserved)


def measure(step, run: Run, micro_batch: int, seq_len: int, device: torch.device, label: str) -> dict:
    """Time `step` on the fixed random batch of this shape -> timing, tokens/s, FLOPs and peaks."""
    s = Settings(checkpoint=run.checkpoint, micro_batch=micro_batch, seq_len=seq_len, lora_r=run.lora_r, seed=run.seed)
    batch = random_batch(s, run.config["vocab_size"], device)
    # Compiled code (ours with --torch_compile, Unsloth's) starts afresh at each shape, as in a run of
    # that one shape: otherwise the second shape recompiles with dynamic shapes, slower kernels.
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()                  # reserved memory from the previous shape is not this one's
    watch = PeakWatch(step.optimizer, step.params, device)
    timing = time_steps(step, batch, run.warmup, run.steps, device, label, before_step=watch.reset)
    result = dict(micro_batch=micro_batch, seq_len=seq_len, **timing, **watch.figures(),
                  tokens_per_s=micro_batch * seq_len / timing["median_step_s"],
                  flops_per_token=flops_per_token(run.config, s), optimizer_state=state_bytes(step.optimizer))
    if device.type == "cuda":
        result.update(device_used_after=device_used(device),
                      alloc_retries=torch.cuda.memory_stats(device).get("num_alloc_retries", 0))
    return result


# ----------------------------------------------------------------------------- one run, in this process

def run_child(run: Run, device: torch.device, out: Path) -> None:
    """Build the run's side, measure each micro-batch shape (and the budget), writing `out` after each."""
    cuda = device.type == "cuda"
    result = dict(name=run.name, side=run.side, run=asdict(run), micro_batches={},
                  context_bytes=device_used(device) if cuda else None)    # the CUDA context, before any tensor
    if run.side == "checkpoint":
        result.update(write_checkpoint(run), versions=versions())
        write_text(out, json.dumps(result, indent=2))
        return
    step, info = BUILDERS[run.side](run, device)
    result.update(info, versions=versions())       # after the build: Unsloth must be imported before transformers
    write_text(out, json.dumps(result, indent=2))
    print(f"{run.name}: built in {info['load']['load_s']:.1f}s; {info['trainable_params']:,d} trainable", flush=True)
    for micro_batch, seq_len in run.micro_batches:
        result["micro_batches"][f"{micro_batch}x{seq_len}"] = measure(step, run, micro_batch, seq_len, device,
                                                                      f"{run.name} {micro_batch}x{seq_len}")
        write_text(out, json.dumps(result, indent=2))
    if run.budget is not None:
        result["budget"] = budget_run(step, run, device, result) if cuda else {"skipped": "needs CUDA (managed memory)"}
        write_text(out, json.dumps(result, indent=2))


def build_ours(run: Run, device: torch.device):
    """Our model (random_quantized_llama, or the checkpoint) and train.py's step -> (step, info)."""
    from llama.load import random_quantized_llama
    from llama.model import LlamaConfig
    from qlora import trainer

    cfg = train_config(run)
    dtype = trainer.pick_dtype(cfg, device)          # bf16 on the GPU, fp32 on the CPU (as train.py)
    if run.checkpoint:
        build = lambda: load_ours(run.checkpoint, device, dtype)                                 # noqa: E731
    else:
        build = lambda: random_quantized_llama(LlamaConfig.from_hf(run.config), device, dtype, run.seed)  # noqa: E731
    model, load = measure_load(build, device)
    step, info = ours_step(model, cfg, device, dtype, total_steps=10_000)
    return step, dict(load=load, **info, parts=model_parts(model),
                      gradient_checkpointing=str(cfg.gradient_checkpointing))


def build_peer(run: Run, device: torch.device):
    """transformers + PEFT + bitsandbytes from the checkpoint, as bench/train_step.py's peer -> (step, info)."""
    model, step, info = train_step.build_peer(peer_settings(run), device)
    return step, dict(info, gradient_checkpointing=str(model.base_model.model.is_gradient_checkpointing))


def build_unsloth(run: Run, device: torch.device):
    """Unsloth's FastLanguageModel (NF4, bf16, its LoRA kernels and checkpointing) from the checkpoint,
    trained by the peer's step (bnb PagedAdamW32bit) -> (step, info)."""
    import unsloth  # noqa: F401  (before transformers, as Unsloth asks)
    from unsloth import FastLanguageModel

    directory = Path(run.checkpoint)
    if not (directory / "tokenizer_config.json").is_file():   # Unsloth loads a tokenizer with the model
        if not Path(run.tokenizer).is_file():
            raise FileNotFoundError(f"Unsloth needs a tokenizer and {run.tokenizer or 'none'} is not a file: "
                                    "pass --tokenizer llama2-tokenizer.model")
        from transformers import LlamaTokenizer
        LlamaTokenizer(vocab_file=run.tokenizer).save_pretrained(directory)
    s = peer_settings(run)

    def load():
        model, _ = FastLanguageModel.from_pretrained(model_name=str(directory), load_in_4bit=True, dtype=torch.bfloat16,
                                                     max_seq_length=max(t for _, t in run.micro_batches),
                                                     local_files_only=True)
        return model
    model, load_figures = measure_load(load, device)
    checkpointing = True if run.unsloth_checkpointing == "true" else run.unsloth_checkpointing
    torch.manual_seed(run.seed)
    model = FastLanguageModel.get_peft_model(model, r=run.lora_r, lora_alpha=run.lora_alpha,
                                             lora_dropout=run.lora_dropout, target_modules=LINEAR, bias="none",
                                             use_gradient_checkpointing=checkpointing, random_state=run.seed)
    return peer_step(model, s, device), dict(load=load_figures, **peer_info(model),
                                             gradient_checkpointing=str(checkpointing))


BUILDERS = {"ours": build_ours, "peer": build_peer, "unsloth": build_unsloth}


def peer_settings(run: Run) -> Settings:
    return Settings(checkpoint=run.checkpoint, lora_r=run.lora_r, lora_alpha=run.lora_alpha,
                    lora_dropout=run.lora_dropout, learning_rate=run.learning_rate, max_grad_norm=run.max_grad_norm,
                    seed=run.seed)


def write_checkpoint(run: Run) -> dict:
    """The random checkpoint the 13B sides load (transformers' save_pretrained), if the disk has room."""
    c = run.config
    C, I, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = C * c["num_key_value_heads"] // c["num_attention_heads"]
    nbytes = 2 * (2 * V * C + L * (2 * C * C + 2 * C * kv + 3 * C * I + 2 * C) + C)    # bf16
    path = Path(run.checkpoint)
    free = shutil.disk_usage(path.parent).free
    if not (path / "config.json").is_file() and free < nbytes * 1.05:
        raise OSError(f"{path.parent} has {size(free)} free but the checkpoint needs {size(nbytes)}: free disk space "
                      "or leave out the 13b part")
    t0 = time.perf_counter()
    write_random_checkpoint(path, c, seed=run.seed)
    return dict(checkpoint=str(path), checkpoint_bytes=sum(f.stat().st_size for f in path.glob("*.safetensors")),
                write_s=time.perf_counter() - t0)


def budget_run(step, run: Run, device: torch.device, result: dict) -> dict:
    """The paged optimizer under a memory budget (the top, steps 1-3) -> its figures."""
    from qlora.paged_adamw import UPDATE_CHUNK_NUMEL
    optimizer = step.optimizer
    micro_batch, seq_len = run.micro_batches[0]
    resident = result["micro_batches"][f"{micro_batch}x{seq_len}"]
    state = state_bytes(optimizer)
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    # What the process holds outside the allocator and the (resident) managed state: the CUDA context,
    # loaded kernels, library handles; more by now than at the start.
    context = max(result["context_bytes"], device_used(device) - torch.cuda.memory_reserved(device) - state["managed"])
    chunk = 8 * min(UPDATE_CHUNK_NUMEL, sum(p.numel() for p in step.params))   # fp32 m and v of one update chunk
    if run.budget:
        budget = run.budget
        cap = budget - context - chunk
    else:
        cap = resident["peak_allocated"] + state["managed"] // 4
        budget = cap + context + chunk
    figures = dict(budget=budget, allocator_cap=cap, context=context, chunk_state=chunk, state=state,
                   resident_median_step_s=resident["median_step_s"])
    torch.cuda.set_per_process_memory_fraction(cap / total, device)
    # 2. the managed state out to host RAM; the driver's free memory says whether the pages left
    free_before = torch.cuda.mem_get_info(device)[0]
    figures["paged_out_bytes"] = optimizer.evict_state()
    torch.cuda.synchronize(device)
    figures["device_freed_by_page_out"] = torch.cuda.mem_get_info(device)[0] - free_before
    optimizer.page_out = True
    retries = torch.cuda.memory_stats(device).get("num_alloc_retries", 0)
    try:
        paged = measure(step, run, micro_batch, seq_len, device, f"{run.name} {micro_batch}x{seq_len} paged out")
        paged["alloc_retries"] -= retries
        # what is left on the device besides the allocator and the context: managed pages still there
        paged["managed_on_device_after"] = paged["device_used_after"] - context - torch.cuda.memory_reserved(device)
        figures["paged"] = paged
        figures["cost_per_step_s"] = paged["median_step_s"] - resident["median_step_s"]
    except torch.OutOfMemoryError as e:
        figures["paged"] = {"out_of_memory": str(e).splitlines()[0]}
    # 3. the same optimizer, state in ordinary device memory (adamw_torch), under the same cap
    optimizer.page_out, optimizer.paged = False, False
    optimizer.state.clear()                        # frees the managed moments
    gc.collect()
    batch = random_batch(replace(peer_settings(run), micro_batch=micro_batch, seq_len=seq_len),
                         run.config["vocab_size"], device)
    figures["device_state"] = {"fit": True}
    for i in range(2):
        try:
            step(*batch)
            print(f"{run.name}: state in device memory, step {i + 1} fit under the cap", flush=True)
        except torch.OutOfMemoryError as e:
            figures["device_state"] = {"fit": False, "out_of_memory_at_step": i + 1, "message": str(e).splitlines()[0]}
            print(f"{run.name}: state in device memory: out of memory at step {i + 1} (expected)", flush=True)
            break
    torch.cuda.set_per_process_memory_fraction(1.0, device)
    return figures


# ----------------------------------------------------------------------------- the parent: runs, tables

def run_all(runs: list[Run], device: str, out: Path, unsloth_path: str | None, keep_checkpoint: bool) -> dict:
    results = {}
    for run in runs:
        if run.side in ("peer", "unsloth") and not device.startswith("cuda"):
            results[run.name] = {"name": run.name, "side": run.side, "skipped": "needs CUDA (bitsandbytes' and "
                                 "Unsloth's GPU paths)"}
        elif run.side == "unsloth" and not unsloth_path:
            results[run.name] = {"name": run.name, "side": run.side, "skipped": "no --unsloth_path"}
        elif run.side != "checkpoint" and run.checkpoint and "error" in results.get("checkpoint-13b", {}):
            results[run.name] = {"name": run.name, "side": run.side, "skipped": "no checkpoint"}
        else:
            env = None
            if run.side == "unsloth":
                env = {**os.environ, "HF_HUB_OFFLINE": "1", "UNSLOTH_DISABLE_STATISTICS": "1",
                       "PYTHONPATH": os.pathsep.join([unsloth_path, *filter(None, [os.environ.get("PYTHONPATH")])])}
            results[run.name] = run_side_subprocess("bench.large", run.name, ["--spec", json.dumps(asdict(run)),
                                                                               "--device", device], env,
                                                 run.timeout + (180 if run.torch_compile and run.side == "ours" else 0))
        write_text(out, json.dumps({"results": results}, indent=2))
        if run.side == "unsloth" or (run.side == "peer" and not any(r.side == "unsloth" for r in runs)):
            if not keep_checkpoint and run.checkpoint and Path(run.checkpoint).is_dir():
                shutil.rmtree(run.checkpoint)          # the device's disk is 64 GB
                print(f"removed {run.checkpoint}", flush=True)
    return results


def print_tables(results: dict, ceiling: float | None, device_name: str) -> None:
    gib = lambda v: "-" if v is None else size(v)                          # noqa: E731
    dtype = next((r["compute_dtype"] for r in results.values() if r.get("side") == "ours" and "compute_dtype" in r),
                 "-")
    print(f"\n## QLoRA step at large shapes ({device_name}): NF4 + DQ, {dtype} compute, LoRA alpha 16 dropout 0.05 "
          "on all linear layers, gradient checkpointing, paged AdamW\n")
    print("| run | micro-batch | tokens/s | step | peak allocated | peak reserved | fwd+bwd / update peak | "
          "MFU | loss steps 1-2 |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        if r.get("side") == "checkpoint":
            continue
        for shape, m in r.get("micro_batches", {}).items():
            model_fraction, _ = mfu(m, ceiling, "ours" if r["side"] == "ours" else "peer")
            losses = ", ".join(f"{x:.3f}" for x in m["losses"][:2])
            print(f"| {name} | {shape} | {m['tokens_per_s']:,.0f} | {m['median_step_s']:.3f} s | "
                  f"{gib(m.get('peak_allocated'))} | {gib(m.get('peak_reserved'))} | "
                  f"{gib(m.get('forward_backward_peak'))} / {gib(m.get('update_peak'))} | "
                  f"{'-' if model_fraction is None else f'{100 * model_fraction:.1f}%'} | {losses} |")
        if "error" in r or "skipped" in r:
            print(f"| {name} | {r.get('error') or 'skipped: ' + r['skipped']} | | | | | | | |")

    print("\n### Memory by part, ours (first micro-batch shape; managed state is outside peak allocated)\n")
    print("| run | built in, peak over resident | NF4 weights | dense weights | LoRA values | LoRA grads | "
          "optimizer state managed / device | activations (fwd+bwd peak - the rest) |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        if r.get("side") != "ours" or not r.get("micro_batches"):
            continue
        parts, m = r["parts"], next(iter(r["micro_batches"].values()))
        rest = parts["nf4_weights"] + parts["dense_weights"] + parts["lora_values"] + m["lora_grads"]
        activations = m["forward_backward_peak"] - rest if m.get("forward_backward_peak") else None
        st, load = m["optimizer_state"], r["load"]
        transient = load["peak_allocated"] - load["resident_allocated"] if load.get("peak_allocated") else None
        print(f"| {name} | {load['load_s']:.1f} s, {gib(transient)} | {gib(parts['nf4_weights'])} | "
              f"{gib(parts['dense_weights'])} | {gib(parts['lora_values'])} | {gib(m['lora_grads'])} | "
              f"{gib(st['managed'])} / {gib(st['device'] or st['host'])} | {gib(activations)} |")

    budgets = {name: r["budget"] for name, r in results.items() if isinstance(r.get("budget"), dict)}
    if budgets:
        print("\n### Paged optimizer under a memory budget (state paged out to host, one chunk in at a time)\n")
        print("| run | budget | allocator cap | state paged out / device freed | step resident -> paged out | "
              "allocator retries | state in device memory under the cap |\n| --- | --- | --- | --- | --- | --- | --- |")
        for name, b in budgets.items():
            if "skipped" in b:
                print(f"| {name} | skipped: {b['skipped']} | | | | | |")
                continue
            paged, dev = b.get("paged", {}), b.get("device_state", {})
            timing = paged.get("out_of_memory", "-")
            if "median_step_s" in paged:
                timing = (f"{b['resident_median_step_s']:.3f} -> {paged['median_step_s']:.3f} s "
                          f"(+{b['cost_per_step_s']:.3f} s)")
            state = "fit" if dev.get("fit") else f"out of memory at step {dev.get('out_of_memory_at_step')}"
            print(f"| {name} | {gib(b['budget'])} | {gib(b['allocator_cap'])} | {gib(b['paged_out_bytes'])} / "
                  f"{gib(b['device_freed_by_page_out'])} | {timing} | {paged.get('alloc_retries', '-')} | {state} |")

    print()
    for r_goal, limit in GOAL_70B.items():
        m = results.get(f"ours-70b-r{r_goal}", {}).get("micro_batches", {}).get("1x2048", {})
        if m.get("peak_allocated"):
            verdict = "met" if m["peak_allocated"] < limit else "not met"
            print(f"goal: 70B r {r_goal} at 1 x 2048, peak allocated {size(m['peak_allocated'])} "
                  f"(< {size(limit)}): {verdict}")
    ours = results.get("ours-13b", {}).get("micro_batches", {})
    for peer, speedup in GOAL_SPEEDUP.items():
        theirs = results.get(f"{peer}-13b", {}).get("micro_batches", {})
        for shape in ours.keys() & theirs.keys():
            a, b = ours[shape], theirs[shape]
            if not (a.get("peak_allocated") and b.get("peak_allocated")):
                continue
            fast, small = a["tokens_per_s"] / b["tokens_per_s"], a["peak_allocated"] / b["peak_allocated"]
            print(f"goal: 13B {shape} vs {peer}: {fast:.2f}x tokens/s (>= {speedup}x), peak allocated "
                  f"{ratio(a['peak_allocated'], b['peak_allocated'])}x (< 1): "
                  f"{'met' if fast >= speedup and small < 1 else 'not met'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="70b,34b,13b", help="comma-separated, run in this order: 70b, 34b, 13b")
    parser.add_argument("--tiny", action="store_true", help="test-size shapes (runs on the CPU, ours only)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    parser.add_argument("--checkpointing", default="true", choices=["true", "offload"],
                        help="gradient_checkpointing of our side (offload: issue 17's block inputs in host memory)")
    parser.add_argument("--torch_compile", action="store_true", help="compile our blocks (torch_compile: true)")
    parser.add_argument("--embeddings_on_host", action="store_true", help="our embedding table in host memory")
    parser.add_argument("--lora_shared_dropout", action="store_true", help="one dropout mask and A product for "
                        "q/k/v and for gate/up (lora_shared_dropout: true)")
    parser.add_argument("--unsloth_path", help="where Unsloth was pip-installed with --target (its side only)")
    parser.add_argument("--unsloth_checkpointing", default="unsloth", choices=["unsloth", "true"],
                        help="Unsloth's use_gradient_checkpointing (unsloth: offloaded to the host, its default)")
    parser.add_argument("--tokenizer", help="llama2-tokenizer.model for Unsloth (default: the one in .gpu-data/ "
                                            "or ../shared/data/)")
    parser.add_argument("--without", default="", help="comma-separated sides to leave out: peer, unsloth")
    parser.add_argument("--keep_checkpoint", action="store_true", help="keep the 13B checkpoint (default: removed)")
    parser.add_argument("--json", help="write the results here (default out/bench/large.json)")
    parser.add_argument("--show", metavar="JSON", help="print the tables of an earlier run's JSON and exit")
    parser.add_argument("--side", help=argparse.SUPPRESS)           # a child process: the run's name
    parser.add_argument("--spec", help=argparse.SUPPRESS)           # and its Run, as JSON
    args = parser.parse_args(argv)

    if args.show:
        saved = errors.read_json(args.show, "results file")
        print_tables(saved["results"], saved.get("matmul_ceiling_tflops"), saved.get("device", "?"))
        return 0
    if args.side:
        from qlora.trainer import pick_device
        run_child(Run(**json.loads(args.spec)), pick_device(args.device), Path(args.json))
        return 0

    # The parent starts no CUDA context of its own until the end: each child's context and memory are its own.
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    tokenizer = args.tokenizer or next((str(p) for p in TOKENIZER_PLACES if p.is_file()), "")
    runs = plan(args.parts.split(","), args.tiny, args.checkpointing, args.unsloth_checkpointing, tokenizer,
                args.torch_compile, args.embeddings_on_host, args.lora_shared_dropout)
    runs = [r for r in runs if r.side not in args.without.split(",")]
    try:
        train_config(runs[0])
    except ValueError as e:
        raise ValueError(f"--checkpointing {args.checkpointing}: {e} (offload needs issue 17's "
                         "gradient_checkpointing: offload in qlora/config.py)") from None
    out = Path(args.json or REPO / "out/bench/large.json")
    t0 = time.perf_counter()
    results = run_all(runs, device, out, args.unsloth_path, args.keep_checkpoint)
    ceiling = matmul_ceiling_tflops(torch.device(device)) if device.startswith("cuda") else None
    device_name = versions()["device"]
    write_text(out, json.dumps({"device": device_name, "matmul_ceiling_tflops": ceiling,
                                "wall_s": time.perf_counter() - t0, "results": results}, indent=2))
    print_tables(results, ceiling, device_name)
    print(f"details: {out} ({time.perf_counter() - t0:.0f} s in all)")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(errors.run_cli(main))
