"""Host work of one training step, counted on the CPU: the aten ops Python calls and the Triton launches
(issue #17: the H200 step waits on the host's ~14,200 ops, so fewer ops is a speed lever).

    TRITON_INTERPRET=1 QLORA_FUSED_KERNELS=1 python -m bench.host_ops            # defaults
    TRITON_INTERPRET=1 QLORA_FUSED_KERNELS=1 python -m bench.host_ops --shared --offload

The tiny random Llama (bench/random_model.py TINY: 2 layers), NF4, bf16 autocast, LoRA r 8 dropout 0.05
on all linears, gradient checkpointing, PagedAdamW: train.py's step. Every Triton kernel runs under
the interpreter, as on a GPU (fused norm, RoPE, SwiGLU too); the ops the interpreter itself calls
inside a launch are not counted, each launch counts once. Counted: aten ops whose caller is not
another aten op, as bench/step_profile.py counts them on the GPU.
"""

import argparse
import collections
import sys

import torch
import triton.runtime.interpreter as interpreter
from torch.profiler import ProfilerActivity, profile, record_function

from bench.common import CHECKPOINT_TINY, load_ours, prepare_checkpoint


def count_ops(step) -> tuple[int, int, collections.Counter]:
    """step() under torch.profiler -> (top-level aten ops, Triton launches, ops by name)."""
    run = interpreter.InterpretedFunction.run

    def launch(self, *args, **kwargs):
        with record_function("triton_launch"):
            return run(self, *args, **kwargs)
    interpreter.InterpretedFunction.run = launch
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
    finally:
        interpreter.InterpretedFunction.run = run

    def inside_launch(e):
        while e is not None:
            if e.name == "triton_launch":
                return True
            e = e.cpu_parent
        return False
    events = prof.events()
    ops = [e for e in events if e.name.startswith("aten::") and not inside_launch(e)
           and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))]
    return len(ops), sum(e.name == "triton_launch" for e in events), collections.Counter(e.name for e in ops)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", action="store_true", help="lora_shared_dropout: true")
    parser.add_argument("--offload", action="store_true", help="gradient_checkpointing: offload")
    args = parser.parse_args(argv)
    from qlora import trainer
    from qlora.checkpointing import set_checkpointing
    from qlora.config import TrainConfig
    from qlora.lora import apply_lora, share_dropout
    from qlora.loss import causal_lm_loss

    prepare_checkpoint(CHECKPOINT_TINY, tiny=True)
    device = torch.device("cpu")
    model = load_ours(CHECKPOINT_TINY, device, torch.bfloat16)
    set_checkpointing(model, "offload" if args.offload else True)
    torch.manual_seed(0)
    apply_lora(model, "all-linear", 8, 16, 0.05, verbose=False)
    share_dropout(model, args.shared)
    params = [p for p in model.parameters() if p.requires_grad]
    cfg = TrainConfig(learning_rate=2e-4, lr_scheduler="constant", warmup_steps=0)
    optimizer, scheduler = trainer.make_optimizer(params, cfg, 10)
    _, scaler = trainer.mixed_precision(device, torch.float32)
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    model.train()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = causal_lm_loss(model(ids, return_hidden=True), model.lm_head.weight, ids)
        loss.backward()
        trainer.optimizer_step(optimizer, scaler, scheduler, params, 1.0)
    for _ in range(2):
        step()                                   # optimizer state, caches
    ops, launches, by_name = count_ops(step)
    print(f"{ops} aten ops called from Python, {launches} Triton launches per step "
          f"(shared dropout {args.shared}, offload {args.offload})")
    print("most called: " + ", ".join(f"{name.removeprefix('aten::')} {n}" for name, n in by_name.most_common(12)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
