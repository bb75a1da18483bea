#!/usr/bin/env bash
# Reproduce BENCHMARKS.md: accuracy on LIDC test (AR-Seg vs the deterministic U-Net), figures, speed.
# Usage: tools/run_benchmarks.sh [DATA_DIR]   (default ../shared/data); writes Resources/Benchmarks/.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data}
TAR=$DATA/lidc/lidc-idri-slices.tar
OUT=Resources/Benchmarks
mkdir -p "$OUT"
arseg eval --model lidc-nodule --data "$TAR" --split test --samples 16 --seed 0 --json "$OUT/test-arseg.json"
arseg eval --model lidc-nodule --data "$TAR" --split test --samples 16 --baseline unet --json "$OUT/test-unet.json"
arseg eval --model lidc-nodule --data "$TAR" --split test --samples 16 --baseline unet-levels \
    --json "$OUT/test-unet-levels.json"
# the Probabilistic U-Net row needs its training run (git-ignored weights; BENCHMARKS.md has the command);
# Resources/Benchmarks/test-prob-unet.json adds the val selection and the training record to this output
if [ -f checkpoints/prob-unet/prob_unet_best.pt ]; then
    arseg eval --baseline prob-unet --checkpoint checkpoints/prob-unet/prob_unet_best.pt --data "$TAR" --split test \
        --samples 16 --seed 0 --temperature 2.0 --json checkpoints/prob-unet/test-rerun.json
fi
python tools/benchmark_figures.py table "$OUT/test-arseg.json" "$OUT/test-unet.json" "$OUT/test-unet-levels.json"
python tools/benchmark_figures.py crops --model lidc-nodule --data "$TAR" --out "$OUT/test-crops.png"
arseg bench --json "$OUT/bench-cpu.json"
