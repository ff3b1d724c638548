"""Does the GPU read a pinned host table (kernels/embedding.py) correctly and fast? One line per size.

    python -m bench.gather_rows_check      # on a GPU; embeddings_on_host: true depends on it
"""

import time

import torch

from kernels.embedding import gather_rows
from qlora.checkpointing import pinned_buffer


def check(vocab: int, C: int, n: int) -> None:
    weight = torch.randn(vocab, C, dtype=torch.bfloat16)
    buf = pinned_buffer(weight.numel() * weight.element_size(), "could not pin {} ({})")
    table = buf.view(torch.bfloat16).view(vocab, C).copy_(weight)              # (vocab, C) in host memory
    ids = torch.randint(0, vocab, (n,), device="cuda")
    out = torch.empty(n, C, dtype=torch.bfloat16, device="cuda")
    gather_rows(table, ids, out)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        gather_rows(table, ids, out)
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / 10 * 1e3
    same = torch.equal(out.cpu(), weight[ids.cpu()])
    print(f"gather_rows vocab {vocab} C {C} rows {n}: equal to index_select {same}, {ms:.3f} ms, "
          f"{n * C * 2 / ms / 1e6:.1f} GB/s")
    torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())


if __name__ == "__main__":
    check(32000, 4096, 4096)
    check(128256, 4096, 2048)
    check(32000, 5120, 2048)
