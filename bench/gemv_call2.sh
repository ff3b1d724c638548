#!/usr/bin/env bash
# The second GPU call of issue 16 (GEMV + decode), run from the repo root on the device:
# decode-GEMV kernels, Llama-3-8B-shaped decode (ours only), Llama-2-7B decode with the peer.
export PYTHONPATH=$PWD/../.bnb:$PWD
OUT=${OUT:-out/bench}; mkdir -p "$OUT"
echo "=== kernels $(date -u +%T)"
timeout 130 python3 -m bench.kernels --decode_only --shapes 4096x4096,11008x4096,4096x11008,14336x4096,1024x4096,4096x14336 --json $OUT/kernels.json > $OUT/kernels.log 2>&1
grep -A8 "^CUDA-graph" $OUT/kernels.log; grep -i "error\|Traceback" $OUT/kernels.log | head -5
echo "=== decode llama3_8b $(date -u +%T)"
timeout 110 python3 -m bench.decode --shape llama3_8b --sides ours,ours_graph --repeats 1 --json $OUT/decode_llama3.json > $OUT/decode_llama3.log 2>&1
tail -6 $OUT/decode_llama3.log
echo "=== decode llama2_7b $(date -u +%T)"
timeout 300 python3 -m bench.decode --repeats 2 --json $OUT/decode.json > $OUT/decode.log 2>&1
tail -9 $OUT/decode.log
echo "=== done $(date -u +%T)"
