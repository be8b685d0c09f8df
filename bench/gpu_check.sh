#!/bin/bash
# The GPU figures the open issues ask for, for the device tool (10 minutes a call, 30 a session):
# each step has its own time limit; logs and JSON go to $OUT. Two calls cover everything (times
# seen on an H200 with a cold Triton cache):
#   bash bench/gpu_check.sh tests demo fusion suite      (~170 + 50 + 60 + 150 s)
#   bash bench/gpu_check.sh attention matmul memory offload
# long: the long-row cases (LM-head softmax, log_softmax, cross-entropy); online: online softmax A/B;
# loss: a cross-entropy training step (forward + backward) over an LM head's logits; memory16: the
# memory step's transformers models in bf16.
# Diagnostics: profile (kernel-by-kernel GPU time against Inductor), plans (what the matmul pass
# made of the model cases, bodies included), host (a tiny BERT layer's host time per call, with a
# cProfile of kiln's executor), trainhost (tiny training steps, host-bound: a BERT layer and a
# cross-entropy), peaks (allocator traces of the zoo's training steps).
# On the device machine the checkout runs uninstalled: PYTHONPATH=$PWD; ortools comes from
# wheels carried in .whl/ when present (see /work/.library/device/README.md).
set -u
OUT=${OUT:-/tmp/kiln-gpu-check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
steps=${*:-tests demo fusion suite attention matmul memory offload}
run() {     # name, seconds, command...
    local name=$1 secs=$2; shift 2
    timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
    echo "== $name: rc $? (limit ${secs}s)"
    grep -v "DEBUG\|Warning\|warn(" "$OUT/$name.log" | tail -"${TAIL:-14}"
}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for s in $steps; do
    case $s in
        tests) TAIL=6 run tests 240 python3 -m pytest -m "gpu and not timing" tests -rf -n 8 -q -p no:cacheprovider
               # alone: the others' kernels would count in these tests' GPU timings
               TAIL=4 run tests-timing 120 python3 -m pytest -m "gpu and timing" tests -rf -q -p no:cacheprovider ;;
        demo) run demo 90 python3 -m kiln.cli demo ;;
        fusion) run fusion 90 python3 bench/gpu_fusion.py --json "$OUT/fusion.json" ;;
        suite) TAIL=18 run suite 300 python3 bench/suite.py --cases micro model --json "$OUT/suite.json" \
                   --markdown "$OUT/suite.md" --chart "$OUT/suite.png" ;;
        attention) run attention 150 python3 bench/attention.py --no-train --json "$OUT/attention.json" ;;
        matmul) run matmul 150 python3 bench/matmul.py --cases gemv,mlp,layer --json "$OUT/matmul.json" ;;
        memory) for m in gpt2 llama bert zoo; do      # one process each: their peaks are separate
                    run memory-$m 300 python3 bench/gpu_memory.py --only $m --json "$OUT/gpu_memory_$m.json" &
                done; wait ;;
        memory16) for m in gpt2 llama bert; do    # bf16: attention on cuDNN's kernels
                    run memory16-$m 300 python3 bench/gpu_memory.py --only $m --dtype bfloat16 \
                        --json "$OUT/gpu_memory_${m}_bf16.json" &
                done; wait ;;
        long) run long 200 python3 bench/gpu_fusion.py --long-rows --json "$OUT/fusion_long.json" ;;
        online) run online 150 python3 bench/online_softmax_ab.py --json "$OUT/online_softmax.json" ;;
        loss) run loss 150 python3 bench/gpu_loss.py --json "$OUT/gpu_loss.json" ;;
        offload) run offload 200 python3 bench/offload.py --reps 3 --json "$OUT/offload.json" ;;
        profile) TAIL=60 run profile 150 python3 bench/gpu_kernel_profile.py llama_layer gpt2_block bert_layer ;;
        host) TAIL=70 run host 120 python3 bench/host_tiny_bert.py --profile ;;
        trainhost) run trainhost 150 python3 bench/host_train_step.py --json "$OUT/host_train_step.json" ;;
        plans) TAIL=40 run plans 150 python3 bench/matmul_plans.py gpt2_block bert_layer llama_layer --body ;;
        peaks) for m in zoo:cnn zoo:block zoo:embed; do
                   TAIL=30 run "peak-${m#zoo:}" 120 python3 bench/gpu_peak_trace.py --case "$m" --train
               done ;;
        *) echo "unknown step $s (steps: tests demo fusion long online loss suite attention matmul memory memory16 offload profile host trainhost plans peaks)"; exit 2 ;;
    esac
done
