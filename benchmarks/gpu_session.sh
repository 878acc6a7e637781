#!/usr/bin/env bash
# One call on a lent GPU (the device tool's `run`): install the carried wheels, print the
# machine, run the CUDA tests, then the GPU benchmark one operation at a time, each within its
# own time cap so that one slow stage cannot take the others' minutes. Everything lands in $OUT.
#
#   bash benchmarks/gpu_session.sh            # on the GPU: full size, SD 1.5 compiled
#   SIZE=tiny DEVICE=cpu OUT=/tmp/s bash benchmarks/gpu_session.sh   # the CPU dry run
#
# The device image (Python 3.12, its own torch) lacks some of what the worker imports. Fetch
# their wheels here once, into .whl/ (listed in .git/info/exclude), and carry it with the call:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl diffusers tomesd isal pydantic pydantic-core \
#     pydantic-settings annotated-types typing-inspection python-dotenv typing-extensions \
#     celery kombu amqp vine billiard tzlocal
# (the versions of .venv: `pip list` there; pydantic-core must be the one pydantic pins).
set -u
OUT=${OUT:-/tmp/gpu-session}
SIZE=${SIZE:-full}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
WHEELS=${WHEELS:-.whl}
if [ -d "$WHEELS" ] && [ -n "$(ls "$WHEELS"/*.whl 2>/dev/null)" ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

stage() {  # stage NAME CAP_SECONDS COMMAND...: run with a cap, log, report how it ended
    local name=$1 cap=$2 started=$SECONDS
    shift 2
    echo "=== $name (cap ${cap}s)"
    timeout --signal=TERM --kill-after=5 "$cap" "$@" 2>&1 | grep -v "CLIPImageProcessor\|SiglipImageProcessor"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - started)) s"
}

bench() {  # bench NAME CAP ARGS...: one benchmark process, its JSON under $OUT
    local name=$1 cap=$2
    shift 2
    stage "$name" "$cap" "$PYTHON" -m benchmarks.gpu --device "$DEVICE" --size "$SIZE" \
        --out "$OUT/gpu-$name.json" "$@"
}

{
    date -u
    nvidia-smi 2>&1 | head -20
    "$PYTHON" - <<'PY'
import platform, torch, diffusers, transformers
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "diffusers", diffusers.__version__, "transformers", transformers.__version__)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
PY
    stage cuda-tests "${CAP_TESTS:-100}" "$PYTHON" -m pytest --noconftest -p no:cacheprovider \
        -p pytest_timeout -q -s -rfE tests/cuda
    # Eager first, NHWC against NCHW at the batch sizes where the GPU is busy (2026-12-04: at
    # batch 8, 29% of the kernel time went to layout copies around GroupNorm in NHWC).
    bench img2img-nhwc "${CAP_NHWC:-45}" --operations img2img --no-compile --requests 16 \
        --batch-sizes 1,8,16 --profile-batch 8 --profile-out "$OUT/profile-img2img.txt"
    bench img2img-nchw "${CAP_NCHW:-45}" --operations img2img --no-compile --no-channels-last \
        --requests 16 --batch-sizes 1,8,16
    bench sdxl "${CAP_SDXL:-60}" --operations sdxl_img2img --no-compile --requests 4 \
        --batch-sizes 1,4
    bench flux "${CAP_FLUX:-50}" --operations flux_img2img --no-compile --requests 2 \
        --batch-sizes 1,2
    # Last, with what is left: compiling SD 1.5's UNet (every dimension dynamic) at full size
    # did not finish within 190 s on 2026-12-04.
    bench img2img-compiled "${CAP_COMPILED:-230}" --operations img2img --requests 16 \
        --batch-sizes 1,8,16
    nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,temperature.gpu --format=csv
    date -u
} 2>&1 | tee "$OUT/session.log"
