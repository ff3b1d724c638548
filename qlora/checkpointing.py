"""How a model's blocks run in training: gradient checkpointing (plain, with the block inputs
offloaded to the host, and with a choice of what backward recomputes), compiled blocks, and the
frozen embedding table kept on the host.

QLoRA trains with gradient checkpointing (paper section 4): each block's forward runs twice, once
keeping nothing but the block's input, and again inside backward to rebuild what the block's
gradient needs. What stays on the GPU between the two is one (B, T, C) input per block: for
Llama-2-7B at 2 x 2048 tokens, 32 x 32 MiB = 1 GiB, and at long contexts the largest thing of all.

    gradient_checkpointing: false     every block's activations kept (fastest, most memory)
                            true      each block's input kept on the GPU, the rest recomputed
                            offload   each block's input copied to pinned host memory on a side
                                      stream during forward, and back ahead of its recompute
    recompute:              full      recompute the whole block (with checkpointing on)
                            selective keep the outputs of the block's C-wide frozen products
                                      (KEEP_NAMES: q, k, v, o, down for Llama) and recompute the
                                      rest: the recompute skips 55% of the block's base FLOPs
                                      for 40 KB per token per block (Llama-2-7B)
                            none      no recompute: as gradient_checkpointing false

    torch_compile: true               each block's forward compiled (compile_blocks) for the passes
                                      with gradients, under any of the above but selective

Offloading works through saved-tensor hooks around torch.utils.checkpoint: the checkpoint saves
its inputs as saved tensors, and an enclosing torch.autograd.graph.saved_tensors_hooks decides how
(the block's own activations go through checkpoint's inner hooks, which replace ours). So the
gradients are those of plain checkpointing, bit for bit: the same ops run on the same values.
Unsloth's use_gradient_checkpointing="unsloth" keeps the same thing on the host.
"""

import math
import weakref
from contextlib import contextmanager, nullcontext

import torch
import torch._functorch.config as functorch_config
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from kernels.common import use_kernel
from kernels.embedding import gather_rows

CHECKPOINTING = (False, True, "offload")
RECOMPUTE = ("full", "selective", "none")


# ----------------------------------------------------------------------------- offloaded block inputs

class HostOffload:
    """Saved-tensor hooks that keep each block's input in (pinned) host memory; one per forward pass.

    Forward: the copy to the host runs on a side stream once the input is computed, while the block
    computes; the GPU copy is freed when the block is done with it (record_stream keeps the caching
    allocator from reusing it before the copy has read it). Backward runs the blocks in reverse: when
    block i's recompute asks for its input, the upload of block i-1's input starts on the side
    stream, so it arrives while block i recomputes and back-propagates. On the CPU the "host copy"
    is a plain copy, so the tests run the very same code.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = _copy_stream(device) if self.cuda else None
        self.saved: list[_HostCopy] = []                 # in forward order

    @contextmanager
    def block_input(self, x: torch.Tensor):
        """Offload x where a checkpoint inside this context saves it (the other inputs are kept)."""
        # A weak reference: autograd keeps the hooks with what they saved, and a closure over x
        # itself would keep the GPU copy alive all the same.
        target, ptr, shape = weakref.ref(x), x.data_ptr(), x.shape

        def pack(t):
            if t is not target() and not (t.data_ptr() == ptr and t.shape == shape):
                return t                                 # RoPE tables, masks: shared, small, kept
            return self._offload(t)

        with torch.autograd.graph.saved_tensors_hooks(pack, self._unpack):
            yield

    def _offload(self, t: torch.Tensor) -> "_HostCopy":
        host = PINNED_POOL.take(t.shape, t.dtype, pinned=self.cuda)
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))   # t has been written
            with torch.cuda.stream(self.stream):
                host.copy_(t, non_blocking=True)
            t.record_stream(self.stream)                 # not reused before the copy has read it
        else:
            host.copy_(t)
        entry = _HostCopy(len(self.saved), host, t.requires_grad)
        self.saved.append(entry)
        return entry

    def _upload(self, entry: "_HostCopy") -> None:
        if entry.gpu is not None or not self.cuda:
            return
        main = torch.cuda.current_stream(self.device)
        # Allocated on the compute stream, which uses it; the copy waits for the memory to be free.
        entry.gpu = torch.empty(entry.host.shape, dtype=entry.host.dtype, device=self.device)
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            entry.gpu.copy_(entry.host, non_blocking=True)
            entry.ready = torch.cuda.Event()
            entry.ready.record(self.stream)

    def _unpack(self, entry):
        if not isinstance(entry, _HostCopy):
            return entry
        if not self.cuda:
            x = entry.host.clone()
        else:
            self._upload(entry)
            torch.cuda.current_stream(self.device).wait_event(entry.ready)
            x, entry.gpu = entry.gpu, None               # the recompute holds it from here on
            if entry.index > 0:
                self._upload(self.saved[entry.index - 1])   # the next block backward will ask for
        return x.requires_grad_(entry.requires_grad)


class _HostCopy:
    """One offloaded block input: its host copy, and its GPU copy while one is on its way back.

    No reference back to its HostOffload: a cycle would leave the pinned copies to Python's cyclic
    garbage collector, so they would go back to the caching host allocator some steps late, and the
    next forward would pin fresh memory (cudaHostAlloc, milliseconds per block) instead of reusing."""

    def __init__(self, index: int, host: torch.Tensor, requires_grad: bool):
        self.index, self.host, self.requires_grad = index, host, requires_grad
        self.gpu, self.ready = None, None


_STREAMS: dict = {}


def _copy_stream(device: torch.device):
    """One side stream per GPU for the host copies (made once: stream creation is not free)."""
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _STREAMS:
        _STREAMS[key] = torch.cuda.Stream(device)
    return _STREAMS[key]


def pinned_buffer(nbytes: int, error: str) -> torch.Tensor:
    """A flat uint8 host buffer of exactly nbytes, page-locked with cudaHostRegister (buf.pinned = True).
    Under unified virtual addressing it is mapped into every GPU's address space: DMA copies run from
    it, and kernels can read it directly (kernels/embedding.py). `error` names the setting, with {}
    for the size and the CUDA error: pinned memory is locked RAM, and it can run out."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0)
    if int(err) != 0:
        raise torch.OutOfMemoryError(error.format(f"{nbytes / 2**20:.0f} MiB", f"CUDA error {int(err)}"))
    buf.pinned = True
    return buf


class PinnedPool:
    """Pinned host buffers for the offloaded block inputs, of exact sizes, reused from step to step.

    Why not torch.empty(pin_memory=True): PyTorch's caching host allocator rounds every request up to
    a power of two and keeps what it pinned until empty_cache, so block inputs of 1.5 GiB (196k tokens
    at 7B) pin 2 GiB each, and the blocks of an earlier, shorter step stay pinned beside them. At long
    contexts pinned memory is what runs out first (31 block inputs of 8 KB per token at 7B). So the
    pool registers (cudaHostRegister) plain host buffers of the exact size, hands out the smallest
    free one that holds a request (a view of its front), and when none does, unpins the free ones that
    are too small before pinning a new one: what stays pinned is the longest step's block inputs.

    A buffer comes back when its _HostCopy is freed (at the end of backward). It can be handed out
    again at once: its last use, the upload in backward, and its next, the copy in forward, are both
    on the one side stream of HostOffload, so they run in that order. On the CPU nothing is pinned
    (the tests run the same bookkeeping).
    """

    def __init__(self):
        self.free: list[torch.Tensor] = []               # flat uint8 buffers not handed out
        self.held = 0                                    # bytes of every buffer, free or handed out

    def take(self, shape, dtype: torch.dtype, pinned: bool) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        fitting = [b for b in self.free if b.numel() >= nbytes]
        if fitting:
            buf = min(fitting, key=torch.Tensor.numel)
            self.free.remove(buf)
        else:
            for small in self.free:                      # too small for this step's sizes: unpin
                self._release(small)
            self.free = []
            buf = self._pin(nbytes) if pinned else torch.empty(nbytes, dtype=torch.uint8)
            self.held += nbytes
        host = buf[:nbytes].view(dtype).view(shape)
        weakref.finalize(host, self._give_back, buf)     # back to the pool with the view
        return host

    def _give_back(self, buf: torch.Tensor) -> None:
        self.free.append(buf)

    def _pin(self, nbytes: int) -> torch.Tensor:
        return pinned_buffer(nbytes, "gradient_checkpointing: offload could not pin {} of host memory for a "
                             "block input ({}): use gradient_checkpointing: true, or shorter sequences")

    def _release(self, buf: torch.Tensor) -> None:
        if getattr(buf, "pinned", False):
            torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())
        self.held -= buf.numel()

    def free_bytes(self) -> int:
        return sum(buf.numel() for buf in self.free)

    def empty(self) -> None:
        """Unpin and free every buffer not handed out (a step of another length, or none, comes next)."""
        for buf in self.free:
            self._release(buf)
        self.free = []


PINNED_POOL = PinnedPool()                               # one per process: all GPUs' block inputs


# ----------------------------------------------------------------------------- the embedding table on the host

class HostEmbedding(nn.Module):
    """embeddings_on_host: true. A frozen embedding table kept in pinned host memory, from which the
    GPU gathers the rows a step looks up (kernels/embedding.py: one kernel, no copy of the ids to the
    host, so the host never waits); only those rows, (B, T, C), are in GPU memory: 32 MiB per
    micro-batch of 2 x 2048 at 7B, where the table is 250 MiB that would stay on the GPU all the time.

    Without the kernels (QLORA_FUSED_KERNELS=0, or a CPU without TRITON_INTERPRET=1) the CPU looks the
    rows up and copies them over. The table is neither a parameter nor a buffer, so model.to(), DDP
    and FSDP2 leave it on the host; state_dict() still has it under `<name>.weight` (merged export
    reads that)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.device = weight.device
        weight = weight.detach()
        if self.device.type == "cuda":
            buf = pinned_buffer(weight.numel() * weight.element_size(), "embeddings_on_host: true could not pin "
                                "{} of host memory for the embedding table ({}): set embeddings_on_host: false")
            self.table = buf.view(weight.dtype).view(weight.shape).copy_(weight)      # (vocab, C)
            weakref.finalize(self, torch.cuda.cudart().cudaHostUnregister, buf.data_ptr())
        else:
            self.table = weight.to("cpu")                                             # (vocab, C)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        C = self.table.shape[1]
        if use_kernel(ids, (ids.dtype,)):                                             # read over PCIe
            rows = torch.empty((ids.numel(), C), dtype=self.table.dtype, device=ids.device)  # (B*T, C)
            return gather_rows(self.table, ids.reshape(-1), rows).view(*ids.shape, C)      # (B, T, C)
        cuda = self.device.type == "cuda"
        if cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the embedding table is on the host (embeddings_on_host: true) and the kernels are "
                               "off, which a CUDA graph cannot capture: decode with cuda_graph=False")
        rows = torch.empty((ids.numel(), C), dtype=self.table.dtype, pin_memory=cuda)   # (B*T, C)
        # ids.cpu() waits for the GPU: the ids are ready long before (the first op of a step).
        torch.index_select(self.table, 0, ids.reshape(-1).cpu(), out=rows)
        return rows.view(*ids.shape, C).to(self.device, non_blocking=True)              # (B, T, C)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.table


def embeddings_to_host(model: nn.Module) -> None:
    """Replace each frozen nn.Embedding on a GPU whose table lm_head does not share (tied tables,
    e.g. Falcon's, stay) by a HostEmbedding."""
    head = getattr(getattr(model, "lm_head", None), "weight", None)
    for name, m in list(model.named_modules()):
        if (isinstance(m, nn.Embedding) and m.weight.device.type == "cuda" and not m.weight.requires_grad
                and m.weight is not head):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, HostEmbedding(m.weight))


def set_checkpointing(model: nn.Module, gradient_checkpointing, recompute: str = "full",
                      embeddings_on_host: bool = False) -> None:
    """The model's two settings (module docstring), checked; and the embedding table to the host if asked
    (Unsloth's offload does that too; here it is its own setting, embeddings_on_host)."""
    check_settings(gradient_checkpointing, recompute)
    model.gradient_checkpointing, model.recompute = gradient_checkpointing, recompute
    if embeddings_on_host:
        embeddings_to_host(model)


# ----------------------------------------------------------------------------- selective recompute

class KeptOutputs:
    """The frozen products a selectively recomputed block keeps: forward stores each chosen layer's
    base output, the recompute takes it back instead of computing it again (qlora.lora asks
    `kept_output`). One per checkpointed block call; what the recompute never asks for (it stops as
    soon as backward has what it needs) is dropped when the recompute ends."""

    def __init__(self, layers: set):
        self.layers = layers                 # the modules whose base output is kept
        self.stored: dict = {}               # module -> base output (M, out)
        self.reusing = False

    @contextmanager
    def active(self, reusing: bool):
        global _ACTIVE
        outer, _ACTIVE, self.reusing = _ACTIVE, self, reusing
        try:
            yield
        finally:
            _ACTIVE = outer
            if reusing:
                self.stored.clear()

    def contexts(self):
        """torch.utils.checkpoint's context_fn: (forward context, recompute context)."""
        return self.active(reusing=False), self.active(reusing=True)


_ACTIVE: KeptOutputs | None = None


def keeping() -> bool:
    """Whether a selectively recomputed block is running (cheap: asked by every LoRA forward)."""
    return _ACTIVE is not None


def kept_output(layer, compute):
    """The base output of `layer` under selective recompute: computed and stored in the forward pass,
    taken back in the recompute; None where nothing is kept (then the caller computes as usual)."""
    kept = _ACTIVE
    if kept is None or layer not in kept.layers:
        return None
    if kept.reusing and layer in kept.stored:
        return kept.stored.pop(layer)
    with torch.no_grad():                    # W is frozen: the kept product needs no graph
        y = compute()
    kept.stored[layer] = y
    return y


# ----------------------------------------------------------------------------- the blocks

def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: the members of the model's ModuleLists (Llama's layers, Falcon's h)."""
    return [b for m in model.modules() if isinstance(m, nn.ModuleList) for b in m]


def compile_blocks(model: nn.Module) -> int:
    """torch.compile each block's forward (torch_compile: true) -> the number of blocks. One compiled
    region per block, as Unsloth compiles its decoder layers: the ~450 eager ops a 7B block launches
    from Python per pass become a few fused kernels. Identical blocks share one compiled graph (their
    weights are the graph's inputs). run_blocks uses it for passes with gradients only: decoding and
    evaluation run the blocks as they are (their shapes change every call)."""
    blocks = blocks_of(model)
    for block in blocks:
        block.compiled_forward = _without_cse(torch.compile(block.forward))
    return len(blocks)


def _without_cse(compiled):
    """compiled, traced with AOT autograd's common-subexpression elimination off. A LoRA layer's
    backward dequantizes its NF4 weight again (qlora.lora.LoRAFunction); with CSE that second
    dequant(W) and the forward's are one node of the joint graph, and the partitioner then saves the
    bf16 W for backward instead of recomputing it from the 4-bit bytes: a compiled Llama block kept
    its q/k/v/gate/up weights, +0.34 GiB at a 7B step's peak (test_compiled_blocks_save_no_dequantized_weight).
    Inductor still merges repeated work inside each kernel it writes."""
    def forward(*args, **kwargs):
        with functorch_config.patch(cse=False):
            return compiled(*args, **kwargs)
    return forward


def _training_forward(layer):
    return getattr(layer, "compiled_forward", layer) if torch.is_grad_enabled() else layer


def check_settings(gradient_checkpointing, recompute: str) -> None:
    if gradient_checkpointing not in CHECKPOINTING:
        raise ValueError(f"gradient_checkpointing must be true, false or offload, got {gradient_checkpointing!r}")
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {', '.join(RECOMPUTE)}, got {recompute!r}")
    if gradient_checkpointing == "offload" and recompute == "none":
        raise ValueError("gradient_checkpointing: offload needs recompute full or selective "
                         "(with none there is no checkpoint to offload)")


def run_blocks(layers, x: torch.Tensor, args: tuple, gradient_checkpointing=False, recompute: str = "full",
               keep_names: tuple = ()) -> torch.Tensor:
    """x (B, T, C) through every block as layer(x, *args), checkpointed as the two settings say
    (module docstring); keep_names: the leaf names of the linears selective recompute keeps."""
    check_settings(gradient_checkpointing, recompute)
    if not gradient_checkpointing or recompute == "none" or not torch.is_grad_enabled():
        for layer in layers:
            x = _training_forward(layer)(x, *args)
        return x
    if recompute == "selective" and any(hasattr(layer, "compiled_forward") for layer in layers):
        raise ValueError("recompute: selective does not work with compiled blocks (torch_compile): use recompute: full")
    offload = HostOffload(x.device) if gradient_checkpointing == "offload" else None
    last = len(layers) - 1
    for i, layer in enumerate(layers):
        # The last block's input stays: backward asks for it first, right after the loss.
        saving = offload.block_input(x) if offload is not None and i < last else nullcontext()
        kwargs = {}
        if recompute == "selective":
            kept = KeptOutputs({m for name, m in layer.named_modules() if name.rpartition(".")[2] in keep_names})
            kwargs["context_fn"] = kept.contexts
        with saving:
            x = checkpoint(_training_forward(layer), x, *args, use_reentrant=False, **kwargs)
    return x
