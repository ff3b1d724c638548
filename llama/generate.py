"""Batched text generation with a KV cache: greedy, or temperature + nucleus (top-p) sampling.

Prompts of different lengths are right-padded, as in Meta's Llama reference code: the batch
prefills the shortest prompt's length in one forward, then steps one position at a time for every
row; a row still inside its own prompt takes its next prompt token instead of the model's choice.
No attention mask or position shifts are needed, so each row computes exactly what it would alone.
"""

import torch

from llama.model import Llama


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


@torch.no_grad()
def generate(model: Llama, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, eos_id: int | list[int] | None = None, generator=None) -> list[list[int]]:
    """Continue each prompt by up to max_new_tokens tokens; returns the new tokens of each row.

    A row stops at its first EOS (any of eos_id), which is not included in the output. `generator`
    (a torch.Generator on the model's device) makes sampling reproducible.
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
    device = model.model.embed_tokens.weight.device
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
        prev = 0
        for cur in range(start, total):
            logits = model(tokens[:, prev:cur], start_pos=prev)[:, -1]              # (B, vocab)
            next_token = sample(logits, temperature, top_p, generator)              # (B,)
            next_token = torch.where(in_prompt[:, cur], tokens[:, cur], next_token)
            tokens[:, cur] = next_token
            done |= ~in_prompt[:, cur] & torch.isin(next_token, eos)                 # reached EOS
            done |= cur + 1 >= lengths + max_new_tokens                              # reached its budget
            prev = cur
            if done.all():
                break
    finally:
        model.clear_cache()

    out = []
    for i, p in enumerate(prompt_ids):
        row = tokens[i, len(p):len(p) + max_new_tokens].tolist()
        ends = [j for j, t in enumerate(row) if t in stop]
        out.append(row[:ends[0]] if ends else row)
    return out
