"""Batched text generation with a static KV cache: greedy, or temperature + nucleus (top-p) sampling.

Prompts of different lengths are right-padded, as in Meta's Llama reference code: the batch
prefills the shortest prompt's length in one forward, then steps one position at a time for every
row; a row still inside its own prompt takes its next prompt token instead of the model's choice.
No padding mask or position shifts are needed, so each row computes exactly what it would alone.

Speed. At batch 1 a decode step reads every weight once and does little else: on a GPU it is bound
by memory bandwidth and, in eager PyTorch, by the CPU launching a few hundred small kernels. The
4-bit projections run the fused GEMV (kernels/gemv.py) and the KV cache has fixed shapes
(llama/model.py), so with cuda_graph=True the single-token step is captured once per call as a CUDA
graph and replayed: one launch per step. The graph replays the very kernels the eager step runs, on
the same buffers, so it computes the same numbers (gpt-fast does the same through torch.compile's
"reduce-overhead" mode; a hand-made graph needs no compiler).

The model is any of this project's causal LMs (llama.model.Llama, falcon.model.Falcon): what is used
is forward(ids, start_pos), setup_cache / clear_cache, lm_head and config.vocab_size.
"""

from typing import Callable

import torch

import torch.nn as nn


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator=None) -> torch.Tensor:
    """logits (B, vocab) -> next token ids (B,): argmax if temperature == 0, else a draw from
    softmax(logits / temperature) restricted to the smallest set of tokens whose mass reaches top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)                # (B, vocab)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)             # (B, vocab) each
        # drop a token when the tokens more likely than it already hold more than top_p
        sorted_probs[sorted_probs.cumsum(dim=-1) - sorted_probs > top_p] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)      # multinomial renormalises
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)       # (B,)


class DecodeStep:
    """One token per row at position `pos`: (B, 1) ids -> logits (B, vocab), eager or as a CUDA graph.

    Build it after model.setup_cache and before the prefill: capturing runs two warm-up steps that
    write position 0 of the cache, which the prefill then overwrites.
    """

    def __init__(self, model: nn.Module, batch_size: int, cuda_graph: bool = False):
        device = model.lm_head.weight.device
        self.model = model
        # The step's inputs live in fixed buffers: a graph reads them from the addresses it captured.
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # (B, 1)
        self.pos = torch.zeros((), dtype=torch.long, device=device)                # a 0-d tensor, not an int
        self.graph = None
        if cuda_graph:
            if device.type != "cuda":
                raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {device}: "
                                 "pass cuda_graph=False")
            # Warm up on a side stream (PyTorch's recipe): Triton compiles and autotunes and cuBLAS
            # allocates its workspace now, as none of that may happen while a graph is captured.
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.forward()
            torch.cuda.current_stream(device).wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self.forward()                                       # (B, vocab), a fixed buffer

    def forward(self) -> torch.Tensor:
        return self.model(self.tokens, start_pos=self.pos)[:, -1]                  # (B, vocab)

    def __call__(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.pos.fill_(pos)
        if self.graph is None:
            return self.forward()
        self.graph.replay()
        return self.logits.clone()      # the next replay overwrites the graph's buffer


@torch.no_grad()
def generate(model: nn.Module, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, eos_id: int | list[int] | None = None, generator=None,
             on_token: Callable[[torch.Tensor], None] | None = None, cuda_graph: bool = False) -> list[list[int]]:
    """Continue each prompt by up to max_new_tokens tokens; returns the new tokens of each row.

    A row stops at its first EOS (any of eos_id), which is not included in the output. `generator`
    (a torch.Generator on the model's device) makes sampling reproducible. on_token(ids (B,)) is
    called after every step with the ids just placed (for one prompt: each new token, EOS included),
    to stream text. cuda_graph=True replays the decode step as a CUDA graph (see DecodeStep).
    """
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("prompt_ids must be a non-empty list of non-empty token lists (start each with BOS)")
    if max_new_tokens < 0 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need max_new_tokens >= 0, temperature >= 0 and 0 < top_p <= 1, got "
                         f"{max_new_tokens}, {temperature}, {top_p}")
    vocab = model.config.vocab_size
    if any(not 0 <= t < vocab for p in prompt_ids for t in p):
        raise ValueError(f"prompt_ids hold a token outside the vocabulary [0, {vocab})")
    if max_new_tokens == 0:
        return [[] for _ in prompt_ids]
    stop = [] if eos_id is None else [eos_id] if isinstance(eos_id, int) else list(eos_id)
    device = model.lm_head.weight.device
    eos = torch.tensor(stop, dtype=torch.long, device=device)

    B = len(prompt_ids)
    lengths = torch.tensor([len(p) for p in prompt_ids], device=device)             # (B,)
    total = int(lengths.max()) + max_new_tokens
    tokens = torch.zeros(B, total, dtype=torch.long, device=device)                 # right padding
    for i, p in enumerate(prompt_ids):
        tokens[i, :len(p)] = torch.tensor(p, dtype=torch.long)
    in_prompt = torch.arange(total, device=device)[None, :] < lengths[:, None]      # (B, total)

    done = torch.zeros(B, dtype=torch.bool, device=device)
    start = int(lengths.min())
    model.setup_cache(B, total)
    try:
        step = DecodeStep(model, B, cuda_graph)
        logits = model(tokens[:, :start], start_pos=0)[:, -1]                       # prefill: (B, vocab)
        for cur in range(start, total):
            next_token = sample(logits, temperature, top_p, generator)              # (B,)
            next_token = torch.where(in_prompt[:, cur], tokens[:, cur], next_token)
            tokens[:, cur] = next_token
            if on_token is not None:
                on_token(next_token)
            done |= ~in_prompt[:, cur] & torch.isin(next_token, eos)                 # reached EOS
            done |= cur + 1 >= lengths + max_new_tokens                              # reached its budget
            if done.all():                # always true at cur = total - 1
                break
            logits = step(tokens[:, cur:cur + 1], cur)                               # (B, vocab)
    finally:
        model.clear_cache()

    out = []
    for i, p in enumerate(prompt_ids):
        row = tokens[i, len(p):len(p) + max_new_tokens].tolist()
        ends = [j for j, t in enumerate(row) if t in stop]
        out.append(row[:ends[0]] if ends else row)
    return out


class TextStream:
    """Token ids arriving one at a time -> the new text to print after each.

    Decodes all ids so far and returns what was not shown yet: sentencepiece's spaces depend on the
    neighbouring pieces, and a character split over byte tokens shows up once it is complete.
    """

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):      # maybe an incomplete UTF-8 character: wait for more bytes
            return ""
        new, self.shown = text[self.shown:], len(text)
        return new

    def flush(self) -> str:
        """What push held back, at the end of the generation."""
        text = self.tokenizer.decode(self.ids)
        new, self.shown = text[self.shown:], len(text)
        return new
