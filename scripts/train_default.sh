#!/usr/bin/env bash
# Reproduce the embedded default (clipdex-world): generate the training world, train clipdex-s on it
# from scratch, and evaluate the compact export at 1,000- and 10,000-image held-out galleries.
#   scripts/train_default.sh [RUN_DIR] [WORLD_DIR]
# Environment: TRAIN, TEST (world sizes), EPOCHS, BATCH, BUDGET (seconds of training; unset = no cap),
# WORKERS, CLIPDEX (the command, default "clipdex"), TWINS (share of twin scenes, 0.5), LAYOUT (weight of
# layout supervision, --layout-weight; unset = off, as the shipped checkpoint was trained).
set -euo pipefail
RUN=${1:-runs/clipdex-world}
WORLD=${2:-worlds/train-world}
CLIPDEX=${CLIPDEX:-clipdex}
TRAIN=${TRAIN:-100000}
TEST=${TEST:-10000}
EPOCHS=${EPOCHS:-40}
BATCH=${BATCH:-512}
W=${WORKERS:+--workers $WORKERS}

if [ ! -f "$WORLD/manifest.parquet" ]; then
  $CLIPDEX world generate --out "$WORLD" --seed 0 --train "$TRAIN" --test "$TEST" --corpus 0 --landmarks 0 --views 0 --twins "${TWINS:-0.5}" ${WORKERS:+--workers $WORKERS} --json
fi
$CLIPDEX train --manifest "$WORLD/manifest.parquet" --out "$RUN" --model clipdex-s:random --seed 0 \
  --epochs "$EPOCHS" --batch-size "$BATCH" --lr 1e-3 --warmup-steps 500 --eval-gallery 1000 \
  ${BUDGET:+--time-budget $BUDGET} ${LAYOUT:+--layout-weight $LAYOUT} $W --json > "$RUN.train.json"
for g in 1000 "$TEST"; do
  $CLIPDEX eval retrieval --model "$RUN/model-compact.safetensors" --manifest "$WORLD/manifest.parquet" \
    --split test --gallery "$g" $W --json | tee "$RUN.eval-$g.json"
done
