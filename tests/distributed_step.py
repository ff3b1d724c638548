"""One bf16 training step of a tiny 4-bit Llama, alone or under torchrun (ddp / fsdp), for
tests/test_distributed.py: the step's loss, every LoRA gradient and the NF4 state (whole) saved by rank 0.

    python tests/distributed_step.py OUT.pt CONFIG.json
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_step.py OUT.pt CONFIG.json fsdp

bf16 under TRITON_INTERPRET=1 takes the GPU's path on the CPU: Linear4bit's Triton kernels, whose
autograd node keeps the packed bytes for backward (FSDP2 frees and re-gathers them between forward
and backward), with gradient checkpointing recomputing each block in backward.
"""

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from falcon.load import load_base  # noqa: E402
from qlora import distributed  # noqa: E402
from qlora.lora import apply_lora, lora_layers  # noqa: E402
from qlora.loss import causal_lm_loss, label_count  # noqa: E402


def main(out: str, config: str, mode: str = "one") -> None:
    cfg = SimpleNamespace(distributed="fsdp" if mode == "fsdp" else "ddp", device="cpu", fp16=False,
                          eval_table_size=0, seed=0)
    distributed.init(cfg)
    quantize = distributed.shard_quantizer if mode == "fsdp" else None
    model = load_base(config, torch.device("cpu"), torch.bfloat16, True, 0, quantize=quantize)
    torch.manual_seed(0)
    apply_lora(model, "all-linear", 4, 8, 0.0, verbose=False)
    with torch.no_grad():
        for layer in lora_layers(model).values():      # B != 0: every A gets a gradient too
            layer.lora_b.normal_(0, 0.1)
    model.gradient_checkpointing = True
    step_model = distributed.wrap(model, cfg, torch.device("cpu"))
    ids = torch.randint(0, 512, (4, 48), generator=torch.Generator().manual_seed(1))     # (B, T)
    mine = ids[distributed.rank()::distributed.world_size()]                            # this rank's rows
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = step_model(mine, return_hidden=True)                                   # (B / N, T, C)
        loss = causal_lm_loss(hidden, model.lm_head.weight, mine, num_items=label_count(ids))
    loss.backward()
    grads = {name: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
             for name, p in model.named_parameters() if p.requires_grad}
    total = distributed.all_sum([loss.item()])[0]
    quantized = {name: (t.full_tensor() if hasattr(t, "full_tensor") else t).reshape(-1)   # whole, flat
                 for name, t in model.state_dict().items() if name.endswith(("packed", "absmax", "absmax2", "offset"))}
    if distributed.is_main():
        torch.save({"loss": total, "grads": grads, "quantized": quantized}, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
    distributed.finish()
