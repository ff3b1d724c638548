"""AdamW whose moment tensors live in CUDA unified memory: the paged optimizer of QLoRA.

QLoRA paper (arXiv 2305.14314) section 3, "Paged Optimizers": the optimizer state is allocated
with NVIDIA unified memory, so when a long sequence makes activations spike and the GPU runs out
of memory, the driver evicts state pages to host RAM instead of failing, and pages them back in
before the optimizer update. This file does the same with nothing but the CUDA runtime:

* `managed_zeros` allocates an fp32 tensor with cudaMallocManaged (through ctypes) and hands it to
  PyTorch through `__cuda_array_interface__`; the memory is freed when the tensor dies.
* `prefetch` asks the driver to migrate those pages to the GPU ahead of the update
  (cudaMemPrefetchAsync on the current stream), so the update kernels do not page-fault;
  `page_out` migrates them to host RAM, as the driver does when the GPU runs out of memory.
* `PagedAdamW` is AdamW (Loshchilov & Hutter, decoupled weight decay), with exactly the update
  order and bias correction of torch.optim.AdamW, whose exp_avg / exp_avg_sq come from
  `managed_zeros` when the parameter is on a GPU. On the CPU, or with paged=False, they are
  ordinary tensors and it is a plain AdamW.

The state is fp32 whatever the parameter dtype (as bitsandbytes' PagedAdamW32bit): a bf16
parameter is updated in fp32 and rounded back. The update runs over the parameters in chunks of at
most UPDATE_CHUNK_NUMEL values, so its temporaries (sqrt(v), fp32 copies) stay small beside a 70B
model's 0.8B LoRA values, and each chunk's state is paged in just before its update. With
page_out=True each chunk's state goes back to host RAM after its update: the GPU then holds at most
one chunk of optimizer state, for a memory budget that the state does not fit beside the model in
(bench/large.py). The driver would evict the pages itself only when the GPU is full, which means
oversubscribing managed memory; page_out moves them on purpose instead.
"""

import ctypes
import ctypes.util
import glob
import math
import os
import weakref
from functools import lru_cache

import torch

# bitsandbytes pages only tensors of at least 1e5 elements: smaller ones cost more in page-table
# bookkeeping and prefetch calls than they could ever save, so they stay in ordinary GPU memory.
PAGED_MIN_NUMEL = 100_000
# Values per optimizer-update chunk: 2^26 fp32 values are 256 MiB of temporaries per foreach op.
UPDATE_CHUNK_NUMEL = 2**26

CUDA_MEM_ATTACH_GLOBAL = 1        # cudaMemAttachGlobal: any stream on any device may touch it
CUDA_MEM_LOCATION_TYPE_DEVICE = 1  # cudaMemLocationTypeDevice: `id` is a device ordinal
CUDA_MEM_LOCATION_TYPE_HOST = 2    # cudaMemLocationTypeHost: host RAM (`id` ignored)
CUDA_CPU_DEVICE_ID = -1            # cudaCpuDeviceId: host RAM as a prefetch destination before CUDA 13
CUDA_MEMORY_TYPE_MANAGED = 3       # cudaMemoryTypeManaged, as cudaPointerGetAttributes reports it


# ----------------------------------------------------------------------------- the CUDA runtime

class _MemLocation(ctypes.Structure):
    # struct cudaMemLocation { enum cudaMemLocationType type; int id; } (CUDA >= 12.2)
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _PointerAttributes(ctypes.Structure):
    # struct cudaPointerAttributes (CUDA >= 11); the padding covers fields later releases may add.
    _fields_ = [("type", ctypes.c_int), ("device", ctypes.c_int), ("devicePointer", ctypes.c_void_p),
                ("hostPointer", ctypes.c_void_p), ("_reserved", ctypes.c_long * 16)]


def _find_cudart() -> str:
    """Path of the libcudart PyTorch uses: the copy already loaded, else torch's or nvidia's wheels."""
    # The loaded copy is the one torch's context lives in; on Linux /proc/self/maps names it.
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split(maxsplit=5)[-1].strip()
                if os.path.basename(path).startswith("libcudart.so"):
                    return path
    except OSError:
        pass
    # CUDA builds of torch from pip keep it in site-packages/nvidia/cu13/lib/libcudart.so.13 (CUDA 13)
    # or site-packages/nvidia/cuda_runtime/lib (CUDA 12); older builds bundled it in torch/lib.
    site_packages = os.path.dirname(os.path.dirname(torch.__file__))
    for pattern in ("torch/lib/libcudart*.so*", "nvidia/*/lib/libcudart.so*"):
        found = sorted(glob.glob(os.path.join(site_packages, pattern)))
        if found:
            return found[-1]
    found = ctypes.util.find_library("cudart")
    if found:
        return found
    raise FileNotFoundError("cannot find libcudart: paged=True needs a CUDA build of torch "
                            "(or pass paged=False)")


@lru_cache(maxsize=None)
def _cudart() -> tuple[ctypes.CDLL, int]:
    """The CUDA runtime library with the argument types set, and its version (e.g. 13000)."""
    lib = ctypes.CDLL(_find_cudart())
    lib.cudaGetErrorString.restype = ctypes.c_char_p
    lib.cudaGetErrorString.argtypes = [ctypes.c_int]
    lib.cudaRuntimeGetVersion.argtypes = [ctypes.POINTER(ctypes.c_int)]
    lib.cudaMallocManaged.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_uint]
    lib.cudaFree.argtypes = [ctypes.c_void_p]
    lib.cudaPointerGetAttributes.argtypes = [ctypes.POINTER(_PointerAttributes), ctypes.c_void_p]
    version = ctypes.c_int()
    _check(lib, lib.cudaRuntimeGetVersion(ctypes.byref(version)), "cudaRuntimeGetVersion")
    # CUDA 13 changed cudaMemPrefetchAsync: the destination became a cudaMemLocation struct
    # (passed by value) followed by a flags word; CUDA 12 took a plain device ordinal.
    #   CUDA 12: cudaMemPrefetchAsync(const void *ptr, size_t count, int dstDevice, cudaStream_t stream)
    #   CUDA 13: cudaMemPrefetchAsync(const void *ptr, size_t count, cudaMemLocation location,
    #                                 unsigned int flags, cudaStream_t stream)
    if version.value >= 13000:
        lib.cudaMemPrefetchAsync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, _MemLocation,
                                             ctypes.c_uint, ctypes.c_void_p]
    else:
        lib.cudaMemPrefetchAsync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    return lib, version.value


def _check(lib: ctypes.CDLL, err: int, what: str) -> None:
    if err != 0:
        raise RuntimeError(f"{what} failed with CUDA error {err}: {lib.cudaGetErrorString(err).decode()}")


def _free(ptr: int) -> None:
    lib, _ = _cudart()
    lib.cudaFree(ctypes.c_void_p(ptr))  # cudaFree waits for kernels still using the memory


class _ManagedBuffer:
    """Holds one cudaMallocManaged allocation and describes it to torch (CUDA array interface v3)."""

    def __init__(self, ptr: int, shape: tuple[int, ...]):
        self.ptr = ptr
        self.__cuda_array_interface__ = {"shape": shape, "typestr": "<f4", "data": (ptr, False),
                                         "version": 3, "strides": None}


def managed_zeros(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """An fp32 tensor of zeros in CUDA unified (managed) memory, resident on `device` to start."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    shape = tuple(int(s) for s in shape)
    nbytes = 4 * math.prod(shape)
    # Managed memory can be oversubscribed, but asking for more than the card has free makes the
    # driver thrash (or hang the GPU), so we refuse up front.
    free, total = torch.cuda.mem_get_info(index)
    if nbytes > free:
        raise torch.OutOfMemoryError(
            f"paged optimizer state of {nbytes / 2**20:.1f} MiB does not fit in the {free / 2**20:.1f} MiB "
            f"free on cuda:{index}: free GPU memory first or use paged=False")
    lib, _ = _cudart()
    ptr = ctypes.c_void_p()
    with torch.cuda.device(index):
        _check(lib, lib.cudaMallocManaged(ctypes.byref(ptr), nbytes, CUDA_MEM_ATTACH_GLOBAL),
               "cudaMallocManaged")
        buffer = _ManagedBuffer(ptr.value, shape)
        # torch keeps a reference to `buffer` for as long as the tensor's storage lives (views
        # included); when the last one goes, the buffer dies and the finalizer frees the memory.
        weakref.finalize(buffer, _free, ptr.value).atexit = False  # at exit the driver cleans up
        tensor = torch.as_tensor(buffer, device=torch.device("cuda", index))
    prefetch(tensor)
    tensor.zero_()  # first touch on the GPU: the pages are created there, not on the host
    return tensor


def prefetch(tensor: torch.Tensor) -> None:
    """Ask the driver to move a managed tensor's pages to its GPU, on the current stream."""
    _prefetch_to(tensor, tensor.device.index)


def page_out(tensor: torch.Tensor) -> None:
    """Ask the driver to move a managed tensor's pages to host RAM, on the current stream (after the
    kernels queued before it; the next use on the GPU, or `prefetch`, brings them back)."""
    _prefetch_to(tensor, None)


def _prefetch_to(tensor: torch.Tensor, index: int | None) -> None:
    """cudaMemPrefetchAsync of the tensor's bytes to GPU `index`, or to the host for None."""
    lib, version = _cudart()
    stream = ctypes.c_void_p(torch.cuda.current_stream(tensor.device).cuda_stream)
    nbytes = tensor.numel() * tensor.element_size()
    if version >= 13000:
        location = (_MemLocation(CUDA_MEM_LOCATION_TYPE_HOST, 0) if index is None
                    else _MemLocation(CUDA_MEM_LOCATION_TYPE_DEVICE, index))
        err = lib.cudaMemPrefetchAsync(ctypes.c_void_p(tensor.data_ptr()), nbytes, location, 0, stream)
    else:
        device = CUDA_CPU_DEVICE_ID if index is None else index
        err = lib.cudaMemPrefetchAsync(ctypes.c_void_p(tensor.data_ptr()), nbytes, device, stream)
    _check(lib, err, "cudaMemPrefetchAsync")


def is_managed(tensor: torch.Tensor) -> bool:
    """True if the tensor's memory came from cudaMallocManaged (cudaPointerGetAttributes type 3).

    Works on any tensor when CUDA is available: bitsandbytes' paged state, for one, is managed
    memory wrapped as a CPU tensor.
    """
    if not torch.cuda.is_available():
        return False
    lib, _ = _cudart()
    attributes = _PointerAttributes()
    _check(lib, lib.cudaPointerGetAttributes(ctypes.byref(attributes), ctypes.c_void_p(tensor.data_ptr())),
           "cudaPointerGetAttributes")
    return attributes.type == CUDA_MEMORY_TYPE_MANAGED


# ----------------------------------------------------------------------------- the optimizer

class PagedAdamW(torch.optim.Optimizer):
    """AdamW (torch.optim.AdamW's update) with fp32 moments in CUDA unified memory when paged."""

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, paged: bool = True, page_out: bool = False):
        self.paged = paged
        self.page_out = page_out      # state back to host RAM after each chunk's update (see the top)
        self._slabs: list[torch.Tensor] = []     # the managed memory the paged moments are views of
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def add_param_group(self, param_group: dict) -> None:
        # torch calls this for every group, the defaults filled in: the one place a bad value enters.
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"betas must both be in [0, 1), got {group['betas']}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not wd >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {wd}")
        for p in group["params"]:
            if not p.is_floating_point():
                raise ValueError(f"PagedAdamW can only optimize floating-point parameters, got {p.dtype}")

    def _new_moments(self, params: list[torch.Tensor]) -> None:
        """Zero exp_avg / exp_avg_sq for params; the paged ones are views of one managed slab per
        device, laid out in parameter order (m, v, m, v, ...), so a chunk's state is one range of
        memory: one prefetch call per chunk (`_coalesced`), where 224 LoRA layers of Llama-2-7B made
        896 calls per step."""
        paged = [p for p in params if self._is_paged(_local(p))]   # FSDP2: this rank's rows
        for device in dict.fromkeys(p.device for p in paged):
            mine = [p for p in paged if p.device == device]
            slab = managed_zeros((2 * sum(_local(p).numel() for p in mine),), device)
            self._slabs.append(slab)
            start = 0
            for p in mine:
                shape = _local(p).shape
                n = shape.numel()
                self.state[p]["exp_avg"] = slab[start:start + n].view(shape)             # m, first moment
                self.state[p]["exp_avg_sq"] = slab[start + n:start + 2 * n].view(shape)  # v, second moment
                start += 2 * n
        for p in params:
            if not self._is_paged(_local(p)):
                for key in ("exp_avg", "exp_avg_sq"):
                    self.state[p][key] = torch.zeros(_local(p).shape, dtype=torch.float32, device=p.device)

    def _is_paged(self, tensor: torch.Tensor) -> bool:
        """Whether the state of (or for) a tensor of this size and device lives in managed memory."""
        return self.paged and tensor.is_cuda and tensor.numel() >= PAGED_MIN_NUMEL

    def paged_state(self) -> list[torch.Tensor]:
        """The moments that live in managed memory (those of GPU parameters of >= PAGED_MIN_NUMEL values)."""
        return [m for state in self.state.values() for key in ("exp_avg", "exp_avg_sq")
                if key in state and self._is_paged(m := state[key])]

    def evict_state(self) -> int:
        """Page every managed moment out to host RAM now (queued on the current stream) -> bytes asked to move."""
        moments = self.paged_state()
        for run in _coalesced(moments):
            page_out(run)
        return sum(m.numel() * m.element_size() for m in moments)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        groups = [(group, [p for p in group["params"] if p.grad is not None]) for group in self.param_groups]
        if any(p.grad.is_sparse for _, params in groups for p in params):
            raise ValueError("PagedAdamW does not support sparse gradients")
        fresh = [p for _, params in groups for p in params if not self.state[p]]
        for p in fresh:
            self.state[p]["step"] = 0
        self._new_moments(fresh)                 # every group's at once: one slab
        for group, params in groups:
            if not params:
                continue
            for p in params:
                self.state[p]["step"] += 1
            for chunk in _chunks(params, UPDATE_CHUNK_NUMEL):
                self._update(chunk, group)
        return loss

    def _update(self, params: list[torch.Tensor], group: dict) -> None:
        """AdamW on one chunk of a group's parameters: page its state in, update, page out if asked."""
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
        steps = [self.state[p]["step"] for p in params]
        # Page the moments in before the update reads them (section 3: "automatically evicted to
        # CPU RAM ... and paged back into GPU memory when the memory is needed in the optimizer
        # update step"). The prefetch is queued on the update's stream, so no sync is needed.
        paged = _coalesced([m for m in exp_avgs + exp_avg_sqs if self._is_paged(m)])
        for run in paged:
            prefetch(run)
        # The update runs in fp32: a bf16/fp16 parameter and its gradient are upcast here and the
        # result is rounded back once at the end.
        local = [_local(p) for p in params]                 # FSDP2: this rank's rows
        params32 = [p if p.dtype == torch.float32 else p.float() for p in local]
        grads = [g if g.dtype == torch.float32 else g.float() for g in (_local(p.grad) for p in params)]
        _adamw_update(params32, grads, exp_avgs, exp_avg_sqs, steps, group)
        for p, p32 in zip(local, params32):
            if p32 is not p:
                p.copy_(p32)
        if self.page_out:
            for run in paged:
                page_out(run)            # queued after the update kernels that read it

    def state_dict(self) -> dict:
        """torch's optimizer state dict, with the moments copied to ordinary CPU tensors."""
        sd = super().state_dict()
        sd["state"] = {index: {key: value.detach().to("cpu", copy=True) if torch.is_tensor(value) else value
                               for key, value in state.items()}
                       for index, state in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore hyperparameters and state; the moments go back into (managed) fp32 tensors."""
        saved = state_dict["state"]
        for index, state in saved.items():
            missing = {"step", "exp_avg", "exp_avg_sq"} - set(state)
            if missing:
                raise ValueError(f"optimizer state for parameter {index} lacks {sorted(missing)}: "
                                 "pass a state dict saved by PagedAdamW.state_dict()")
        # torch checks the groups and restores their hyperparameters; we place the moments ourselves,
        # because torch would cast them to the parameter's dtype and put them in ordinary memory.
        super().load_state_dict({"state": {i: {"step": int(s["step"])} for i, s in saved.items()},
                                 "param_groups": state_dict["param_groups"]})
        params = [p for group in self.param_groups for p in group["params"]]
        for index, state in saved.items():
            p = params[index]
            for key in ("exp_avg", "exp_avg_sq"):
                if tuple(state[key].shape) != tuple(_local(p).shape):
                    raise ValueError(f"saved {key} for parameter {index} has shape {tuple(state[key].shape)}, "
                                     f"the parameter has {tuple(_local(p).shape)}: the state dict is for another model")
        self._slabs = []
        self._new_moments([params[index] for index in saved])
        for index, state in saved.items():
            for key in ("exp_avg", "exp_avg_sq"):
                self.state[params[index]][key].copy_(state[key])


def _coalesced(moments: list[torch.Tensor]) -> list[torch.Tensor]:
    """1-D views covering `moments`, those that lie back to back in one slab merged into one view."""
    runs = []                                      # [slab, first value, end]
    for m in sorted(moments, key=lambda t: t.data_ptr()):
        slab = m if m._base is None else m._base
        start = (m.data_ptr() - slab.data_ptr()) // m.element_size()
        if runs and runs[-1][0] is slab and runs[-1][2] == start:
            runs[-1][2] = start + m.numel()
        else:
            runs.append([slab, start, start + m.numel()])
    return [slab.view(-1)[start:end] for slab, start, end in runs]


def _chunks(params: list[torch.Tensor], max_numel: int) -> list[list[torch.Tensor]]:
    """params split, in order, into runs of at most max_numel values (a larger tensor runs alone)."""
    chunks, current, numel = [], [], 0
    for p in params:
        if current and numel + p.numel() > max_numel:
            chunks.append(current)
            current, numel = [], 0
        current.append(p)
        numel += p.numel()
    return chunks + [current] if current else chunks


def _local(t: torch.Tensor) -> torch.Tensor:
    """A parameter or gradient sharded by FSDP2 (a DTensor) -> this rank's shard (the same memory);
    a plain tensor -> itself. The update is elementwise, so each rank updates its own rows."""
    return t.to_local() if hasattr(t, "to_local") else t     # DTensor, by its method (no import for the rest)


def _adamw_update(params, grads, exp_avgs, exp_avg_sqs, steps, group) -> None:
    """One AdamW step on lists of fp32 tensors, in place; the same ops as torch.optim.AdamW."""
    lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    # Decoupled weight decay (Loshchilov & Hutter): shrink the weight itself, not the gradient.
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    # m <- beta1 m + (1 - beta1) g ;  v <- beta2 v + (1 - beta2) g^2
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    # p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    step_sizes = [-lr / (1 - beta1**t) for t in steps]
    bias_correction2_sqrt = [(1 - beta2**t) ** 0.5 for t in steps]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, step_sizes)
