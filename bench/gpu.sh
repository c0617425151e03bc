#!/usr/bin/env bash
# One prepared single-GPU benchmark (H100/H200) of cratescale, finishing in under 10 minutes: first a two-minute
# correctness section (bench/gpu_check.py, below), then the speed rows:
# training steps of CRATE-MAE-Base and ViT-MAE-Base with bf16 weights as DeepSpeed's bf16 mode runs them
# (largest batch that fits, flash SDPA, eager and torch.compile, token layouts "all" and "visible"), images/s
# and MFU against a bf16 matmul peak measured in the same run; the product's own path (jobs/imagenet21k.yaml ->
# DeepSpeed ZeRO-2 engine, eager and parallel.compile); a kernel profile of the CRATE step; activation
# checkpointing and autocast variants; checkpoint write GB/s (torch.save + fsync, and DeepSpeed ZeRO-2 through
# CheckpointStore); batched nvJPEG decode. Sections run in priority order under one deadline.
# Results: a markdown table on stdout, and $OUT/gpu_results.{md,json} + $OUT/gpu_profile_*.txt when $OUT is
# set (rewritten after every row, so a killed run still leaves partial results). Code: bench/gpu_bench.py,
# gpu_train.py, gpu_decode.py, gpu_harness.py, gpu_kernels.py (the MSSA Triton kernel, CUDA graphs at small
# per-GPU batches, patch embedding and strided-view rows).
#
# The device machine has torch, torchvision, triton, pyarrow, pyyaml, numpy, psutil, ninja, msgpack, einops,
# py-cpuinfo, tqdm; not deepspeed, pydantic or hjson (Ray and DALI are not needed here). Prepare, on this
# machine, in the repo root (both folders are ignored by git and travel only when carried):
#
#   1. .whl/ (about 5 MB): deepspeed is sdist-only on PyPI, so `pip download --only-binary=:all:
#      deepspeed==0.19.8` finds nothing; build the (pure-Python) wheel instead, then fetch its missing needs
#      as cp312 wheels (the device runs Python 3.12):
#        .venv/bin/pip wheel --no-deps deepspeed==0.19.8 -w .whl            # deepspeed-0.19.8-py3-none-any.whl, 2.1 MB
#        .venv/bin/pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#          -d .whl hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
#          typing-inspection==0.4.5 typing_extensions==4.16.0
#   2. .gpudata/ (about 33 MB): 300 photos of the ImageNet sample (the whole 111 MB tar does not fit the
#      64 MiB that may travel); .gpudata/ must be ignored (a line `.gpudata/` in .gitignore):
#        .venv/bin/python -m bench.gpu_bench --prepare-data ../shared/data/imagenet-sample.tar \
#          .gpudata/imagenet-sample-300.tar --max-images 300
#
# Run on the device (repo root as cwd): carry [".whl", ".gpudata"], timeout_s 600, command `bash bench/gpu.sh`
# (SKIP_CHECK=1 to leave the correctness section out and keep the old 8 minutes).
# Without .whl the DeepSpeed row is skipped; without .gpudata the decode rows are skipped (with the reason).
# Extra arguments go to gpu_bench.py (e.g. --budget 300, --no-force-flash, --only 'crate_mae_base all').
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 DS_ACCELERATOR="${DS_ACCELERATOR:-cuda}"
PYTHON="${PYTHON:-python3}" WHL_DIR="${WHL_DIR:-.whl}" SITE="${SITE:-/tmp/site}"   # overridable for tests
if ls "$WHL_DIR"/*.whl >/dev/null 2>&1; then
    if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHL_DIR"/*.whl; then
        export PYTHONPATH="$SITE:$PYTHONPATH"
    else
        echo "gpu.sh: installing $WHL_DIR/*.whl failed; the DeepSpeed row will say so" >&2
    fi
fi
DATA=.gpudata
[ -d "$DATA" ] || DATA=/nonexistent/.gpudata   # the decode section prints why it skipped

# ---- 1. correctness (issue 15): about two minutes, before any speed row (bench/gpu_check.py) ----------------
# What only a GPU shows about the GPU path that has never run: DALI mixed decode at hw_decoder_load 0 and 0.75
# against the CPU decoder on real JPEGs; data.gpu_decode roi (nvImageCodec crop-window decoder) against full
# decode + GPU slice, and what auto picks (the probe in a child: nvImageCodec #55, SIGSEGV on H100); grad_accum 2
# training micro-steps with each batch as the step saw it against the CPU route (the DALI -> torch hand-off's
# stream); 2 Ray extraction actors with extract.gpus_per_actor; this GPU's binding and the stop with CUDA
# hidden. DALI and Ray are not on the device machine: install nvidia-dali-cuda130 and ray there first, else
# those rows say "skipped" with the reason. Results: $OUT/gpu_check.{md,json} (copy to bench/results/).
# SKIP_CHECK=1 goes straight to the speed rows. A FAIL here makes the script's exit status 1.
CHECK_RC=0
if [ "${SKIP_CHECK:-0}" != 1 ]; then
    SMOKE=""; for a in "$@"; do [ "$a" = "--cpu-smoke" ] && SMOKE="--cpu-smoke"; done
    timeout -k 10 150 "$PYTHON" -m bench.gpu_check --budget 120 --data "$DATA" $SMOKE
    CHECK_RC=$?
    [ $CHECK_RC -ne 0 ] && echo "gpu.sh: the correctness section failed (rc $CHECK_RC, gpu_check.md); speed rows follow" >&2
fi
# ---- end of the correctness section ---------------------------------------------------------------------------
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv 2>/dev/null || true
# Python keeps its own deadline (--budget); timeout is the backstop so the whole script ends < 10 min (< 8 min
# without the correctness section, which takes up to 150 s of it).
BUDGET=430; [ "${SKIP_CHECK:-0}" != 1 ] && BUDGET=300
timeout -k 10 $((BUDGET + 30)) "$PYTHON" -m bench.gpu_bench --budget $BUDGET --data "$DATA" "$@"
rc=$?
[ $rc -eq 124 ] && echo "gpu.sh: gpu_bench.py hit the $((BUDGET + 30)) s backstop; partial results are in \$OUT" >&2
[ $rc -eq 0 ] && rc=$CHECK_RC
exit $rc
