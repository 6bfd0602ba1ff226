#!/usr/bin/env bash
# Device check: on a CUDA machine, the op tests on CUDA tensors (compiled Triton kernels, and the
# CUDA extension where nvcc is found) and the op benchmarks at 16M and 256M elements, with each
# kernel's bandwidth as a fraction of a device-to-device copy, plus the fused training draws over
# ResNet-50's parameters; the diagonal-Fisher fit against the per-example loop and vmap (ResNet-50,
# ViT-B/16, batch 64, at most BAYESKERN_BENCH_LAPLACE_TIMEOUT s); the K-FAC fit and GLM predictive;
# IVON's training step and optimizer against AdamW (test_bench_ivon.py, the overhead suite's models,
# at most BAYESKERN_BENCH_IVON_TIMEOUT s); the JSON and the markdown tables land in the results folder.  Then the overhead suite (test_bench_methods.py, and the peer libraries
# where installed) on ResNet-50 and ViT-B/16 at 224 px, batch 64, bf16 autocast, predict compiled;
# two pytest runs per model (JSON + table each) under time limits (BAYESKERN_BENCH_RUN_TIMEOUT per run,
# BAYESKERN_BENCH_METHODS_BUDGET for all), so a slow model cannot sink the rest.
# Then the LoRA suite (test_bench_lora.py, preset 1b): every method over the LoRA adapters (r = 8) of a
# ~1B-parameter LLaMA (random weights in bf16) against plain LoRA fine-tuning, batch 8 x 512 tokens:
# steps, peak memory, the Laplace fit, predict at batch 1/2/4 (BAYESKERN_BENCH_LORA_TIMEOUT s, default 150).
# On a machine without CUDA it skips the CUDA parts (and the LoRA suite, unless BAYESKERN_BENCH_LORA_CPU=1
# runs it in quick mode) and runs the same benchmark + report pipelines on tiny CPU sizes (the overhead
# suite in quick mode on the MLP), so CI exercises the script.
#
#   bash benchmarks/device_check.sh [RESULTS_DIR]      (default: benchmarks/results, or $OUT if set)
#
# Budget: under 10 minutes on one H100 (the LoRA suite about 2 of them).  Wheels missing on the device
# machine (pytest-benchmark, py-cpuinfo) can travel in .whl/ (see benchmarks/README.md, "GPU checks");
# they are installed when present.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=${1:-${OUT:-benchmarks/results}}
mkdir -p "$RESULTS"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/bk-site .whl/*.whl
  export PYTHONPATH=/tmp/bk-site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import bayeskern.kernels" 2>/dev/null || $PY -m pip install -q --no-build-isolation --no-deps -e .

if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  DEVICE=cuda
  nvidia-smi -L || true
  if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
    CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")")
    export CUDA_HOME
  fi
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  SIZES=${BAYESKERN_BENCH_SIZES:-16777216,268435456}
  BENCH_ARGS=()
  export BAYESKERN_BENCH_MODELS=${BAYESKERN_BENCH_MODELS:-resnet50,vit_base}
  export BAYESKERN_BENCH_BATCH=${BAYESKERN_BENCH_BATCH:-64} BAYESKERN_BENCH_AMP=${BAYESKERN_BENCH_AMP:-bf16}
  export BAYESKERN_BENCH_ROUNDS=${BAYESKERN_BENCH_ROUNDS:-3} BAYESKERN_BENCH_INTERLEAVED_ROUNDS=${BAYESKERN_BENCH_INTERLEAVED_ROUNDS:-5}
  RUN_TIMEOUT=${BAYESKERN_BENCH_RUN_TIMEOUT:-130} METHODS_BUDGET=${BAYESKERN_BENCH_METHODS_BUDGET:-270}
  echo "== op tests on CUDA tensors"
  BAYESKERN_TEST_DEVICE=cuda $PY -m pytest -q -p no:cacheprovider \
    tests/test_philox.py tests/test_ops_sample.py tests/test_ops_dropout.py tests/test_ops_draw.py tests/test_ops_compile.py tests/test_sgld.py tests/test_fisher.py tests/test_ops_ivon.py tests/test_ivon.py \
    2>&1 | tee "$RESULTS/ops-tests-cuda-$STAMP.log"
else
  DEVICE=cpu
  echo "== no CUDA device: CUDA tests and GPU sizes skipped; tiny CPU run of the benchmark pipeline"
  SIZES=${BAYESKERN_BENCH_SIZES:-65536}
  BENCH_ARGS=(--benchmark-min-rounds=1 --benchmark-max-time=0.01 --benchmark-warmup=off)
  export BAYESKERN_BENCH_QUICK=1 BAYESKERN_BENCH_MODELS=${BAYESKERN_BENCH_MODELS:-mlp}
  RUN_TIMEOUT=${BAYESKERN_BENCH_RUN_TIMEOUT:-60} METHODS_BUDGET=${BAYESKERN_BENCH_METHODS_BUDGET:-100}
fi

JSON="$RESULTS/ops-$DEVICE-$STAMP.json"
echo "== op benchmarks on $DEVICE, sizes $SIZES"
BAYESKERN_BENCH_DEVICE=$DEVICE BAYESKERN_BENCH_SIZES=$SIZES $PY -m pytest -q -p no:cacheprovider \
  benchmarks/test_bench_ops.py benchmarks/test_bench_draw.py --benchmark-json="$JSON" "${BENCH_ARGS[@]}" >"$RESULTS/ops-bench-$DEVICE-$STAMP.log" 2>&1 \
  || { tail -50 "$RESULTS/ops-bench-$DEVICE-$STAMP.log"; exit 1; }
$PY benchmarks/report.py "$JSON" | tee "$RESULTS/ops-$DEVICE-$STAMP.md"

JSON="$RESULTS/laplace-$DEVICE-$STAMP.json"
echo "== diagonal-Fisher benchmarks on $DEVICE (against the per-example loop and vmap)"
BAYESKERN_BENCH_DEVICE=$DEVICE timeout "${BAYESKERN_BENCH_LAPLACE_TIMEOUT:-90}" $PY -m pytest -q -p no:cacheprovider benchmarks/test_bench_laplace.py \
  --benchmark-only --benchmark-json="$JSON" >"$RESULTS/laplace-bench-$DEVICE-$STAMP.log" 2>&1 \
  && $PY benchmarks/report.py "$JSON" | tee "$RESULTS/laplace-$DEVICE-$STAMP.md" \
  || { tail -30 "$RESULTS/laplace-bench-$DEVICE-$STAMP.log"; [ "$DEVICE" = cuda ] || exit 1; }

JSON="$RESULTS/kron-glm-$DEVICE-$STAMP.json"
echo "== K-FAC fit and GLM predictive benchmarks on $DEVICE (against plain passes and laplace-torch)"
BAYESKERN_BENCH_DEVICE=$DEVICE timeout "${BAYESKERN_BENCH_KRON_TIMEOUT:-120}" $PY -m pytest -q -p no:cacheprovider benchmarks/test_bench_kron_glm.py \
  --benchmark-only --benchmark-json="$JSON" >"$RESULTS/kron-glm-bench-$DEVICE-$STAMP.log" 2>&1 \
  && $PY benchmarks/report.py "$JSON" | tee "$RESULTS/kron-glm-$DEVICE-$STAMP.md" \
  || { tail -30 "$RESULTS/kron-glm-bench-$DEVICE-$STAMP.log"; [ "$DEVICE" = cuda ] || exit 1; }

JSON="$RESULTS/ivon-$DEVICE-$STAMP.json"
echo "== IVON against AdamW on $DEVICE: training step and optimizer ($BAYESKERN_BENCH_MODELS)"
BAYESKERN_BENCH_DEVICE=$DEVICE timeout "${BAYESKERN_BENCH_IVON_TIMEOUT:-150}" $PY -m pytest -q -p no:cacheprovider benchmarks/test_bench_ivon.py \
  --benchmark-only --benchmark-json="$JSON" >"$RESULTS/ivon-bench-$DEVICE-$STAMP.log" 2>&1 \
  && $PY benchmarks/report.py "$JSON" | tee "$RESULTS/ivon-$DEVICE-$STAMP.md" \
  || { tail -30 "$RESULTS/ivon-bench-$DEVICE-$STAMP.log"; [ "$DEVICE" = cuda ] || exit 1; }

PEERS=()
for module in bayesian_torch ivon laplace; do
  $PY -c "import $module" 2>/dev/null && PEERS=(benchmarks/test_bench_peers.py) && break
done
# Per model, the training steps + Fisher epoch, then the predictions (the compilations), each a pytest
# run with its own JSON, capped by the per-run limit and by what is left of the suite's budget.
DEADLINE=$((SECONDS + METHODS_BUDGET))
IFS=, read -ra MODELS <<<"$BAYESKERN_BENCH_MODELS"
for model in "${MODELS[@]}"; do
  for part in train predict; do
    select="train_step or fisher_epoch"
    [ "$part" = predict ] && select=predict
    left=$((DEADLINE - SECONDS))
    limit=$((left < RUN_TIMEOUT ? left : RUN_TIMEOUT))
    name="methods-$model-$part-$DEVICE-$STAMP"
    if [ "$limit" -lt 20 ]; then echo "== $name skipped: the suite's ${METHODS_BUDGET}s budget is spent"; continue; fi
    echo "== overhead benchmarks on $DEVICE: $model, $part (limit ${limit}s)"
    if BAYESKERN_BENCH_DEVICE=$DEVICE BAYESKERN_BENCH_MODELS=$model timeout "$limit" $PY -m pytest -q -p no:cacheprovider \
        benchmarks/test_bench_methods.py "${PEERS[@]}" -k "$select" --benchmark-only \
        --benchmark-json="$RESULTS/$name.json" >"$RESULTS/$name.log" 2>&1; then
      $PY benchmarks/report.py "$RESULTS/$name.json" | tee "$RESULTS/$name.md"
    else
      echo "$name failed or ran out of time:"; tail -30 "$RESULTS/$name.log"
      [ "$DEVICE" = cuda ] || exit 1  # CI must pass; on the device machine the other runs still go
    fi
  done
done

# LoRA over a ~1B LLaMA (bf16, random weights): the methods' steps, peak memory, Laplace fit and predict
# against plain LoRA fine-tuning (test_bench_lora.py; its validation-NLL comparison of the priors runs on
# CPU and is left out here).  Needs transformers and peft.
name="lora-$DEVICE-$STAMP"
if [ "$DEVICE" = cpu ] && [ "${BAYESKERN_BENCH_LORA_CPU:-0}" != 1 ]; then
  echo "== LoRA benchmarks skipped: no CUDA device (BAYESKERN_BENCH_LORA_CPU=1 runs them in quick mode)"
elif ! (cd /tmp && $PY -c "import transformers, peft") 2>/dev/null; then  # not from the root: kernels/
  echo "== LoRA benchmarks skipped: transformers or peft is not installed"
else
  preset=1b limit=${BAYESKERN_BENCH_LORA_TIMEOUT:-150}
  [ "$DEVICE" = cpu ] && preset=quick limit=${BAYESKERN_BENCH_LORA_TIMEOUT:-600}
  echo "== LoRA benchmarks on $DEVICE: LLaMA preset $preset (limit ${limit}s)"
  if BAYESKERN_BENCH_DEVICE=$DEVICE BAYESKERN_BENCH_LORA_PRESET=${BAYESKERN_BENCH_LORA_PRESET:-$preset} \
      timeout "$limit" $PY -m pytest -q -p no:cacheprovider benchmarks/test_bench_lora.py \
      -k "not validation_nll" --benchmark-only --benchmark-json="$RESULTS/$name.json" >"$RESULTS/$name.log" 2>&1; then
    $PY benchmarks/report.py "$RESULTS/$name.json" | tee "$RESULTS/$name.md"
  else
    echo "$name failed or ran out of time:"; tail -30 "$RESULTS/$name.log"
    [ "$DEVICE" = cuda ] || exit 1
  fi
fi

# FSDP2 (fully_shard) over NCCL, 2 GPUs: BayesSGLD + SampleBank and DiagLaplace (fit, samples, predict)
# against one process on the same global data (benchmarks/fsdp_nccl_check.py; the CPU tests check the
# same under gloo).  Skipped with fewer than 2 GPUs.
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -ge 2 ]; then
  echo "== FSDP2 over NCCL on 2 of $GPUS GPUs: SGLD, SampleBank, DiagLaplace against one process"
  if ! timeout "${BAYESKERN_FSDP_TIMEOUT:-300}" $PY -m torch.distributed.run --standalone --nproc_per_node=2 \
      benchmarks/fsdp_nccl_check.py 2>&1 | tee "$RESULTS/fsdp-nccl-$STAMP.log"; then
    echo "fsdp-nccl-$STAMP failed or ran out of time"
  fi
else
  echo "== FSDP2 NCCL case skipped: $GPUS GPU(s), needs 2"
fi
