"""LoRA adapters on frozen (4-bit or 16/32-bit) linear layers: the layer, its autograd Function, and
putting adapters on a model. Adapter files and merged export are in qlora/adapter.py.

QLoRA paper (arXiv 2305.14314) section 3, eq. 5-6: the frozen base weight W (NF4 in QLoRA) is
dequantized for the matmul, and a low-rank update B A is added beside it,

    Y = X W^T + s * (X A^T) B^T,    s = alpha / r   (alpha / sqrt(r) with rsLoRA)

so only A [r, in] and B [out, r] are trained; gradients flow through the frozen W to X but W
itself never gets one. LoRALinear.reference_forward is that line as plain autograd ops; forward
computes the same through LoRAFunction, one autograd node (tests/test_lora.py checks they agree).
"""

import math

import torch
import torch.nn as nn

from kernels.common import use_kernel
from kernels.lora_grad import LORA_GRAD_DTYPES, lora_dropout_grad_
from qlora import checkpointing
from qlora.linear4bit import Linear4bit, cast, compute_dtype

ADAPTER_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------- the layer

class LoRALinear(nn.Module):
    """A frozen linear layer (nn.Linear or Linear4bit) plus a trainable low-rank update (eq. 5)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        _check_lora_args(r, alpha, dropout, dtype)
        if not isinstance(base, (nn.Linear, Linear4bit)):
            raise ValueError(f"LoRALinear wraps nn.Linear or Linear4bit, got {type(base).__name__}")
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        # rsLoRA (Kalajdzievski 2023, arXiv 2312.03732) divides by sqrt(r) so that raising r does
        # not shrink the update.
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # A as PEFT (and Microsoft's loralib) initialise it: nn.Linear's default Kaiming-uniform;
        # B = 0, so the model starts exactly at the base model. A is drawn on the CPU in fp32 and
        # then moved, as PEFT does, so the same seed gives the same A on any device.
        lora_a = torch.empty(r, self.in_features)
        nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
        device = _device_of(base)
        if device.type == "meta":          # a base whose shards arrive later (FSDP2, qlora/distributed.py):
            device = torch.device("cpu")   # A's values must live somewhere until fully_shard moves them
        self.lora_a = nn.Parameter(lora_a.to(device, dtype))                            # [r, in]
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=dtype))  # [out, r]
        self.merged = False
        # Layers reading the same input (q/k/v, gate/up) may draw one dropout mask for it and share
        # one A product (shared_input_forward); PEFT draws a mask per layer. Off unless asked for.
        self.shared_dropout = False

    @property
    def dropout_p(self) -> float:
        """The dropout probability this forward applies (0 in eval mode)."""
        return self.dropout.p if self.training and isinstance(self.dropout, nn.Dropout) else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        y = checkpointing.kept_output(self, lambda: self.base(x)) if checkpointing.keeping() else None
        return LoRAFunction.apply(x, self.lora_a, self.lora_b, self.base, self.scaling, self.dropout_p, y)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """forward in its textbook form (eq. 5), plain autograd ops: x W^T + s * dropout(x) A^T B^T.

        Computed in x's dtype (forward uses autocast's when it is on). Given the same random state
        it draws the same dropout mask as forward, so the two agree up to rounding.
        """
        if self.merged:
            return self.base(x)
        a, b = self.lora_a.to(x.dtype), self.lora_b.to(x.dtype)                # [r, in], [out, r]
        return self.base(x) + self.scaling * (self.dropout(x) @ a.t() @ b.t())  # (..., out)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, fp32 [out, in]: what merging adds to the base weight."""
        return (self.lora_b.detach().float() @ self.lora_a.detach().float()) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """The base weight (dequantized if 4-bit) plus the update, fp32 [out, in]."""
        if self.merged:                               # the base weight holds the update already
            return base_weight(self.base)
        return base_weight(self.base) + self.delta_weight()

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into an nn.Linear base weight, so forward costs one matmul."""
        if isinstance(self.base, Linear4bit):
            # Re-quantizing W + BA to NF4 would throw away most of what the adapter learned (its
            # entries are far below one NF4 step), so 4-bit models merge only on export.
            raise ValueError("cannot merge into a 4-bit base in place (re-quantizing loses the update): "
                             "use merged_state_dict(model) or save_merged(...) to export a merged model")
        if self.merged:
            raise RuntimeError("layer is merged already; call unmerge() first")
        self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again (exact up to rounding of the base weight's dtype)."""
        if not self.merged:
            raise RuntimeError("layer is not merged; nothing to unmerge")
        self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, use_rslora={self.use_rslora}, "
                f"dtype={self.lora_a.dtype}, merged={self.merged}")


class LoRAFunction(torch.autograd.Function):
    """out = base(x) + s * dropout(x) A^T B^T (eq. 5) as one autograd node, forward and backward.

    Autograd on the plain ops records ~10 nodes per adapted layer (dropout, casts, two matmuls, a
    scale, an add); 224 such layers on Llama-2-7B, run twice under gradient checkpointing, made the
    step wait on Python (the H100 profile in docs/benchmarks.md). Here the adapter runs in the compute
    dtype of x (bf16 in QLoRA) with A and B cast once, s is applied in addmm's epilogue, and backward
    computes from what it needs and nothing else:

        h = xd A^T,  xd = dropout(x)                 saved: xd, the dropout mask, h (tokens x r)
        grad_B = s g^T h          grad_A = (s g B)^T xd
        grad_x = g W + mask / (1 - p) * ((s g B) A)   (W frozen: no weight gradient, eq. 6)

    base is nn.Linear or Linear4bit; its forward runs as usual (for a 4-bit base: the Triton dequant
    and cuBLAS, or the decode GEMV), and its input gradient comes from _base_grad_input. y, when
    given, is base(x) computed already (selective recompute keeps it: qlora/checkpointing.py).
    """

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, base, scaling: float, p: float, y=None):
        dtype = compute_dtype(x)
        a, b = cast(lora_a, dtype), cast(lora_b, dtype)               # [r, in], [out, r]
        fresh = y is None
        y = cast(_base_forward(base, x) if fresh else y, dtype)       # (..., out); autocast's dtype already
        x2 = cast(x.reshape(-1, x.shape[-1]), dtype)                   # (M, in)
        xd, mask = torch.native_dropout(x2, p, True) if p > 0 else (x2, None)   # (M, in), bool (M, in)
        h = xd @ a.t()                                                  # (M, r)
        # In place when y is this call's own fresh tensor (out-of-place addmm would first copy it);
        # a kept y is read again by the recompute, so it stays as it is.
        y2 = y.reshape(-1, y.shape[-1])
        out = y2.addmm_(h, b.t(), alpha=scaling) if fresh else torch.addmm(y2, h, b.t(), alpha=scaling)
        ctx.save_for_backward(xd, mask, h, a, b)
        ctx.base, ctx.scaling, ctx.p = base, scaling, p
        return out.view(y.shape)

    @staticmethod
    def backward(ctx, grad_out):
        xd, mask, h, a, b = ctx.saved_tensors
        s = ctx.scaling
        g = grad_out.reshape(-1, grad_out.shape[-1])                   # (M, out)
        gh = (g @ b).mul_(s)                                            # (M, r): the gradient reaching h
        grad_a = gh.t() @ xd if ctx.needs_input_grad[1] else None       # (r, in)
        grad_b = (g.t() @ h).mul_(s) if ctx.needs_input_grad[2] else None   # (out, r)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _base_grad_input(ctx.base, g)                      # (M, in) = g W
            if mask is None:
                grad_x.addmm_(gh, a)                                    # + (s g B) A, in the epilogue
            elif use_kernel(grad_x, LORA_GRAD_DTYPES) and grad_x.is_contiguous():
                lora_dropout_grad_(grad_x, gh, a, mask, 1 / (1 - ctx.p))   # one Triton kernel, same math
            else:
                grad_x.addcmul_(gh @ a, mask, value=1 / (1 - ctx.p))    # dropout's backward: mask / (1 - p)
            grad_x = grad_x.view(*grad_out.shape[:-1], grad_x.shape[-1])
        # Autograd casts grad_a and grad_b to the adapter's storage dtype (fp32 by default).
        return grad_x, grad_a, grad_b, None, None, None, None


class SharedInputLoRAFunction(torch.autograd.Function):
    """Several adapted layers that read one input x (q/k/v; gate/up) as one autograd node: one
    dropout of x and one product with the concatenated A of all of them (eq. 5 for each layer g):

        xd = dropout(x),  h = xd [A_1; ...; A_G]^T      (M, R), R = r_1 + ... + r_G
        out_g = base_g(x) + s_g h[:, R_g] B_g^T
        grad_x = sum_g g_g W_g + mask / (1 - p) * ([s_1 g_1 B_1, ..., s_G g_G B_G] [A_1; ...; A_G])

    The layers share one dropout mask of x where LoRALinear (and PEFT) would draw one each (see
    shared_input_forward). x is read once instead of G times, and backward saves one xd and one
    mask instead of G. Inputs after the settings: A_1..A_G, then B_1..B_G.
    """

    @staticmethod
    def forward(ctx, x, bases, scalings, p: float, kept, *ab):
        G = len(bases)
        dtype = compute_dtype(x)
        a = torch.cat(ab[:G]).to(dtype) if G > 1 else cast(ab[0], dtype)   # [R, in]
        bs = [cast(b, dtype) for b in ab[G:]]                              # [out_g, r_g] each
        x2 = cast(x.reshape(-1, x.shape[-1]), dtype)                       # (M, in)
        xd, mask = torch.native_dropout(x2, p, True) if p > 0 else (x2, None)   # (M, in), bool (M, in)
        h = xd @ a.t()                                                      # (M, R)
        outs, start = [], 0
        for base, s, b, y in zip(bases, scalings, bs, kept):
            r = b.shape[1]
            fresh = y is None
            y2 = cast(_base_forward(base, x) if fresh else y, dtype).reshape(-1, b.shape[0])   # (M, out_g)
            hg = h[:, start:start + r]                                      # (M, r_g), a view
            out = y2.addmm_(hg, b.t(), alpha=s) if fresh else torch.addmm(y2, hg, b.t(), alpha=s)
            outs.append(out.view(*x.shape[:-1], b.shape[0]))
            start += r
        ctx.save_for_backward(xd, mask, h, a, *bs)
        ctx.bases, ctx.scalings, ctx.p = bases, scalings, p
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outs):
        xd, mask, h, a, *bs = ctx.saved_tensors
        G = len(bs)
        gs = [g.reshape(-1, g.shape[-1]) for g in grad_outs]                 # (M, out_g) each
        ghs = [(g @ b).mul_(s) for g, b, s in zip(gs, bs, ctx.scalings)]     # (M, r_g): gradient at h
        gh = torch.cat(ghs, dim=1) if G > 1 else ghs[0]                     # (M, R)
        grad_as, grad_bs, start = [None] * G, [None] * G, 0
        grad_a = gh.t() @ xd if any(ctx.needs_input_grad[5:5 + G]) else None  # (R, in)
        for i, (g, b, s) in enumerate(zip(gs, bs, ctx.scalings)):
            r = b.shape[1]
            if grad_a is not None and ctx.needs_input_grad[5 + i]:
                grad_as[i] = grad_a[start:start + r]                         # (r_g, in)
            if ctx.needs_input_grad[5 + G + i]:
                grad_bs[i] = (g.t() @ h[:, start:start + r]).mul_(s)         # (out_g, r_g)
            start += r
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _base_grad_input(ctx.bases[0], gs[0])                   # (M, in) = g_1 W_1
            for base, g in zip(ctx.bases[1:], gs[1:]):
                _base_grad_input(base, g, out=grad_x)                        # + g_g W_g
            if mask is None:
                grad_x.addmm_(gh, a)
            elif use_kernel(grad_x, LORA_GRAD_DTYPES) and grad_x.is_contiguous():
                lora_dropout_grad_(grad_x, gh, a, mask, 1 / (1 - ctx.p))
            else:
                grad_x.addcmul_(gh @ a, mask, value=1 / (1 - ctx.p))
            grad_x = grad_x.view(*grad_outs[0].shape[:-1], grad_x.shape[-1])
        return grad_x, None, None, None, None, *grad_as, *grad_bs


def shared_input_forward(layers, x: torch.Tensor) -> list[torch.Tensor]:
    """[layer(x) for layer in layers] for layers that read the same x (q/k/v; gate/up), as one
    SharedInputLoRAFunction where the result is that of the layers one by one or the user asked for
    a shared mask: all are unmerged LoRALinear layers of one adapter dtype, with one dropout p, and
    p is 0 or every layer has shared_dropout set. Otherwise (PEFT's semantics: one mask per layer)
    each layer runs on its own."""
    first = layers[0]
    if not isinstance(first, LoRALinear):
        return [layer(x) for layer in layers]
    p = first.dropout_p
    for layer in layers:
        if (not isinstance(layer, LoRALinear) or layer.merged or layer.dropout_p != p
                or layer.lora_a.dtype != first.lora_a.dtype or (p > 0 and not layer.shared_dropout)):
            return [layer(x) for layer in layers]
    keep = checkpointing.keeping()
    kept = [checkpointing.kept_output(layer, lambda layer=layer: layer.base(x)) if keep else None
            for layer in layers]
    bases = [layer.base for layer in layers]
    scalings = [layer.scaling for layer in layers]
    return list(SharedInputLoRAFunction.apply(x, bases, scalings, p, kept, *[layer.lora_a for layer in layers],
                                              *[layer.lora_b for layer in layers]))


def _base_forward(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """base(x) inside a Function's forward (grad off): a 4-bit base without its own NF4Matmul node."""
    return base.product(x) if isinstance(base, Linear4bit) else base(x)


def _base_grad_input(base: nn.Module, grad_y: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """grad_y @ W for the frozen base layer (nn.Linear or Linear4bit), in grad_y's dtype; added into
    `out` (in place, in the product's epilogue) when given."""
    if isinstance(base, Linear4bit):
        return base.grad_input(grad_y, out)
    w = cast(base.weight, grad_y.dtype)
    return grad_y @ w if out is None else out.addmm_(grad_y, w)


def _check_lora_args(r, alpha, dropout, dtype) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
    if not alpha > 0:
        raise ValueError(f"lora alpha must be > 0, got {alpha!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"lora dropout must be in [0, 1), got {dropout!r}")
    if dtype not in ADAPTER_DTYPES:
        raise ValueError(f"adapter dtype {dtype} is not supported: use torch.float32, torch.bfloat16 or torch.float16")


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()))
    return tensor.device


def base_weight(base: nn.Module) -> torch.Tensor:
    """The frozen weight [out, in] in fp32, dequantized if the base is 4-bit."""
    if isinstance(base, Linear4bit):
        return base.dequantize(torch.float32)
    return base.weight.detach().float()


# ----------------------------------------------------------------------------- the model

def _matches(name: str, target: str) -> bool:
    # PEFT's rule: a target is a module path or its last parts ("q_proj" matches "...self_attn.q_proj").
    return name == target or name.endswith("." + target)


def linear_layers(model: nn.Module) -> list[str]:
    """Paths of the model's linear layers that LoRA may adapt (nn.Linear, Linear4bit or LoRALinear,
    not those inside a LoRALinear, not lm_head), in module order."""
    return [name for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, Linear4bit, LoRALinear)) and name.split(".")[-1] != "lm_head"
            and not isinstance(_parent_of(model, name), LoRALinear)]


def check_target_names(targets: list[str] | str, valid: list[str] | tuple[str, ...]) -> None:
    """Raise unless targets is "all-linear" or a non-empty list of (paths ending in) `valid` names."""
    if targets == "all-linear":
        return
    if isinstance(targets, str) or not targets:
        raise ValueError(f"targets must be 'all-linear' or a non-empty list of {list(valid)}, got {targets!r}")
    unknown = [t for t in targets if not isinstance(t, str) or t.split(".")[-1] not in valid]
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {unknown}: valid names are {list(valid)} or 'all-linear'")


def find_lora_targets(model: nn.Module, targets: list[str] | str) -> list[str]:
    """Paths of the modules `targets` selects: a list of names like "q_proj" (or full module paths,
    as PEFT writes them), or "all-linear" for every linear layer except lm_head. The valid names are
    the model's own: Llama's q_proj ... down_proj, Falcon's query_key_value, dense, dense_h_to_4h,
    dense_4h_to_h (any model's linear layers, transformers' included)."""
    layers = linear_layers(model)
    if targets == "all-linear":
        names = [name for name in layers if not isinstance(model.get_submodule(name), LoRALinear)]
        if not names:
            raise ValueError("'all-linear' found no nn.Linear or Linear4bit layer (besides lm_head) to adapt")
        return names
    check_target_names(targets, list(dict.fromkeys(name.split(".")[-1] for name in layers)))
    names = [name for name, _ in model.named_modules() if any(_matches(name, t) for t in targets)]
    for target in targets:
        if not any(_matches(name, target) for name in names):
            raise ValueError(f"LoRA target {target!r} matches no module of the model: "
                             "is this the model the target list was made for?")
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            raise ValueError(f"{name} has a LoRA adapter already: apply LoRA to a fresh base model")
        if not isinstance(module, (nn.Linear, Linear4bit)):
            raise ValueError(f"LoRA target {name} is a {type(module).__name__}, not a linear layer")
    return names


def _parent_of(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rpartition(".")[0])


def apply_lora(model: nn.Module, targets: list[str] | str, r: int, alpha: float, dropout: float = 0.0,
               use_rslora: bool = False, dtype: torch.dtype = torch.float32, verbose: bool = True) -> nn.Module:
    """Freeze `model` and wrap the target linear layers in LoRALinear, in place; returns the model.

    Prints PEFT's line "trainable params: X || all params: Y || trainable%: Z" when verbose.
    """
    _check_lora_args(r, alpha, dropout, dtype)
    names = find_lora_targets(model, targets)
    model.requires_grad_(False)
    for name in names:
        parent, _, leaf = name.rpartition(".")
        holder = model.get_submodule(parent)
        setattr(holder, leaf, LoRALinear(getattr(holder, leaf), r, alpha, dropout, use_rslora, dtype))
    if verbose:
        print(trainable_summary(model))
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts. A 4-bit weight counts as out * in parameters (what it
    stands for, as PEFT counts bitsandbytes' Params4bit); its absmax/code buffers are not counted."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.out_features * m.in_features for m in model.modules() if isinstance(m, Linear4bit))
    return trainable, total


def trainable_summary(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    return (f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total:.4f}")


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def share_dropout(model: nn.Module, shared: bool) -> None:
    """Set LoRALinear.shared_dropout on every adapter (config lora_shared_dropout; shared_input_forward)."""
    for layer in lora_layers(model).values():
        layer.shared_dropout = shared
