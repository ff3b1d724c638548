"""Llama 2 / Llama 3.x in plain PyTorch: the frozen base model that QLoRA fine-tunes.

The module tree mirrors Hugging Face's LlamaForCausalLM, so `state_dict()` keys are the checkpoint
keys (model.embed_tokens.weight, model.layers.0.self_attn.q_proj.weight, ..., lm_head.weight). The
seven projections of a block are plain attributes: anything with forward(x) fits there (nn.Linear,
qlora.linear4bit.Linear4bit, a LoRA wrapper), which is how QLoRA puts NF4 weights and adapters on
every linear layer of the block (paper section 4, "QLoRA vs. standard finetuning").

    model(input_ids)                    -> logits (B, T, vocab); training, no cache
    model.setup_cache(B, max_len)       then model(ids, start_pos=p) writes and reads the KV cache
                                        (p an int, or a 0-d tensor for a CUDA-graphed decode step)
    model(ids, return_hidden=True)      -> final hidden states (B, T, C) before lm_head
    model(ids, position_ids=P, segment_ids=S)   packed rows (sample_packing): per-row positions P
                                        (B, T) and block-diagonal causal attention within each
                                        row S (B, T) (qlora/attention.py)

RMSNorm, RoPE and SwiGLU run as fused Triton kernels (kernels/rmsnorm.py, rope.py, swiglu.py; the
H100 step profile: norms 71 -> 7 ms, RoPE 50 -> about 5 ms) where kernels.common.use_kernel, the
one kernel switch, says so (on CUDA by default); otherwise as the plain PyTorch below, which the
tests compare the kernels against.
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.common import use_kernel
from kernels.rmsnorm import NORM_DTYPES, rms_norm
from kernels.rope import ROPE_DTYPES, apply_rope_qk
from kernels.swiglu import SWIGLU_DTYPES, swiglu
from qlora.attention import attend, document_mask
from qlora.checkpointing import run_blocks
from qlora.lora import shared_input_forward

# ----------------------------------------------------------------------------- config

@dataclass
class RopeScaling:
    """Llama 3.1 RoPE frequency scaling (config "rope_type": "llama3")."""
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: as many as query heads (Llama 2 7B/13B)
    head_dim: int | None = None             # None: hidden_size // num_attention_heads
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                                 f"{self.num_attention_heads}: set head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}: fix config.json")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")

    @classmethod
    def from_hf(cls, hf: dict) -> "LlamaConfig":
        """Read a Hugging Face config.json dict (Llama 2, Llama 3, 3.1, 3.2; transformers 4 or 5)."""
        if hf.get("model_type", "llama") != "llama":
            raise ValueError(f"model_type {hf['model_type']!r} is not supported: only 'llama' checkpoints load")
        for arch in hf.get("architectures") or ["LlamaForCausalLM"]:
            if arch != "LlamaForCausalLM":
                raise ValueError(f"architectures {arch!r} is not supported: only LlamaForCausalLM checkpoints load")
        for key, value in hf.items():
            if key in _HF_FIELDS or key in _ROPE_FIELDS or key in ("model_type", "architectures"):
                continue
            if key not in _HF_HARMLESS:
                raise ValueError(f"config field {key!r} is not known for Llama: remove it or use a plain Llama checkpoint")
            allowed = _HF_HARMLESS[key]
            if allowed is not None and value not in allowed:
                raise ValueError(f"config field {key}={value!r} is not supported: this Llama needs {key} in {allowed}")
        theta, scaling = _rope_from_hf(hf)
        kwargs = {k: hf[k] for k in _HF_FIELDS if k in hf and hf[k] is not None}
        return cls(**kwargs, rope_theta=theta, rope_scaling=scaling)


# Fields of LlamaConfig that config.json spells the same way.
_HF_FIELDS = tuple(f.name for f in fields(LlamaConfig) if f.name not in ("rope_theta", "rope_scaling"))
# transformers < 5 writes rope_theta + rope_scaling; transformers 5 writes rope_parameters.
_ROPE_FIELDS = ("rope_theta", "rope_scaling", "rope_parameters")
# config.json fields that change nothing in this model, with the values that keep it so (None: any).
# pretraining_tp > 1 only made transformers split each matmul into slices: the same math.
_HF_HARMLESS = {
    "torch_dtype": None, "dtype": None, "transformers_version": None, "_name_or_path": None,
    "initializer_range": None, "use_cache": None, "pretraining_tp": None,
    "hidden_act": ("silu",), "attention_bias": (False,), "mlp_bias": (False,), "attention_dropout": (0, 0.0),
}


def _rope_from_hf(hf: dict) -> tuple[float, RopeScaling | None]:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(hf.get("rope_theta", params.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise ValueError(f"rope_scaling type {kind!r} is not supported: use 'llama3' (Llama 3.1/3.2) or none")
    names = [f.name for f in fields(RopeScaling)]
    for key in params:
        if key not in ("rope_type", "type", "rope_theta", *names):
            raise ValueError(f"rope_scaling field {key!r} is not supported: only {names} (llama3 scaling)")
    if kind == "default":
        return theta, None
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"rope_scaling of type 'llama3' lacks {missing}: add them to config.json")
    return theta, RopeScaling(**{n: params[n] for n in names})


# ----------------------------------------------------------------------------- RoPE

def rope_inv_freq(config: LlamaConfig, device=None) -> torch.Tensor:
    """fp32 [head_dim / 2] rotation frequencies theta^(-2i/d), with Llama 3.1 scaling if configured."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    # Llama 3.1: wavelengths longer than the original context are stretched by `factor`, short ones
    # are kept, and the band between is interpolated smoothly (as Meta's and HF's reference code).
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin [T, head_dim] for integer positions [T] (or [B, T, head_dim] for per-row positions
    [B, T]), computed in fp32 and cast to `dtype`."""
    freqs = positions.float()[..., None] * inv_freq           # (T, hd/2) or (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)                   # (..., hd): HF layout, halves not pairs
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, hd) by position. HF checkpoints pair dim i with dim i + hd/2 (rotate_half).

    cos, sin: (T, hd), or (B, T, hd) when each row has its own positions (packed rows)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]                 # (B, 1, T, hd): every head alike
    x1, x2 = x.chunk(2, dim=-1)                               # (B, H, T, hd/2) each
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# ----------------------------------------------------------------------------- layers

def apply_rope_fused(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The fused RoPE kernel on q (B, nh, T, hd), k (B, nkv, T, hd); cos, sin (T, hd) or (B, T, hd).

    The kernel takes one (T, hd) table shared by the batch; per-row tables (packed rows) are run as
    one row of B*T positions: (B, H, T, hd) views of the projections become (1, H, B*T, hd) views.
    """
    if cos.dim() == 2:
        return apply_rope_qk(q, k, cos, sin)
    B, _, T, hd = q.shape
    flat = lambda x: x.transpose(1, 2).reshape(1, B * T, x.shape[1], hd).transpose(1, 2)   # (1, H, B*T, hd)
    unflat = lambda x: x.transpose(1, 2).reshape(B, T, x.shape[1], hd).transpose(1, 2)     # (B, H, T, hd)
    q, k = apply_rope_qk(flat(q), flat(k), cos.reshape(B * T, hd), sin.reshape(B * T, hd))
    return unflat(q), unflat(k)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_kernel(x, NORM_DTYPES, cuda_only=True) and self.weight.dtype in NORM_DTYPES:
            return rms_norm(x, self.weight, self.eps)     # the same math in one kernel
        # Normalise in fp32 (bf16 sums of squares lose too much), scale in the input dtype, as HF.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class KVCache(nn.Module):
    """Static cache: keys and values of every position, [B, n_kv_heads, max_len, head_dim].

    Its shapes never change: every step writes into and attends over the same memory (positions not
    written yet are masked), so a decode step is one fixed sequence of kernels a CUDA graph can replay.
    """

    def __init__(self, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int, device, dtype):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, n_kv, T, hd) at positions (T,); return the whole cache (B, n_kv, max_len, hd)."""
        B = k.shape[0]
        # index_copy_ takes the positions as a tensor, so no host value enters the step.
        self.k[:B].index_copy_(2, positions, k.to(self.k.dtype))
        self.v[:B].index_copy_(2, positions, v.to(self.v.dtype))
        return self.k[:B], self.v[:B]


def cache_inputs(input_ids: torch.Tensor, start_pos: int | torch.Tensor | None, cache: "KVCache | None",
                 position_ids: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None):
    """positions (T,) of the tokens, and for a cached forward the positions to write and the mask.

    start_pos=None: no cache, positions 0..T-1, (positions, None, None): causal attention. An int
    (or a 0-d int64 tensor, which a CUDA graph can update in place): the tokens sit at
    start_pos..start_pos+T-1 and attend to every earlier cached position, (positions, positions,
    mask (T, max_len)). A tensor start_pos is not range-checked (that would read it back to the host).
    position_ids and segment_ids (B, T), both or neither, no cache: packed rows, (position_ids, None,
    their block-diagonal causal mask from qlora.attention.document_mask).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
    if (position_ids is None) != (segment_ids is None) or (segment_ids is not None and start_pos is not None):
        raise ValueError("packed rows need position_ids and segment_ids together, and no start_pos")
    if segment_ids is not None:
        return position_ids, None, document_mask(segment_ids)                    # (B, T), per-row mask
    B, T = input_ids.shape
    positions = torch.arange(T, device=input_ids.device) + (0 if start_pos is None else start_pos)  # (T,)
    if start_pos is None:
        return positions, None, None
    if cache is None:
        raise ValueError("start_pos given but there is no KV cache: call model.setup_cache(...) first")
    batch, max_len = cache.k.shape[0], cache.k.shape[2]
    if isinstance(start_pos, int) and (B > batch or start_pos + T > max_len):
        raise ValueError(f"batch {B} x positions {start_pos}..{start_pos + T - 1} do not fit the cache "
                         f"{batch} x {max_len}: call setup_cache with larger sizes")
    # Query at position p sees cached positions 0..p: causal over the whole static cache.
    mask = positions[:, None] >= torch.arange(max_len, device=input_ids.device)[None, :]  # (T, max_len)
    return positions, positions, mask


def rope_and_attend(q, k, v, cos, sin, kv_cache: "KVCache | None", positions=None, mask=None) -> torch.Tensor:
    """The attention of a block once its heads are split (Llama's and Falcon's): RoPE on q and k, the
    KV cache when decoding, attend, heads merged. q (B, nh, T, hd), k and v (B, nkv, T, hd) -> (B, T, nh*hd)."""
    B, nh, T, hd = q.shape
    if use_kernel(q, ROPE_DTYPES, cuda_only=True) and q.dtype == k.dtype == cos.dtype == sin.dtype:
        q, k = apply_rope_fused(q, k, cos, sin)                                        # one kernel, same bits
    else:
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if positions is not None:
        k, v = kv_cache.update(positions, k, v)                                         # (B, nkv, max_len, hd)
    # Without a cache or packed rows the T keys are the T queries: causal. With a cache, the mask
    # says which of the max_len cached positions each query sees; with packed rows, which keys of
    # its own row. Grouped-query attention: each kv head serves nh / nkv query heads.
    y = attend(q, k, v, mask)                                                           # (B, nh, T, hd)
    return y.transpose(1, 2).reshape(B, T, nh * hd)                                     # (B, T, nh*hd)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        C = config.hidden_size
        self.q_proj = nn.Linear(C, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(C, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(C, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, C, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, positions: torch.Tensor | None = None, mask=None):
        """positions (T,) and mask (T, max_len): given when decoding with the KV cache. mask alone:
        packed rows' attention mask (qlora.attention.document_mask)."""
        B, T, _ = x.shape
        # One call for the three: with LoRA adapters they can share one A product (qlora.lora).
        q, k, v = shared_input_forward((self.q_proj, self.k_proj, self.v_proj), x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)                  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)               # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)               # (B, nkv, T, hd)
        y = rope_and_attend(q, k, v, cos, sin, self.kv_cache, positions, mask)          # (B, T, nh*hd)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        g, u = shared_input_forward((self.gate_proj, self.up_proj), x)                # (B, T, I) each
        if use_kernel(g, SWIGLU_DTYPES, cuda_only=True) and g.dtype == u.dtype:
            return self.down_proj(swiglu(g, u))                                       # one kernel, saves g, u
        return self.down_proj(F.silu(g) * u)


class Block(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, positions: torch.Tensor | None = None, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------------- the model

class Llama(nn.Module):
    # The block's linear layers by module name: what quantization and LoRA ("all-linear") act on.
    LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # What recompute: selective keeps (qlora/checkpointing.py): the products with C-wide outputs.
    # Llama-2-7B: 55% of a block's frozen-weight FLOPs for 40 KB per token; gate/up (I wide) are redone.
    KEEP_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        # A ModuleDict named `model`, so parameter names match HF's LlamaForCausalLM (model.layers.0...).
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Not in the checkpoint (persistent=False): recomputed from the config.
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        # Recompute each block's activations in the backward pass instead of storing them (QLoRA
        # trains with gradient checkpointing; paper section 4 and appendix on memory footprint):
        # False, True, or "offload" (block inputs wait in host memory); and what the recompute
        # redoes, "full", "selective" or "none" (qlora/checkpointing.py).
        self.gradient_checkpointing = False
        self.recompute = "full"

    def forward(self, input_ids: torch.Tensor, start_pos: int | torch.Tensor | None = None,
                return_hidden: bool = False, position_ids: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab), or hidden states (B, T, C) if return_hidden.

        start_pos=None: no cache, positions 0..T-1. An int (or a 0-d int64 tensor on the model's
        device, which a CUDA graph can update in place): the tokens sit at start_pos..start_pos+T-1,
        their keys/values go into the cache (see setup_cache) and they attend to every earlier position.
        A tensor start_pos is not range-checked (that would read it back to the host).
        position_ids and segment_ids (B, T), both or neither, no cache: packed rows (see the top).
        """
        positions, cache_positions, mask = cache_inputs(input_ids, start_pos, self.model.layers[0].self_attn.kv_cache,
                                                        position_ids, segment_ids)
        x = self.model.embed_tokens(input_ids)                                         # (B, T, C)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)                     # (T, hd) or (B, T, hd)
        checkpointing = self.gradient_checkpointing if start_pos is None else False
        x = run_blocks(self.model.layers, x, (cos, sin, cache_positions, mask), checkpointing, self.recompute,
                       self.KEEP_NAMES)                                                 # (B, T, C)
        x = self.model.norm(x)                                                          # (B, T, C)
        return x if return_hidden else self.lm_head(x)                                 # (B, T, vocab)

    def setup_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> None:
        """Give every attention layer a zeroed KV cache for batch_size rows of max_len positions."""
        w = self.lm_head.weight              # (the embedding table may be on the host: HostEmbedding)
        for layer in self.model.layers:
            attn = layer.self_attn
            attn.kv_cache = KVCache(batch_size, attn.n_kv_heads, max_len, attn.head_dim,
                                    device or w.device, dtype or w.dtype)

    def clear_cache(self) -> None:
        """Drop the KV caches (frees their memory)."""
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None
