"""The training step's setup, shared by train.py and bench/train_step.py (so the benchmark times
train.py's code): device and compute dtype, optimizer and learning-rate schedule, autocast and
loss scaling, token-weighted gradient accumulation, the optimizer step, and peak memory (GPU
allocated, or the process's RSS on the CPU).
"""

import math
import sys
from contextlib import nullcontext

import torch

from qlora.config import TrainConfig
from qlora.loss import label_count
from qlora.paged_adamw import PagedAdamW


def pick_device(name: str) -> torch.device:
    """auto: the current GPU (as cuda:N, which every loader accepts) or the CPU; else the named device.

    A device that is not there is a ValueError naming it, before anything is loaded."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r} is not supported here: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ValueError(f"--device {name!r} but no CUDA GPU is visible (torch {torch.__version__}, {built}): "
                             "use --device cpu, or auto")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name!r}: there are only {torch.cuda.device_count()} GPU(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def pick_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """The compute dtype: bf16 on GPUs that have it, fp16 if asked, fp32 on the CPU (faster there)."""
    if device.type != "cuda":
        return torch.float32
    if cfg.fp16 or (cfg.bf16 == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    if cfg.bf16 is True and not torch.cuda.is_bf16_supported():
        raise ValueError("bf16: true but this GPU has no bf16: set fp16: true")
    return torch.bfloat16 if cfg.bf16 in (True, "auto") else torch.float32


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    """warmup_steps, or warmup_ratio of the run when set (transformers' rule: rounded up)."""
    return math.ceil(cfg.warmup_ratio * total_steps) if cfg.warmup_ratio else cfg.warmup_steps


def lr_factor(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """transformers' schedules (get_cosine_schedule_with_warmup, what axolotl runs): lr rises
    linearly from 0 over the warm-up (step 0 has lr 0; warmup_steps, or warmup_ratio of the run),
    then cosine decay to 0 (or constant)."""
    warmup = warmup_steps(cfg, total_steps)
    if step < warmup:
        return step / max(1, warmup)
    if cfg.lr_scheduler == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(params: list, cfg: TrainConfig, total_steps: int):
    """(PagedAdamW over params, its LambdaLR schedule of lr_factor) as the config says."""
    optimizer = PagedAdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                           paged=cfg.optimizer == "paged_adamw_32bit")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, total_steps))
    return optimizer, scheduler


def load_training_state(optimizer, scheduler, scaler, state: dict, cfg: TrainConfig, total_steps: int) -> None:
    """Restore optimizer, schedule and loss scaler from a checkpoint's state, then apply this run's
    learning rate and weight decay (a resume may change them): the schedule goes on from the saved
    step with the new values. Unchanged values give the very same numbers as the saved ones."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    scheduler.base_lrs = [cfg.learning_rate] * len(optimizer.param_groups)
    for group in optimizer.param_groups:
        group["initial_lr"], group["weight_decay"] = cfg.learning_rate, cfg.weight_decay
        # what LambdaLR.step() set: base_lr * lambda(last_epoch), lambda reading this run's cfg
        group["lr"] = cfg.learning_rate * lr_factor(scheduler.last_epoch, cfg, total_steps)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]   # what get_last_lr() reports


def mixed_precision(device: torch.device, dtype: torch.dtype):
    """(autocast context, GradScaler): autocast to dtype unless fp32; loss scaling only for fp16."""
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    return autocast, scaler


def accumulate_gradients(micro_batches: list[dict], loss_of, backward, num_items: int | None = None,
                         no_sync=nullcontext) -> float:
    """Backward over one optimizer step's micro-batches, token-weighted -> the step's loss.

    loss_of(batch, num_items) is the batch's token-loss sum / num_items, the label tokens of the
    whole step (qlora/loss.py), so the accumulated gradient is that of one batch holding every
    micro-batch's rows (transformers >= 4.46 does the same). num_items: that count when the step
    spans several ranks (qlora/distributed.py), default these micro-batches'; no_sync: the context
    of the micro-batches before the last (DDP's, which holds back the all-reduce).
    """
    if num_items is None:
        num_items = sum(label_count(b["labels"]) for b in micro_batches)
    total = 0.0
    for i, batch in enumerate(micro_batches):
        with no_sync() if i < len(micro_batches) - 1 else nullcontext():
            loss = loss_of(batch, num_items)
            backward(loss)
        total = total + loss.detach()      # summed on the device: no host sync per micro-batch
    return float(total)                    # one sync per optimizer step (train.py checks it is finite)


def optimizer_step(optimizer, scaler, scheduler, params, max_grad_norm: float) -> tuple[float, float]:
    """Unscale (fp16), clip the grad norm, step, zero the grads, advance the schedule -> (grad norm, lr)."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)   # a device tensor: no sync yet
    if hasattr(grad_norm, "full_tensor"):          # FSDP2's sharded gradients: a DTensor norm
        grad_norm = grad_norm.full_tensor()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    lr = scheduler.get_last_lr()[0]
    scheduler.step()
    # Read back last: the update's kernels are queued by now, so the GPU works while the host waits.
    return grad_norm.item(), lr


def memory_gib(device: torch.device) -> float:
    """Peak memory so far, GiB: on a GPU what PyTorch allocated there; elsewhere the process's peak
    resident set size (all of it: Python, the model, the data), or 0 where the OS does not say."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource                               # Unix only
    except ImportError:
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20   # bytes on macOS, KiB on Linux
