#!/usr/bin/env bash
# The GPU measurements the issues ask for, in one prepared run on a CUDA machine (H100/H200), most
# important first: correctness on this device, then each issue's benchmark at its GPU presets, then
# the end-to-end ViT-B step. Each step has its own time limit, so a slow step costs its own numbers,
# not the ones after it. Logs and JSON go to $OUT (default ./gpu_out), at most 8 files.
#
#   bash scripts/gpu_timings.sh                # everything, about 10-15 minutes
#   STEPS="verify linear" bash scripts/gpu_timings.sh
#
# The C++ extension is built against the machine's torch (no build isolation: nothing is fetched);
# the Triton kernels autotune on first use per shape, which the benchmarks' warm-up absorbs.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
steps=${STEPS:-"verify linear attention e2e"}

python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

run_step() {  # name, time limit in seconds, command...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]}"
}

for step in $steps; do
    case $step in
        verify) run_step verify 150 subspace-ops verify --device cuda ;;
        linear) run_step linear 300 subspace-ops bench rescaled-linear svd-delta-linear lowrank-linear \
                    --device cuda --shape vit-b-full --shape llama-7b --json "$out/linear.json" ;;
        attention) run_step attention 300 subspace-ops bench head-mixing-attention head-mixing-attention-causal \
                    --device cuda --shape vit-b --shape llm --json "$out/attention.json" ;;
        e2e) run_step e2e 300 subspace-ops bench e2e --device cuda --shape vit-b --json "$out/e2e.json" ;;
        *) echo "unknown step $step (verify, linear, attention, e2e)"; exit 2 ;;
    esac
done
