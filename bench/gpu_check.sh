#!/usr/bin/env bash
# Checks on a lent GPU (the `device` tool): the test suite on the GPU, then GPU timings.
#
#   bash bench/gpu_check.sh [STAGE ...]    # default: env pytest depthwise batched backbones
#
# Carry .devdata (a copy of /usr/share/datasets/fashion-mnist, ignored by .git/info/exclude).
# Session 9 learnt: XLA compiles slowly on the GPU, so the five stages need more than one
# lease (15 device-minutes); every stage streams its rows so that a stage stopped at its limit
# still reports what it measured (bench/GPU.md holds what came back). Stages, each under its own
# limit (env var <STAGE>_S), each writing $OUT/<stage>.log:
#   env        versions and the GPU;
#   pytest     the default suite on the GPU (JAX_PLATFORMS=cuda), float32 matmuls and
#              convolutions at full precision (JAX_DEFAULT_MATMUL_PRECISION=highest: the tests'
#              tolerances are float32's, TF32 would fail them without any bug); verbose, so each
#              failure is named as it happens; tensorflow-datasets' and grain's tests left out
#              (neither is installed there);
#   depthwise  bench.bench_depthwise: 'conv' (lax grouped conv) against 'shift' on the GPU;
#   batched    bench.bench_batched: vmapped runs against one at a time (--batch-runs auto = 64);
#   backbones  bench.bench_backbones: JAX against torchvision on the same GPU.
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export JTRANSFER_CACHE=/tmp/jtransfer_cache
[ -d .devdata/fashion-mnist ] && export JTRANSFER_FMNIST_DIR=$PWD/.devdata/fashion-mnist
PY=${PY:-python3}
STAGES=${*:-env pytest depthwise batched backbones}

stage() {  # stage NAME DEFAULT_SECONDS CMD...: run under a limit, log to $OUT/NAME.log
  local name=$1 var="${1^^}_S" t0=$SECONDS rc
  local secs=${!var:-$2}
  shift 2
  timeout "$secs" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "=== $name: rc $rc after $((SECONDS - t0)) s (limit $secs)" | tee -a "$OUT/summary.log"
  [ $rc = 0 ] || FAILED="$FAILED $name"
}
FAILED=""

for s in $STAGES; do
  case $s in
    env) stage env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
      $PY -c 'import jax, flax, optax, torch, numpy; from bench import tv_cpu; \
import jtransfer, experiments.fewshot; tv = tv_cpu.torchvision_models(); \
print(jax.devices(), jax.__version__, flax.__version__, optax.__version__, torch.__version__, \
numpy.__version__, torch.cuda.is_available())'"
      cat "$OUT/env.log"
      grep -q "CudaDevice" "$OUT/env.log" || { echo "no GPU seen by JAX: stopping"; exit 1; } ;;
    pytest) stage pytest 400 env JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest \
      $PY -m pytest -v -n 14 -p no:cacheprovider -p no:benchmark --timeout 150 --tb=short -rfE \
      --ignore=tests/test_data_tfds.py --ignore=tests/test_stream.py
      grep -E "FAILED|ERROR| passed| failed" "$OUT/pytest.log" | tail -n 30 ;;
    depthwise) stage depthwise 240 $PY -m bench.bench_depthwise --repeats 20 ;;
    batched) stage batched 120 $PY -m bench.bench_batched --runs 8,64 --batches 5,50 --repeats 30 ;;
    backbones) stage backbones 400 $PY -m bench.bench_backbones --torch-device cuda --threads 8 \
      --repeats 20 --archs resnext50_32x4d,mobilenet_v2,efficientnet_b0,convnext_tiny,densenet121,inception_v3,mobilenet_v3_large,wide_resnet50_2,mobilenet_v3_small ;;
    *) echo "unknown stage $s (env pytest depthwise batched backbones)"; exit 2 ;;
  esac
  [ "$s" = pytest ] || [ "$s" = env ] || grep -v "cuda_timer" "$OUT/$s.log" | tail -n 16
done
cat "$OUT/summary.log"
[ -z "$FAILED" ] || { echo "stages failed or stopped at their limit:$FAILED"; exit 1; }
