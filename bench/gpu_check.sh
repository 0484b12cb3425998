#!/bin/sh
# The GPU checks of issue 3 in one command, for a machine with CUDA (run from the repo root).
#
# 1. tests/test_clip_cuda.py: every rule and a wrapped step under
#    torch.cuda.set_sync_debug_mode("error"), results equal to the CPU; the CUDA-graph update of
#    AutoClip/ZClip against its eager twin; AGC's Triton kernel against the CPU.
# 2. bench/clip.py --device cuda: the ratios the issue sets, plus the eager paths for contrast.
# 3. train.device (issue 16): tests/test_device.py (its CUDA test runs the whole CLI on the GPU,
#    checks model, masks and optimizer state live there and the files load on the CPU), then
#    one short `secateurs run --set train.device=cuda` whose report must say cuda:0.
# 4. One-shot SparseGPT on CUDA (issue 18): the in-place Cholesky chain and a pruned layer
#    against the CPU (tests/test_oneshot_methods.py -k cuda).
#
# Packages the machine lacks can come as wheels in .whl/ (see the device notes); they are
# installed to /tmp/site first. Output goes to stdout and, when OUT is set, to $OUT/.
set -eu
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="src:${PYTHONPATH:-}"
log="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/test_clip_cuda.py 2>&1 | tee "$log/cuda_tests.txt"
python3 bench/clip.py --device cuda --rounds 50 --launches 2>&1 | tee "$log/bench_cuda.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_device.py 2>&1 | tee "$log/device_tests.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_oneshot_methods.py -k cuda 2>&1 | tee "$log/oneshot_cuda_tests.txt"
rm -rf /tmp/gpu_run
python3 -m secateurs run --quiet --out /tmp/gpu_run --set train.device=cuda --set train.epochs=3 \
    --set prune.epochs=3 --set prune.finetune_epochs=2 --set data.limit=600 2>&1 | tee "$log/gpu_run.txt"
python3 -c "import json; r = json.load(open('/tmp/gpu_run/report.json')); assert r['device'] == 'cuda:0', r['device']; print('report device', r['device'], 'final accuracy', r['final']['accuracy'])" 2>&1 | tee -a "$log/gpu_run.txt"
