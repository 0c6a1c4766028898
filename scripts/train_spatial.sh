#!/usr/bin/env bash
# Train a dual encoder that reads position, from scratch, on counterfactual batches of the built-in world
# (TRAINING.md, "Breaking the position saddle"): a curriculum of lone objects moved between cells, then pairs,
# then the full mix, with layout supervision (--layout-weight) from the first step. Sized for 2 CPU cores
# (clipdex-xs, about an hour for 1,500 steps); on a GPU raise MODEL/STEPS/BATCH.
#   scripts/train_spatial.sh [RUN_DIR] [EVAL_WORLD_DIR]
# Environment: MODEL (clipdex-xs:random), STEPS (1500), BATCH (256), LR (1e-3), LAYOUT (3),
# CURRICULUM (lone:0.15,pairs:0.2,mixed:0.65), WORKERS (rendering processes, 1), CLIPDEX (the command).
set -euo pipefail
RUN=${1:-runs/clipdex-spatial}
EVAL=${2:-worlds/eval-world}
CLIPDEX=${CLIPDEX:-clipdex}
W=${WORKERS:-1}

if [ ! -f "$EVAL/manifest.parquet" ]; then  # held out: a world seed the counterfactual stream never draws
  $CLIPDEX world generate --out "$EVAL" --seed 5 --train 0 --test 10000 --corpus 0 --landmarks 0 --workers "$W" --json
fi
$CLIPDEX train --manifest "$EVAL/manifest.parquet" --eval-split test --out "$RUN" --model "${MODEL:-clipdex-xs:random}" \
  --counterfactual --curriculum "${CURRICULUM:-lone:0.15,pairs:0.2,mixed:0.65}" --layout-weight "${LAYOUT:-3}" \
  --batch-size "${BATCH:-256}" --variants 4 --lr "${LR:-1e-3}" --warmup-steps 100 --max-steps "${STEPS:-1500}" \
  --epoch-steps 300 --eval-gallery 1000 --workers "$W" --json > "$RUN.train.json"
for g in 1000 10000; do
  $CLIPDEX eval retrieval --model "$RUN/model-compact.safetensors" --manifest "$EVAL/manifest.parquet" \
    --split test --gallery "$g" --rerank 0 --json | tee "$RUN.eval-$g.json"
done
$CLIPDEX eval spatial --model "$RUN/model-compact.safetensors" --json | tee "$RUN.spatial.json"
