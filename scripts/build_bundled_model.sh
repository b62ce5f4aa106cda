#!/usr/bin/env bash
# Rebuild everything the package ships for the toy world, on a CPU, from scratch:
#   the pipeline (src/eiup/toy/weights/pipeline), the detector (src/eiup/toy/weights/detector.safetensors),
#   the calibrated auto-scale predictors (inside the pipeline folder), and the committed reports (docs/).
# Each step resumes where an interrupted run stopped. Run from the repository root with .venv set up.
set -euo pipefail
cd "$(dirname "$0")/.."
W=src/eiup/toy/weights
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
.venv/bin/eiup toy train --out runs/toy --vae-minutes 30 --minutes 55 --export-to "$W/pipeline"
.venv/bin/eiup toy train-detector --model "$W/pipeline" --out "$W/detector.safetensors" --scenes 20000 --minutes 9
for c in red star heart night; do
  .venv/bin/eiup calibrate --concept "$c" --gate --seeds 6
done
.venv/bin/eiup toy report --out docs/toy-quality
