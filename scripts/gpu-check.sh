#!/usr/bin/env bash
# gpu-check.sh OUTDIR — vkconv on a machine with a real GPU, in under 8 minutes, offline.
#
# Run from the checkout:  bash scripts/gpu-check.sh OUTDIR
#
# Steps (each time-boxed with `timeout`; a failure or timeout is recorded, never stops the script):
#   1. env      GPU, driver, Python and package versions                    -> OUTDIR/env.txt
#   2. info     `vkconv info --json`                                        -> OUTDIR/info.json
#   3. tests    conv and plugin tests with VKCONV_VALIDATION=1              -> OUTDIR/tests.xml, tests.txt
#   4. tune     `vkconv tune` on VGG-16 (convolutions, 224x224) and on a PP-OCR-det-shaped model
#               (640x640), into a fresh cache; then a second process on the warm cache
#                                                                           -> OUTDIR/tune-*.txt
#   5. bench    `vkconv bench conv --quick` against OpenCV CPU, OpenCV's OpenCL target and ncnn's
#               Vulkan path (each where importable), tuned choices (the cache of step 4)
#                                                                           -> OUTDIR/bench/conv-*.jsonl, .png
# Every step appends one JSON line to OUTDIR/steps.jsonl: {"step", "rc", "seconds", "log"}
# (rc 124: timed out).  The script exits 0 once it has run every step; check steps.jsonl.
#
# Needs, already installed (the machine is offline; no package index):
#   - an NVIDIA driver with its Vulkan ICD (nvidia_icd.json) and libvulkan1 (the Vulkan loader);
#     vulkan-validationlayers (VK_LAYER_KHRONOS_validation) for step 3 (without it step 3 fails
#     and is recorded; the other steps run);
#   - Python 3.11+ (3.12 there) with: numpy, vulkan (the cffi binding; needs libvulkan.so.1),
#     opencv-python-headless (4.10-4.14), onnx, onnxruntime, pytest; optional: ncnn (Vulkan peer),
#     matplotlib (PNG charts), tqdm (progress bars).
#   Offline install from wheels copied alongside:  WHEELHOUSE=/path/to/wheels bash scripts/gpu-check.sh OUT
#   runs `pip install --no-index --find-links "$WHEELHOUSE" ...` into a fresh virtualenv first.
# Environment: PYTHON (default python3), VKCONV_TUNE_BUDGET_MS (default 2000 per shape).
set -u

if [ $# -ne 1 ]; then
    echo "usage: bash scripts/gpu-check.sh OUTDIR" >&2
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export VKCONV_CACHE_DIR="$OUT/tune-cache"   # a fresh tuning cache: step 4 measures, step 5 uses it
export VKCONV_TUNE_BUDGET_MS=${VKCONV_TUNE_BUDGET_MS:-2000}
: > "$OUT/steps.jsonl"
START=$(date +%s)

# step NAME SECONDS COMMAND...: run COMMAND under `timeout`, its output in OUTDIR/NAME.log
step() {
    local name=$1 limit=$2
    shift 2
    local t0 rc ms
    t0=$(date +%s%N)
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    printf '{"step": "%s", "rc": %d, "seconds": %d.%03d, "limit": %d, "log": "%s.log"}\n' \
        "$name" "$rc" $((ms / 1000)) $((ms % 1000)) "$limit" "$name" >> "$OUT/steps.jsonl"
    echo "   rc=$rc in $((ms / 1000)) s; last lines:"
    tail -n 4 "$OUT/$name.log" | sed 's/^/   | /'
}

if [ -n "${WHEELHOUSE:-}" ]; then
    step venv 45 bash -c "$PY -m venv '$OUT/venv' && '$OUT/venv/bin/pip' install -q --no-index \
        --find-links '$WHEELHOUSE' numpy vulkan opencv-python-headless onnx onnxruntime pytest \
        && ('$OUT/venv/bin/pip' install -q --no-index --find-links '$WHEELHOUSE' ncnn matplotlib tqdm || true)"
    PY="$OUT/venv/bin/python"
fi

# 1. environment
step env 15 bash -c "nvidia-smi; echo; vulkaninfo --summary 2>&1 | head -40; echo; $PY --version; \
    $PY -m pip list 2>/dev/null | grep -iE 'numpy|vulkan|opencv|onnx|pytest|ncnn|matplotlib'; \
    $PY -c 'import cv2; print(\"cv2\", cv2.__version__, \"OpenCL:\", cv2.ocl.haveOpenCL())'"
cp "$OUT/env.log" "$OUT/env.txt"

# 2. devices
step info 20 bash -c "$PY -m vkconv info --json > '$OUT/info.json' && $PY -m vkconv info"

# Limits add up to 425 s (470 s with the venv step), under 8 minutes with the 5 s kill grace.
# 3. tests with validation (the slowest step; the limit leaves room for the rest)
step tests 140 env VKCONV_VALIDATION=1 "$PY" -m pytest -q -p no:cacheprovider --junitxml="$OUT/tests.xml" \
    tests/ops/test_conv.py tests/ops/test_conv_kernels.py tests/ops/test_tune.py tests/plugin/test_plugin.py
cp "$OUT/tests.log" "$OUT/tests.txt"

# 4. tuning: VGG-16's 13 convolutions at 224 and a PP-OCR-det-shaped model at 640
step models 30 "$PY" -c "
import onnx
from cv_plugin.bench import zoo
onnx.save(zoo.vgg16(size=224, head=False), '$OUT/vgg16-conv.onnx')
onnx.save(zoo.ppocr_det_like(size=640), '$OUT/ppocr-det-like.onnx')
"
step tune-vgg16 60 "$PY" -m vkconv tune "$OUT/vgg16-conv.onnx" --time-limit 40
step tune-vgg16-cached 20 "$PY" -m vkconv tune "$OUT/vgg16-conv.onnx"
step tune-ppocr 50 "$PY" -m vkconv tune "$OUT/ppocr-det-like.onnx" --mode subgraph --time-limit 30
for f in tune-vgg16 tune-vgg16-cached tune-ppocr; do cp "$OUT/$f.log" "$OUT/$f.txt"; done

# 5. the conv benchmark (tuned choices from the cache above) against its peers
step bench 90 "$PY" -m vkconv bench conv --quick --out "$OUT/bench"

echo "gpu-check: $(($(date +%s) - START)) s; steps:"
cat "$OUT/steps.jsonl"
exit 0
