"""More than one process on torch.distributed, started by torchrun: data parallel (DDP) or sharded (FSDP2).

    torchrun --nproc_per_node N train.py --config ...                      # distributed: ddp (the default)
    torchrun --nproc_per_node N train.py --config ... --distributed fsdp   # base and adapters sharded

Without torchrun (no RANK in the environment) no process group exists and every helper here is
the identity: one process runs the single-process code, unchanged.

The step. Rank r takes micro-batches r, r + N, r + 2N, ... of the one shuffled stream (RankBatches),
so a step of N ranks x GA micro-batches holds the rows one process holds with N x GA micro-batches
of accumulation: global batch = micro_batch_size x GA x N, every row once per epoch. The loss is
token-weighted over the whole step (qlora/loss.py): each rank divides its token-loss sum by the
label tokens of all ranks' micro-batches (one all_reduce of the count before backward). The
gradient of the step is then the *sum* of the ranks' gradients, so both wrappers sum instead of
averaging: DDP through a comm hook, FSDP2 with a divide factor of 1.

DDP: every rank holds the whole 4-bit model; the LoRA gradients are all-reduced in buckets while
backward runs; the micro-batches before a step's last skip the all-reduce (no_sync).

FSDP2 (torch.distributed.fsdp.fully_shard on every block, then on the root): the frozen NF4 weights
and the adapters are sharded on dim 0 and gathered one block at a time for compute. torchao's
NF4Tensor is a tensor subclass whose fsdp_pre_all_gather hands FSDP its inner tensors (codes, block
scales) and whose fsdp_post_all_gather rebuilds it, and it splits only on block boundaries;
Answer.AI's fsdp_qlora stores bitsandbytes' packed bytes in the dtype of the other parameters
(quant_storage) so that FSDP1's flat parameter can hold them. Here no subclass is needed: FSDP2
all-gathers a group of mixed dtypes as bytes, so a Linear4bit's packed bytes and absmax codes
simply become 2-D uint8 parameters [row groups, bytes of a group]. A row group is the fewest whole
rows that hold whole 64-value blocks (row_group), so rank r's bytes and absmax codes cover the same
rows and dequantize on their own ("consistent per shard"). The second level of double quantization
(one fp32 scale per 256 blocks, 1/2048 of the packed bytes; the mean offset; the two code books) is
replicated. Loading: each rank quantizes only its rows (shard_quantizer); the fp32 absmax of all
blocks are gathered (4 bytes per 32 packed ones) so that the double quantization is the whole
weight's, bit for bit what one process computes. A checkpoint stored in 4-bit is read to the host
a weight at a time, and each rank moves only its rows of it to its GPU (shard_stored). The 16-bit
tensors (embeddings, norms, lm_head) are read whole on every rank, then sharded.

Only rank 0 writes files (metrics, checkpoints, the adapter); the others wait at a barrier. A run
saved under N ranks resumes under M: checkpoints hold whole tensors (gathered from the shards) and
the data position of the one stream; each rank's RNG comes back when N == M (else a note).
"""

import atexit
import gc
import inspect
import math
import os
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn as nn

from qlora.checkpointing import blocks_of
from qlora.linear4bit import QUANT_CHUNK_NUMEL, Linear4bit
from qlora.nf4 import QuantState, double_quantize, nf4_code


# ----------------------------------------------------------------------------- the process group

def launched() -> bool:
    """Whether torchrun (or another launcher of its kind) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the one that prints and writes files."""
    return rank() == 0


def init(cfg) -> None:
    """Join torchrun's process group: NCCL with GPU cuda:LOCAL_RANK, or gloo on the CPU. Without
    torchrun: nothing (and `distributed: fsdp` is an error). Ranks above 0 print nothing on stdout."""
    if not launched():
        if cfg.distributed == "fsdp":
            raise ValueError("distributed: fsdp shards the model over several processes: start them with "
                             "torchrun --nproc_per_node N train.py ... (or use distributed: ddp)")
        return
    if cfg.device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"--device {cfg.device} under torchrun: every rank takes its own GPU (cuda:LOCAL_RANK); "
                         "use --device auto, cuda or cpu")
    if cfg.distributed == "fsdp" and (cfg.fp16 or cfg.eval_table_size):
        what = "fp16 (loss scaling of sharded gradients)" if cfg.fp16 else "eval_table_size (generation on one rank)"
        raise ValueError(f"distributed: fsdp does not support {what}: use bf16, eval_table_size 0, "
                         "or distributed: ddp")
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)                            # what pick_device("auto") then returns
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    atexit.register(_teardown)
    if rank() > 0:
        sys.stdout = open(os.devnull, "w")                       # one copy of the log; errors still on stderr


def finish() -> None:
    """After a run every rank completed: free what the model held, wait for all ranks, leave the group.

    FSDP2's modules keep the group's work objects in reference cycles; a rank that exits while
    another still frees them can make gloo abort the other ("terminate called without an active
    exception"), so everyone frees first and leaves together."""
    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def _teardown() -> None:
    # A rank that stops on an error: no barrier (the others may never reach it; torchrun stops them).
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextmanager
def main_first():
    """Rank 0 runs the block, then the others do (finding what it wrote, e.g. a tokenizer or a cache)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def all_sum(values: list[float]) -> list[float]:
    """The sums over all ranks of a few numbers (one all_reduce, float64); the numbers themselves in one process."""
    if not dist.is_initialized():
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (pickled); [obj] in one process."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- data

class RankBatches:
    """This rank's micro-batches of one Batches stream: micro-batch k goes to rank k % world, so N
    ranks together take the micro-batches one process would, in the same steps. The position
    (state_dict) is the stream's, the same on every rank after each micro-batch round."""

    def __init__(self, batches, rank: int, world: int):
        self.batches, self.rank, self.world = batches, rank, world

    def __len__(self) -> int:
        return len(self.batches)                  # micro-batches per epoch, all ranks together

    def __iter__(self):
        return self

    def __next__(self):
        self.batches.skip(self.rank)              # the lower ranks' micro-batches, not collated
        batch = next(self.batches)
        self.batches.skip(self.world - 1 - self.rank)
        return batch

    @property
    def epochs_done(self) -> float:
        return self.batches.epochs_done

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)


def shard_batches(batches):
    """batches itself in one process, else this rank's RankBatches of it."""
    return batches if world_size() == 1 else RankBatches(batches, rank(), world_size())


def my_share(items: list) -> list[tuple[object, bool]]:
    """This rank's items of a list dealt round-robin, as (item, counted). Every rank gets the same
    number, the last item repeated as (item, False) where the list runs out: an FSDP forward is a
    collective every rank must join."""
    n, w, r = len(items), world_size(), rank()
    return [(items[min(i, n - 1)], i < n) for i in range(r, math.ceil(n / w) * w, w)]


def check_batch_size(cfg):
    """batch_size (rows per optimizer step, all ranks together) -> the config with its
    gradient_accumulation_steps; a ValueError when micro_batch_size x ranks does not divide it."""
    if not cfg.batch_size:
        return cfg
    per_micro_step = cfg.micro_batch_size * world_size()
    if cfg.batch_size % per_micro_step:
        raise ValueError(f"batch_size {cfg.batch_size} is not a multiple of micro_batch_size {cfg.micro_batch_size} x "
                         f"{world_size()} rank(s) = {per_micro_step}: make it a multiple (e.g. "
                         f"{math.ceil(cfg.batch_size / per_micro_step) * per_micro_step}) or change micro_batch_size")
    return replace(cfg, gradient_accumulation_steps=cfg.batch_size // per_micro_step)


# ----------------------------------------------------------------------------- FSDP2: NF4 weights in shards

def row_group(in_features: int, blocksize: int) -> int:
    """The fewest whole rows of an [out, in] weight that end on a block boundary."""
    return blocksize // math.gcd(in_features, blocksize)


def _rows_of_rank(groups: int) -> tuple[int, int]:
    """[first, last) row groups of this rank, as FSDP2 cuts dim 0 (torch.chunk: ceil(groups / N) each)."""
    per = math.ceil(groups / world_size())
    return min(rank() * per, groups), min((rank() + 1) * per, groups)


def _row_groups(out_features: int, in_features: int, blocksize: int) -> tuple[int, int, int]:
    """(rows per row group, row groups, absmax blocks per row group) of an [out, in] weight, or the
    ValueError saying it cannot be cut into whole blocks."""
    group = row_group(in_features, blocksize)
    if out_features % group:
        raise ValueError(f"a weight [{out_features}, {in_features}] cannot be sharded in whole blocks of {blocksize} "
                         f"({out_features} rows are not a multiple of {group}): use distributed: ddp")
    return group, out_features // group, group * in_features // blocksize


def shard_quantizer(weight: torch.Tensor, device, dtype: torch.dtype, blocksize: int = 64,
                    double_quant: bool = True, chunk_numel: int = QUANT_CHUNK_NUMEL) -> Linear4bit:
    """llama.load.quantize_weight for FSDP: a Linear4bit whose packed bytes and absmax are meta
    tensors of the whole weight's shape, holding in `.rows` (packed, absmax) of this rank's rows only,
    for shard_model to put in place. Every rank must call it for every weight (it gathers)."""
    out_features, in_features = weight.shape
    group, groups, blocks = _row_groups(out_features, in_features, blocksize)
    first, last = _rows_of_rank(groups)
    per = math.ceil(groups / world_size())
    mine = None
    if last > first:                              # the same call as one process makes, on these rows only
        mine = Linear4bit.from_weight(weight[first * group:last * group], None, blocksize, double_quant=False,
                                      compute_dtype=dtype, device=device, weight_dtype=dtype, chunk_numel=chunk_numel)
    # Double quantization needs every block's fp32 absmax (one mean, scales per 256 blocks): gather
    # them. Rank r's share starts at row group r * per, which is where it lands in the gathered
    # buffer too (only the last ranks hold fewer), so the first groups * blocks values are the whole.
    padded = torch.zeros(per * blocks, dtype=torch.float32, device=device)
    if mine is not None:
        padded[:mine.absmax.numel()] = mine.absmax
    gathered = torch.empty(world_size() * per * blocks, dtype=torch.float32, device=device)
    dist.all_gather_single(gathered, padded)
    state = QuantState(absmax=gathered[:groups * blocks].clone(), shape=weight.shape, dtype=dtype,
                       blocksize=blocksize, code=nf4_code(device))
    state = double_quantize(state) if double_quant else state
    packed = mine.packed if mine is not None else torch.empty(0, dtype=torch.uint8, device=device)
    return _skeleton(state, dtype, packed.view(last - first, group * in_features // 2),     # [my row groups, bytes]
                     state.absmax[first * blocks:last * blocks].view(last - first, blocks))  # [my row groups, blocks]


def _skeleton(state: QuantState, dtype: torch.dtype, packed: torch.Tensor, absmax: torch.Tensor) -> Linear4bit:
    """A Linear4bit of the whole weight's shape whose packed bytes and absmax are meta tensors (no
    memory), the rest of `state` real, and this rank's rows (packed, absmax) in `.rows`."""
    n = state.shape[0] * state.shape[1]
    skeleton = Linear4bit(torch.empty((n + 1) // 2, dtype=torch.uint8, device="meta"),
                          replace(state, absmax=torch.empty(state.absmax.shape, dtype=state.absmax.dtype,
                                                            device="meta")), None, dtype)
    skeleton.rows = (packed, absmax)
    return skeleton


def shard_stored(layer: Linear4bit, device) -> Linear4bit:
    """What shard_quantizer makes, for a weight a checkpoint already stores in 4-bit: `layer`, read to
    the host, -> a skeleton whose `.rows` hold this rank's row groups of its packed bytes and absmax
    on `device`; the second level of double quantization and the code books go to `device` whole.
    So a rank's GPU never holds the whole packed weight (a pre-quantized 70B on 24 GB cards)."""
    state = layer.state
    group, groups, blocks = _row_groups(layer.out_features, layer.in_features, layer.blocksize)
    first, last = _rows_of_rank(groups)
    packed = layer.packed.view(groups, group * layer.in_features // 2)[first:last]      # [my row groups, bytes]
    absmax = state.absmax.view(groups, blocks)[first:last]                              # [my row groups, blocks]
    return _skeleton(state.to(device), layer.compute_dtype, packed.to(device), absmax.to(device))


def _shardable(layer: Linear4bit) -> None:
    """packed and absmax (buffers, 1-D) -> frozen 2-D parameters [row groups, ...], which FSDP2 shards."""
    group = row_group(layer.in_features, layer.blocksize)
    groups = layer.out_features // group
    for name in ("packed", "absmax"):
        tensor = getattr(layer, name)
        delattr(layer, name)
        setattr(layer, name, nn.Parameter(tensor.view(groups, -1), requires_grad=False))


def _shard_of(local: torch.Tensor, like) -> nn.Parameter:
    """A frozen parameter: the DTensor of sharded parameter `like` whose local rows are `local`."""
    from torch.distributed.tensor import DTensor
    return nn.Parameter(DTensor.from_local(local, like.device_mesh, like.placements, run_check=False,
                                           shape=like.shape, stride=like.stride()), requires_grad=False)


def shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    """FSDP2 in place: every block of the model's ModuleLists, then the root; gradients summed
    (see the top); the rows shard_quantizer kept put into their sharded parameters."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    for layer in layers:
        _shardable(layer)
    mesh = init_device_mesh(device.type, (world_size(),))
    for block in blocks_of(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)      # the root: embeddings, final norm, lm_head (kept whole from forward to backward)
    for module in model.modules():
        if isinstance(module, FSDPModule):       # a plain SUM (gloo has no pre-scaled sum), divided by nothing
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    for layer in layers:
        if hasattr(layer, "rows"):     # assign=True: FSDP2's load hook takes the new shards as its own
            packed, absmax = layer.rows
            shards = {"packed": _shard_of(packed, layer.packed), "absmax": _shard_of(absmax, layer.absmax)}
            layer.load_state_dict(shards, strict=False, assign=True)
            del layer.rows
    return model


def _is_dtensor(t) -> bool:
    if not dist.is_initialized():                  # (and no import of DTensor in one process)
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def _local_rows(whole: torch.Tensor, like) -> torch.Tensor:
    """This rank's rows of a whole tensor, cut as the sharded tensor `like` is."""
    local = like.to_local()
    start = rank() * math.ceil(like.shape[0] / world_size())
    return whole[start:start + local.shape[0]]


def copy_whole_(param: torch.Tensor, whole: torch.Tensor) -> None:
    """param.copy_(whole), for a sharded (FSDP2) parameter this rank's rows of it."""
    if _is_dtensor(param):
        param.to_local().copy_(_local_rows(whole, param))
    else:
        param.copy_(whole)


def _whole(local: torch.Tensor, like) -> torch.Tensor:
    """The whole tensor (on the CPU) whose shards, cut as `like` is, are every rank's `local`."""
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=like.stride()).full_tensor().cpu()


# ----------------------------------------------------------------------------- wrapping, saving, resuming

def _sum_gradients(_, bucket):
    """DDP comm hook: the sum of the ranks' gradients (each rank's loss is already / all ranks' tokens)."""
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])


def wrap(model: nn.Module, cfg, device: torch.device) -> nn.Module:
    """What the training step calls: the model itself in one process; with torchrun a DDP wrapper of
    it, or (distributed: fsdp) the model sharded in place. Ranks then draw their own dropout masks."""
    if not dist.is_initialized():
        return model
    if world_size() > 1:                           # (one rank keeps one process's random numbers)
        torch.manual_seed(cfg.seed + rank())
    if cfg.distributed == "fsdp":
        return shard_model(model, device)
    from torch.nn.parallel import DistributedDataParallel
    with torch.no_grad():                          # the adapters start the same on every rank
        for p in model.parameters():
            if p.requires_grad:
                dist.broadcast(p, 0)
    # No buffer syncing, at init or per forward: the 4-bit weights are buffers, identical everywhere
    # (every rank loaded the same files) and never updated.
    # torch 2.13 renamed broadcast_buffers to forward_sync_buffers (the old name warns); torch 2.11, the
    # GPU machine's, knows only the old one.
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  init_sync=False, gradient_as_bucket_view=True, **no_buffer_sync)
    ddp.register_comm_hook(None, _sum_gradients)
    return ddp


def no_sync(step_model: nn.Module):
    """What makes the context of the micro-batches before a step's last: DDP's no_sync (no all-reduce
    yet); nullcontext otherwise (FSDP2 reduce-scatters the few LoRA gradients of every micro-batch)."""
    return step_model.no_sync if hasattr(step_model, "no_sync") else nullcontext


def whole_trainable(model: nn.Module) -> dict | None:
    """{name: whole tensor on the CPU} of the trainable parameters, gathered from FSDP2 shards (every
    rank must call it); None when they are whole already (DDP, one process)."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not any(_is_dtensor(p) for p in params.values()):
        return None
    return {name: p.full_tensor().cpu() for name, p in params.items()}


def whole_optimizer_state(optimizer) -> dict:
    """optimizer.state_dict() with FSDP2-sharded moments gathered whole (every rank must call it)."""
    state = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, p in enumerate(params):
        if index in state["state"] and _is_dtensor(p):
            for key in ("exp_avg", "exp_avg_sq"):
                state["state"][index][key] = _whole(optimizer.state[p][key], p)
    return state


def local_optimizer_state(state: dict, optimizer) -> dict:
    """A saved (whole) optimizer state with each moment cut to this rank's rows of its parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, saved in state["state"].items():
        if _is_dtensor(params[index]):
            for key in ("exp_avg", "exp_avg_sq"):
                saved[key] = _local_rows(saved[key], params[index])
    return state


def rng_of_this_rank(state: dict) -> dict | None:
    """The RNG state this rank resumes with: its own when the checkpoint was saved by as many ranks
    as this run has, else None (the rank keeps its fresh seed)."""
    saved = state.get("rng_of_ranks") or [state["rng"]]
    return saved[rank()] if len(saved) == world_size() else None


def resume_notes(state: dict, cfg) -> list[str]:
    """Lines for a resume under another number of ranks than the checkpoint's: what changes."""
    saved = state.get("world_size", 1)
    if saved == world_size():
        return []
    before = saved * cfg.micro_batch_size * state.get("config", {}).get("gradient_accumulation_steps",
                                                                         cfg.gradient_accumulation_steps)
    now = world_size() * cfg.micro_batch_size * cfg.gradient_accumulation_steps
    return [f"note: the checkpoint was saved by {saved} rank(s), this run has {world_size()}: the weights, optimizer "
            f"state and data position carry over; {before} -> {now} rows per step"
            f"{'' if before == now else ' (set batch_size to keep it)'}; dropout's random numbers start afresh"]


def memory_report(model: nn.Module, device: torch.device) -> list[str]:
    """Per rank: the frozen base's bytes it holds (of the whole), peak GPU memory, peak host RSS."""
    from qlora.trainer import memory_gib
    mine, whole = 0, 0
    for t in [p for p in model.parameters() if not p.requires_grad] + list(model.buffers()):
        local = t.to_local() if _is_dtensor(t) else t
        mine += local.numel() * local.element_size()
        whole += t.numel() * t.element_size()
    gpu = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    rss = memory_gib(torch.device("cpu"))
    rows = gather_objects((mine, whole, gpu, rss))
    return [f"rank {r}: base weights {m / 2**20:.2f} of {w / 2**20:.2f} MiB ({m / w:.3f}), peak GPU {g:.2f} GiB, "
            f"peak host RSS {h:.2f} GiB" for r, (m, w, g, h) in enumerate(rows)]
