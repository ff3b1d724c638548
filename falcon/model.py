"""Falcon (7B / 40B / 180B) in plain PyTorch: the frozen base model of the second seed job.

How Falcon differs from Llama (llama/model.py), and nothing else does:
* one fused projection `query_key_value` (C -> (n_heads + 2 n_kv) hd) instead of q/k/v_proj, laid
  out per key/value group: [q_0 .. q_{g-1}, k, v] for each of the n_kv groups, g = n_heads / n_kv;
* multi-query attention (Falcon-7B: one K/V head for all 71 query heads), or grouped-query with
  `num_kv_heads` (Falcon-40B's `new_decoder_architecture`), or one K/V per head (`multi_query: false`);
* `parallel_attn` (7B, 40B): attention and MLP both read the normalised input and are added to the
  residual together, x + (mlp(ln(x)) + attn(ln(x))); 40B normalises twice (ln_attn, ln_mlp);
  `parallel_attn: false` is the sequential x += attn(ln1(x)); x += mlp(ln2(x)) Llama has;
* LayerNorm with a bias instead of RMSNorm; MLP dense_4h_to_h(gelu(dense_h_to_4h(x))) instead of
  SwiGLU; optional biases on the linears (`bias: true`); input and output embeddings tied.
RoPE (the same rotate-half layout), the static KV cache, the cached forward's mask, packed rows'
positions and mask, and generation are Llama's, imported from there. ALiBi checkpoints (`alibi: true`, falcon-rw-*) are refused.

The module tree mirrors Hugging Face's FalconForCausalLM, so state_dict() keys are the checkpoint
keys (transformer.word_embeddings.weight, transformer.h.0.self_attention.query_key_value.weight,
..., transformer.ln_f.bias; lm_head.weight is the tied embedding). The four linear layers of a
block are plain attributes, so NF4 weights and LoRA wrappers fit there as in llama/model.py.

    model(input_ids)                    -> logits (B, T, vocab); training, no cache
    model.setup_cache(B, max_len)       then model(ids, start_pos=p) writes and reads the KV cache
    model(ids, return_hidden=True)      -> final hidden states (B, T, C) before lm_head
    model(ids, position_ids=P, segment_ids=S)   packed rows (sample_packing), as in llama/model.py:
                                        per-row positions, attention within each row (qlora/attention.py)
"""

from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from llama.model import KVCache, cache_inputs, rope_and_attend, rope_cos_sin, rope_inv_freq
from qlora.checkpointing import run_blocks


# ----------------------------------------------------------------------------- config

@dataclass
class FalconConfig:
    vocab_size: int = 65024
    hidden_size: int = 4544
    num_hidden_layers: int = 32
    num_attention_heads: int = 71
    num_kv_heads: int | None = None         # new_decoder_architecture's K/V heads (None: n_heads)
    new_decoder_architecture: bool = False  # Falcon-40B/180B: grouped K/V, two LayerNorms
    multi_query: bool = True                # one K/V head (Falcon-7B); ignored by the new architecture
    parallel_attn: bool = True
    num_ln_in_parallel_attn: int | None = None  # new architecture: 2 (ln_attn, ln_mlp) unless 1
    bias: bool = False
    ffn_hidden_size: int | None = None      # None: 4 * hidden_size
    layer_norm_epsilon: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 11
    eos_token_id: int | list[int] | None = 11
    pad_token_id: int | None = None

    rope_scaling = None                     # what llama.model.rope_inv_freq reads: none for Falcon

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}: fix config.json")
        self.head_dim = self.hidden_size // self.num_attention_heads
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        # The K/V heads the fused projection holds, as transformers' FalconAttention builds it.
        if self.new_decoder_architecture:
            self.n_kv_heads = self.num_kv_heads or self.num_attention_heads
            if not self.parallel_attn:
                raise ValueError("new_decoder_architecture: true needs parallel_attn: true (transformers' "
                                 "Falcon cannot run the other combination): fix config.json")
            if self.num_ln_in_parallel_attn not in (None, 1, 2):
                raise ValueError(f"num_ln_in_parallel_attn {self.num_ln_in_parallel_attn} is not 1 or 2: fix config.json")
        else:
            self.n_kv_heads = 1 if self.multi_query else self.num_attention_heads
            if self.num_ln_in_parallel_attn not in (None, 1):
                raise ValueError(f"num_ln_in_parallel_attn {self.num_ln_in_parallel_attn} needs "
                                 "new_decoder_architecture: true (transformers ignores it otherwise): fix config.json")
            if not self.multi_query and self.num_kv_heads not in (None, self.num_attention_heads):
                raise ValueError(f"num_kv_heads {self.num_kv_heads} with multi_query: false needs "
                                 "new_decoder_architecture: true: fix config.json")
        if self.num_attention_heads % self.n_kv_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of num_kv_heads "
                             f"{self.n_kv_heads}: fix config.json")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        self.two_norms = self.new_decoder_architecture and self.num_ln_in_parallel_attn != 1

    @classmethod
    def from_hf(cls, hf: dict) -> "FalconConfig":
        """Read a Hugging Face config.json dict of a Falcon (transformers 4.33+ or 5)."""
        if hf.get("model_type") != "falcon":
            raise ValueError(f"model_type {hf.get('model_type')!r} is not 'falcon': this is not a Falcon config.json")
        for arch in hf.get("architectures") or ["FalconForCausalLM"]:
            if arch != "FalconForCausalLM":
                raise ValueError(f"architectures {arch!r} is not supported: only FalconForCausalLM checkpoints load")
        if hf.get("alibi"):
            raise ValueError("alibi: true (ALiBi position biases, falcon-rw-*) is not implemented here: "
                             "use a rotary Falcon (falcon-7b, falcon-40b, ...)")
        hf = dict(hf)
        if "n_embed" in hf:                                 # the old name transformers still reads
            hf.setdefault("hidden_size", hf.pop("n_embed"))
        for key, value in hf.items():
            if key in _HF_FIELDS or key in ("model_type", "architectures", "rope_parameters", "rope_scaling"):
                continue
            if key not in _HF_HARMLESS:
                raise ValueError(f"config field {key!r} is not known for Falcon: remove it or use a plain Falcon checkpoint")
            allowed = _HF_HARMLESS[key]
            if allowed is not None and value not in allowed:
                raise ValueError(f"config field {key}={value!r} is not supported: this Falcon needs {key} in {allowed}")
        # transformers 5 writes rope_parameters {rope_type, rope_theta}; older files write rope_theta.
        params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if params.get("rope_type", params.get("type", "default")) != "default":
            raise ValueError(f"rope scaling {params} is not supported for Falcon: use a checkpoint without it")
        kwargs = {k: hf[k] for k in _HF_FIELDS if k in hf and hf[k] is not None}
        if "rope_theta" in params:
            kwargs.setdefault("rope_theta", float(params["rope_theta"]))
        return cls(**kwargs)


_HF_FIELDS = tuple(f.name for f in fields(FalconConfig))
# config.json fields that change nothing in this model, with the values that keep it so (None: any).
_HF_HARMLESS = {
    "torch_dtype": None, "dtype": None, "transformers_version": None, "_name_or_path": None,
    "initializer_range": None, "use_cache": None, "auto_map": None, "alibi": (False,),
    "activation": ("gelu",), "hidden_dropout": (0, 0.0), "attention_dropout": (0, 0.0),
    "apply_residual_connection_post_layernorm": (False,),
}


# ----------------------------------------------------------------------------- layers

class Attention(nn.Module):
    def __init__(self, config: FalconConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.n_kv_heads, config.head_dim
        C = config.hidden_size
        self.query_key_value = nn.Linear(C, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=config.bias)
        self.dense = nn.Linear(self.n_heads * self.head_dim, C, bias=config.bias)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, positions: torch.Tensor | None = None, mask=None):
        """positions (T,) and mask (T, max_len): given when decoding with the KV cache. mask alone:
        packed rows' attention mask (qlora.attention.document_mask)."""
        B, T, _ = x.shape
        g = self.n_heads // self.n_kv_heads                 # query heads per K/V head
        # The fused output holds, for each K/V group, its g query heads then its key and its value.
        # Falcon-7B: one group of 71 + 2 heads; multi_query false: 71 groups of 1 + 2.
        qkv = self.query_key_value(x).view(B, T, self.n_kv_heads, g + 2, self.head_dim)
        q = qkv[:, :, :, :g].reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = qkv[:, :, :, g].transpose(1, 2)                                               # (B, nkv, T, hd)
        v = qkv[:, :, :, g + 1].transpose(1, 2)                                           # (B, nkv, T, hd)
        # Query head h reads K/V head h // g: the group order of the fused layout above (attend's GQA).
        y = rope_and_attend(q, k, v, cos, sin, self.kv_cache, positions, mask)             # (B, T, nh*hd)
        return self.dense(y)


class MLP(nn.Module):
    """dense_4h_to_h(gelu(dense_h_to_4h(x))), the exact (erf) GELU."""

    def __init__(self, config: FalconConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.ffn_hidden_size, bias=config.bias)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.bias)

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))                          # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: FalconConfig):
        super().__init__()
        C, eps = config.hidden_size, config.layer_norm_epsilon
        self.parallel = config.parallel_attn
        self.self_attention = Attention(config)
        self.mlp = MLP(config)
        # transformers' names: 7B input_layernorm only; 40B ln_attn + ln_mlp; sequential input_ +
        # post_attention_layernorm.
        if config.two_norms:
            self.ln_attn, self.ln_mlp = nn.LayerNorm(C, eps), nn.LayerNorm(C, eps)
        else:
            self.input_layernorm = nn.LayerNorm(C, eps)
            if not self.parallel:
                self.post_attention_layernorm = nn.LayerNorm(C, eps)

    def forward(self, x, cos, sin, positions: torch.Tensor | None = None, mask=None):
        if not self.parallel:
            x = x + self.self_attention(self.input_layernorm(x), cos, sin, positions, mask)
            return x + self.mlp(self.post_attention_layernorm(x))
        if hasattr(self, "ln_attn"):
            h_attn, h_mlp = self.ln_attn(x), self.ln_mlp(x)
        else:
            h_attn = h_mlp = self.input_layernorm(x)
        # (mlp + attn) first, then the residual: transformers' order, so fp32 results match exactly.
        return x + (self.mlp(h_mlp) + self.self_attention(h_attn, cos, sin, positions, mask))


# ----------------------------------------------------------------------------- the model

class Falcon(nn.Module):
    # The block's linear layers by module name: what quantization and LoRA ("all-linear") act on.
    LINEAR_NAMES = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
    KEEP_NAMES = ("query_key_value", "dense", "dense_4h_to_h")   # recompute: selective, as llama/model.py

    def __init__(self, config: FalconConfig):
        super().__init__()
        self.config = config
        # A ModuleDict named `transformer`, so parameter names match HF's FalconForCausalLM.
        self.transformer = nn.ModuleDict(dict(
            word_embeddings=nn.Embedding(config.vocab_size, config.hidden_size),
            h=nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers)),
            ln_f=nn.LayerNorm(config.hidden_size, config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.word_embeddings.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.gradient_checkpointing = False                 # as in llama/model.py
        self.recompute = "full"

    def forward(self, input_ids: torch.Tensor, start_pos: int | torch.Tensor | None = None,
                return_hidden: bool = False, position_ids: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab), or hidden states (B, T, C) if return_hidden.
        start_pos as in Llama.forward: None (no cache) or the position of input_ids[:, 0] in the cache;
        position_ids and segment_ids (B, T) as there: packed rows."""
        positions, cache_positions, mask = cache_inputs(input_ids, start_pos, self.transformer.h[0].self_attention.kv_cache,
                                                        position_ids, segment_ids)
        x = self.transformer.word_embeddings(input_ids)                                 # (B, T, C)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)                      # (T, hd) or (B, T, hd)
        checkpointing = self.gradient_checkpointing if start_pos is None else False
        x = run_blocks(self.transformer.h, x, (cos, sin, cache_positions, mask), checkpointing, self.recompute,
                       self.KEEP_NAMES)                                                  # (B, T, C)
        x = self.transformer.ln_f(x)                                                     # (B, T, C)
        return x if return_hidden else self.lm_head(x)                                  # (B, T, vocab)

    def setup_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> None:
        """Give every attention layer a zeroed KV cache (n_kv_heads wide: one head for Falcon-7B)."""
        w = self.lm_head.weight
        for layer in self.transformer.h:
            attn = layer.self_attention
            attn.kv_cache = KVCache(batch_size, attn.n_kv_heads, max_len, attn.head_dim,
                                    device or w.device, dtype or w.dtype)

    def clear_cache(self) -> None:
        for layer in self.transformer.h:
            layer.self_attention.kv_cache = None
