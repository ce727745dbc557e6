#!/usr/bin/env bash
# The GPU checks and GPU benchmarks in one device call, sized for a 15-minute device budget.
#
# On the lent GPU machine (torch, pytest, hypothesis, numpy, aiofiles are there; zstandard is not,
# so carry it as a wheel, see ../.library/device/README.md):
#   here, once:  echo /.whl/ >> .git/info/exclude
#                python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#                  --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#                  -d .whl zstandard
#   device run:  command "bash bench/gpu_check.sh", carry [".whl"], timeout_s 600 (the tool's most)
#   other steps: command "STEPS='stall restore' bash bench/gpu_check.sh"
# Steps, run in this order (default: overlap tests demo, 8.5 min of limits, about 6 min used if all
# goes well, inside the device tool's 600 s per command; a cold start adds ~1 min; name at most 3
# steps at a time, or more than 8 files come back):
#   overlap  blocking vs overlap vs overlap with one OpenMP thread per encoder, 4.0 GB state, batch
#            made on the GPU, 3 rounds; fence wait (host + GPU stream), CPU per checkpoint split
#            into the encoders' own and the rest                                          (330 s)
#   encoder  bench/encoder_threads.py on this machine's cores, CPU training (not default)    (90 s)
#   tests    the CUDA tests, overlap consistency, staging and manager on the GPU           (120 s)
#   demo     `asyncckpt demo` on the GPU, overlap mode, 10 s of training: the main job      (60 s)
#   stall    every saver, 4.0 GB state, 1 round; run 2026-11-27 (200 s was cut short at
#            DCP), results in bench/results/h100/                                        (300 s)
#   restore, memory  (80 s, 50 s; run 2026-11-27)
# Results land in $OUT, 8 files at most (what the device tool brings back): summary.txt (GPU, host,
# versions, each step's exit status) and NAME.log (+ NAME-gpu.json) per step. Every benchmark
# prints its numbers as it measures them, so a step stopped at its time limit still leaves them,
# and `python bench/stall.py --from-json X-gpu.json` prints the table of a stall run cut short.
# On a CPU machine `GPU_CHECK_DRY=1 bash bench/gpu_check.sh` runs the same steps tiny, to test the script.
set -uo pipefail
OUT=${OUT:-/tmp/asyncckpt-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
STEPS=${STEPS:-overlap tests demo}
S="$OUT/summary.txt"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:$PWD/tests:${PYTHONPATH:-}"

if [ -n "${GPU_CHECK_DRY:-}" ]; then
    DEVICE=cpu; WIDTH=512; DEPTH=2; BATCH=32; ITERS=8; EVERY=4; RWIDTH=512; RDEPTH=2; SAVES=5
    OITERS=8; OEVERY=4; ENC="--width 256 --depth 2 --rounds 1 --saves 1 --iters 4 --every 2"; DEMO_SECONDS=3
    SAVERS=none,asyncckpt,asyncckpt-overlap,torch.save,torch.save-thread,dcp
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$S" 2>&1
    # 8192 x 5 Linear + AdamW = 4.0 GB of state (the GPU figures are for >= 4 GB). Batch 8192: an
    # iteration took 0.55 s on the H100 with the batch made on the CPU, and persist 3-3.5 s, so a checkpoint every 15 iterations is not queued behind the
    # previous one's persist: the stall measured is the snapshot's.
    DEVICE=cuda; WIDTH=8192; DEPTH=5; BATCH=8192; ITERS=30; EVERY=15; RWIDTH=8192; RDEPTH=2; SAVES=10
    SAVERS=none,asyncckpt,asyncckpt-overlap,torch.save,torch.save-thread,dcp,dcp-stager
    # Overlap alone: 3 checkpoints a round, 3 rounds, each round paired with its own loop without
    # saves. The batch is made on the GPU, so the loop is GPU-bound: the 2026-11-27 runs made it on
    # the CPU (0.55 s of the training thread per step) and measured CPU contention, +-0.25 s/ckpt.
    OITERS=45; OEVERY=15; ENC="--rounds 1"; DEMO_SECONDS=10
fi
{ date -u; nproc; free -g | head -2; df -h /tmp | tail -1; } >>"$S" 2>&1
# Preflight: stop before spending device time on steps that cannot import what they need.
$PY -c "import sys, torch, zstandard, asyncckpt; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'zstandard', zstandard.__version__)" >>"$S" 2>&1 \
    || { echo "preflight failed: is zstandard carried (.whl)?"; cat "$S"; exit 2; }
if [ -z "${GPU_CHECK_DRY:-}" ]; then
    $PY -c "import torch; assert torch.cuda.is_available()" >>"$S" 2>&1 || { echo "preflight: no CUDA"; cat "$S"; exit 2; }
fi
PER_TEST=""
$PY -c "import pytest_timeout" 2>/dev/null && PER_TEST="--timeout 60"

step() {  # name, time limit in s, command...: output to $OUT/name.log; a failure does not stop the rest
    local name=$1 limit=$2; shift 2
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    echo "== $name ($(date -u +%T), limit ${limit}s)" | tee -a "$S"
    timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "   exit $?" | tee -a "$S"
    tail -n 20 "$OUT/$name.log"
}

# 1. the GPU targets: overlap stall < 5 ms and loop overhead < half the bare copy (>= 4 GB).
#    asyncckpt-overlap-omp1: do 8 encoders x OpenMP teams as wide as the host cost the training
#    thread (which launches the kernels) its core, and CPU? Same run, same rounds.
step overlap 330 $PY bench/stall.py --device "$DEVICE" --width "$WIDTH" --depth "$DEPTH" --batch "$BATCH" \
    --iters "$OITERS" --every "$OEVERY" --repeats 3 --cpu-saves 1 \
    --savers none,asyncckpt,asyncckpt-overlap,asyncckpt-overlap-omp1 --json "$OUT/overlap-gpu.json"
# 2. the encoder's CPU cost with many cores: torch's default threads per worker vs fewer (CPU training)
step encoder 90 $PY bench/encoder_threads.py $ENC --json "$OUT/encoder-gpu.json"
# 3. correctness on the GPU (after the benchmarks: it passed on the H100 on 2026-11-27, and a
#    hang here must not cost them): the CUDA paths end to end, overlap consistency, staging, manager.
#    -v and no -x: one scarce run should name every failure, and a hang shows where it hung.
step tests 120 $PY -m pytest -v -p no:cacheprovider $PER_TEST tests/test_cuda_paths.py tests/test_overlap.py \
    tests/test_staging.py tests/test_manager.py
# 4. the main job, as a user runs it (demo picks cuda when there is one)
step demo 60 $PY -c "import sys; from asyncckpt.cli.commands import main; sys.exit(main(sys.argv[1:]))" \
    demo --seconds "$DEMO_SECONDS" --snapshot overlap
# 5. blocking vs overlap vs the alternatives, >= 4 GB state, with the bare device->pinned copy floor
step stall 300 $PY bench/stall.py --device "$DEVICE" --width "$WIDTH" --depth "$DEPTH" --batch "$BATCH" \
    --iters "$ITERS" --every "$EVERY" --repeats 1 --cpu-saves 1 --savers "$SAVERS" --json "$OUT/stall-gpu.json"
# 6. time back to training, and host memory across saves (one pinned arena, exactly the state's size)
step restore 80 $PY bench/restore.py --width "$RWIDTH" --depth "$RDEPTH" --repeats 2 --json "$OUT/restore-gpu.json"
step memory 50 $PY bench/memory.py --width "$RWIDTH" --depth "$RDEPTH" --saves "$SAVES" --json "$OUT/memory-gpu.json"
echo "files in \$OUT: $(ls "$OUT" | wc -l) (the device tool returns 8 at most)" | tee -a "$S"
cat "$S"
