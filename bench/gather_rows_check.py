"""Does the GPU read the pinned embedding table (embeddings_on_host: true) correctly and fast? The
module train.py uses (qlora.checkpointing.HostEmbedding, its kernel in kernels/embedding.py) against
index_select on the host, one line per size.

    python -m bench.gather_rows_check      # on a GPU
"""

import time

import torch

from qlora.checkpointing import HostEmbedding


def check(vocab: int, C: int, n: int) -> None:
    weight = torch.randn(vocab, C, dtype=torch.bfloat16)
    embedding = HostEmbedding(weight.cuda())                # the table in pinned host memory
    ids = torch.randint(0, vocab, (n,), device="cuda")
    out = embedding(ids)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        embedding(ids)
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / 10 * 1e3
    same = torch.equal(out.cpu(), weight[ids.cpu()])
    print(f"gather_rows vocab {vocab} C {C} rows {n}: equal to index_select {same}, {ms:.3f} ms, "
          f"{n * C * 2 / ms / 1e6:.1f} GB/s")


if __name__ == "__main__":
    check(32000, 4096, 4096)
    check(128256, 4096, 2048)
    check(32000, 5120, 2048)
