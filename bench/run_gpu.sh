#!/usr/bin/env bash
# The GPU benchmarks in the order the device sessions ran them; each stage's JSON goes to $OUT.
#   bash bench/run_gpu.sh kernels load        # then: decode train, then: train_step; fused: bench/fused_kernels.py
#   bash bench/run_gpu.sh large               # issue 23 alone: one device call of ~7 min
#   bash bench/run_gpu.sh lead | profile | hostemb | long8b | long7b | large13   # issues 17 and 23, a call each
#   bash bench/run_gpu.sh ddp2 | fsdp70       # issue 19, on nvidia-h200-x2, a call each
# bitsandbytes comes from the unpacked wheel in .bnb (README, Notes); the 7B-shaped random
# checkpoint is written once to /tmp/llama2-7b-random by the first stage that needs it.
set -uo pipefail
export PYTHONPATH=$PWD/.bnb${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-out/bench}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
python -c "import torch, triton, bitsandbytes, transformers, peft, sentencepiece, yaml; print('torch', torch.__version__, 'triton', triton.__version__, 'bnb', bitsandbytes.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
# Unsloth from the carried wheels (.whl/unsloth) into /tmp/site-unsloth -> "<flag> /tmp/site-unsloth", or
# nothing when the wheels are not there (the benches then skip its side). The flag is the bench's spelling.
unsloth_flag() {
  ls .whl/unsloth/*.whl >/dev/null 2>&1 && python -m pip install -q --no-index --no-deps --no-compile \
    --target /tmp/site-unsloth .whl/unsloth/*.whl 2>/dev/null && echo "$1 /tmp/site-unsloth"
}
for stage in "$@"; do
  echo "=== $stage $(date -u +%H:%M:%S)"
  case $stage in
    kernels)    timeout 240 python -m bench.kernels --json "$OUT/kernels.json" 2>&1 | tail -30 ;;
    fused)      timeout 120 python -m bench.fused_kernels 2>&1 | tee "$OUT/fused_kernels.txt" | tail -20 ;;
    load)       timeout 330 python -m bench.load --json "$OUT/load.json" 2>&1 | tail -25 ;;
    decode)     timeout 240 python -m bench.decode --repeats 2 --json "$OUT/decode.json" 2>&1 | tail -25 ;;
    eval)       # issue #16 item 3; needs .gpu-data/ (spider_dev.jsonl + llama2-tokenizer.model, carried)
                timeout 480 python -m bench.batched_eval --rows .gpu-data/spider_dev.jsonl \
                  --tokenizer .gpu-data/llama2-tokenizer.model --json "$OUT/batched_eval.json" 2>&1 | tail -15 ;;
    train_step) timeout 420 python -m bench.train_step --json "$OUT/train_step.json" 2>&1 | tail -60 ;;
    ddp1)       # issue #18: train.py under torchrun --nproc_per_node 1 (NCCL) vs alone, tokens/s
                timeout 540 python -m bench.ddp_scaling --json "$OUT/ddp_one_gpu.json" 2>&1 | grep -v "^Warning" | tail -30 ;;
    ddp2)       # issue #19 on nvidia-h200-x2: DDP and FSDP2 on 2 GPUs vs one process (~8 min); NVLink multicast off
                NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 timeout 590 python -m bench.ddp_scaling --nproc 2 --steps 8 \
                  --json "$OUT/ddp_scaling_2.json" 2>&1 | grep -v "^Warning" | tail -40 ;;
    fsdp70)     # issue #19 on nvidia-h200-x2: Llama-2-70B shapes in NF4 (written once, ~37 GB), one GPU vs FSDP2 on 2
                NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 timeout 590 python -m bench.ddp_scaling --nproc 2 \
                  --shape 70b --steps 6 --json "$OUT/fsdp_70b_2.json" 2>&1 | grep -v "^Warning" | tail -30 ;;
    falcon)     timeout 540 python -m bench.falcon_step --json "$OUT/falcon_step.json" 2>&1 | grep -v "^Warning" | tail -40 ;;
    large)      # issue 23: 70B, 34B, 13B shapes (~7 min); Unsloth from the carried .whl/unsloth when it is there,
                # its tokenizer from .gpu-data/; the 13B checkpoint (26 GB in /tmp) is removed at the end
                u=($(unsloth_flag --unsloth_path))
                PYTHONUNBUFFERED=1 timeout 570 python -m bench.large "${u[@]}" --json "$OUT/large.json" 2>&1 \
                  | grep -v "^Warning" | tee "$OUT/large.log" | tail -70 ;;
    lead|hostemb) # issue #17: torch_compile A/B (lead), embeddings_on_host A/B (hostemb), beside Unsloth (offload), ~6 min
                u=($(unsloth_flag --unsloth-path))
                sides=ours:offload+shared,ours:offload+shared+compile,ours:compile,unsloth:offload
                [ "$stage" = hostemb ] && sides=ours:offload+shared+compile,ours:offload+shared+hostemb+compile,unsloth:offload
                [ "$stage" = hostemb ] && python -m bench.gather_rows_check
                HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 timeout 560 python -m bench.train_step --no-profile "${u[@]}" \
                  --sides "$sides" --json "$OUT/train_step_$stage.json" 2>&1 | grep -v "^Warning" | tail -25 ;;
    profile)    # issue #17: where the compiled step's time goes, and what embeddings_on_host costs (~4 min)
                HF_HUB_OFFLINE=1 timeout 560 python -m bench.train_step --sides \
                  ours:offload+shared+compile,ours:offload+shared+hostemb+compile --json "$OUT/train_step_profile.json" \
                  2>&1 | grep -v "^Warning" | tail -60 ;;
    long8b)     # issue #17: the longest context at Llama-3-8B shapes (~8 min with the checkpoint)
                u=($(unsloth_flag --unsloth-path))
                HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 timeout 570 python -m bench.long_context --shape llama3-8b \
                  "${u[@]}" --sides ours:offload+shared,unsloth:offload --start 65536 --granularity 16384 \
                  --time-cap 170 --json "$OUT/long_context_llama3.json" 2>&1 | grep -v "^Warning\|Loading" | tail -30 ;;
    long7b)     # issue #17: Unsloth's own limit at Llama-2-7B shapes (its 45 s search stopped at 131,072), ~6 min
                u=($(unsloth_flag --unsloth-path))
                HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 timeout 570 python -m bench.long_context --shape llama2-7b \
                  "${u[@]}" --sides unsloth:offload --start 131072 --granularity 16384 --time-cap 360 \
                  --json "$OUT/long_context_llama2_unsloth.json" 2>&1 | grep -v "^Warning\|Loading" | tail -20 ;;
    large13)    # issue 23: 13B with our offloaded checkpoints (as Unsloth's), compiled blocks, shared dropout and
                # the embedding table on the host (~6 min; WITHOUT=peer leaves the peer out)
                u=($(unsloth_flag --unsloth_path))
                PYTHONUNBUFFERED=1 timeout 590 python -m bench.large --parts 13b --checkpointing offload --torch_compile \
                  --lora_shared_dropout --embeddings_on_host ${WITHOUT:+--without $WITHOUT} "${u[@]}" \
                  --json "$OUT/large13.json" 2>&1 | grep -v "^Warning" | tail -40 ;;
    train)      # the issue #6 GPU check: train.py itself, 7B shapes, micro-batch 2 x 2048, r=32 all-linear
                timeout 300 python train.py --config configs/sql.yml --base_model /tmp/llama2-7b-random \
                  --tokenizer out/llama2-tokenizer.model --datasets builtin:sql --max_steps 10 \
                  --gradient_accumulation_steps 1 --warmup_steps 2 --eval_steps 1000 --save_steps 1000 \
                  --logging_steps 1 --output_dir /tmp/train-gpu 2>&1 | grep -v "^Warning" | tail -20 ;;
  esac
done
