#!/usr/bin/env bash
# One prepared single-GPU benchmark (H100/H200) of cratescale, finishing in under 8 minutes:
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
#        .venv/bin/python bench/gpu_bench.py --prepare-data ../shared/data/imagenet-sample.tar \
#          .gpudata/imagenet-sample-300.tar --max-images 300
#
# Run on the device (repo root as cwd): carry [".whl", ".gpudata"], timeout_s 540, command `bash bench/gpu.sh`.
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
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv 2>/dev/null || true
# Python keeps its own deadline (--budget 430 s); timeout is the backstop so the whole script ends < 8 min.
timeout -k 10 460 "$PYTHON" bench/gpu_bench.py --budget 430 --data "$DATA" "$@"
rc=$?
[ $rc -eq 124 ] && echo "gpu.sh: gpu_bench.py hit the 460 s backstop; partial results are in \$OUT" >&2
exit $rc
