"""``clipdex train`` (the dual encoder, contrastive) and ``clipdex train-decoder`` (the answering decoder):
their flags, mapped onto the trainers' config dataclasses, and the final record printed."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from clipdex.commands.argtypes import (
    DEVICE_HELP,
    PRECISION_HELP,
    SPEC_HELP,
    WORKERS_HELP,
    int_at_least,
)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``train`` and ``train-decoder`` to the ``clipdex`` parser."""
    _add_train(sub)
    _add_train_decoder(sub)
    _add_train_matcher(sub)


def _add_train_matcher(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-matcher", help="train the cross-attention matcher that re-ranks search results",
        description="Train a small cross-attention matcher on counterfactual batches of the built-in world "
        "(the same objects in other cells, foil captions, the encoder's hardest wrong caption), reading a "
        "frozen encoder's patch-token grids and caption token states. Search re-ranks its top-K with it "
        "(clipdex search --rerank) when the file sits beside the encoder's weights as "
        "NAME.matcher.safetensors.",
        epilog="example:\n  clipdex train-matcher --model clipdex-world --steps 1500 --pool 100 --out m.safetensors")
    p.add_argument("--model", default="clipdex-world", help="the frozen encoder whose tokens the matcher reads")
    p.add_argument("--out", required=True, metavar="FILE", help="where the matcher is written (safetensors)")
    p.add_argument("--steps", type=int_at_least(1), default=1500, metavar="N", help="optimiser steps")
    p.add_argument("--pool", type=int_at_least(1), default=100, metavar="N",
                   help="counterfactual batches (128 images each) rendered and encoded once, then cycled")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of the batches and the initial weights")
    p.add_argument("--json", action="store_true", help="print the training record as JSON")
    p.set_defaults(func=_train_matcher)


def _train_matcher(args) -> int:
    from pathlib import Path

    from clipdex.retrieval.training.counterfactual import CounterfactualConfig
    from clipdex.retrieval.training.matcher import MatcherTrainConfig, train_matcher

    cfg = MatcherTrainConfig(encoder=args.model, out=Path(args.out), steps=args.steps, pool=args.pool, lr=args.lr,
                             warmup=min(100, max(1, args.steps // 10)), seed=args.seed,
                             batches=CounterfactualConfig(groups=32, variants=4, count_prob=0.15, seed=args.seed))
    rec = train_matcher(cfg, progress=not args.json)
    if args.json:
        print(json.dumps(rec))
    else:
        print(f"wrote {args.out} ({rec['steps']} steps, {rec['images']} images, {rec['seconds']:.0f} s); "
              f"last pair accuracy {rec['final_pair_accuracy']:.3f}, loss {rec['final_loss']:.3f}")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="contrastive training (from scratch or fine-tuning)",
                       description="Train a dual encoder with the CLIP objective on a manifest of image-caption "
                       "pairs; foils in the manifest become hard negatives. Writes model.safetensors, "
                       "model-compact.safetensors, metrics.jsonl and train.json to --out; re-running the same "
                       "command resumes an interrupted run.",
                       epilog="examples:\n  clipdex train --manifest worlds/w/manifest.parquet --out runs/w\n"
                       "  clipdex train --manifest my_pairs.csv --train-split '' --eval-split '' \\\n"
                       "      --model ViT-B-32:laion2b_s34b_b79k --lr 1e-5 --epochs 2 --out runs/ft")
    _add_data_args(p)
    _add_schedule_args(p)
    _add_loss_args(p)
    _add_counterfactual_args(p)
    _add_run_args(p)
    p.set_defaults(func=_train)


def _add_data_args(p: argparse.ArgumentParser) -> None:
    """``clipdex train``: the manifest, the run folder, the starting model and the splits."""
    p.add_argument("--manifest", required=True, metavar="FILE",
                   help="Parquet/CSV/JSONL with path and caption(s) columns")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder (checkpoints, metrics)")
    p.add_argument("--model", default="clipdex-s:random",
                   help="where training starts, a " + SPEC_HELP + "; ARCH:random trains from scratch, any other "
                   "spec fine-tunes")
    p.add_argument("--train-split", default="train", metavar="SPLIT", help="rows used for training ('' for all rows)")
    p.add_argument("--eval-split", default="test", metavar="SPLIT",
                   help="held-out rows evaluated after each epoch ('' for none)")


def _add_schedule_args(p: argparse.ArgumentParser) -> None:
    """``clipdex train``: optimiser, schedule, step limits and the seed."""
    opt = p.add_argument_group("optimisation (AdamW, linear warm-up then cosine decay to 0)")
    opt.add_argument("--epochs", type=int, default=10, metavar="N", help="passes over the training rows")
    opt.add_argument("--batch-size", type=int, default=256, metavar="N",
                     help="image-caption pairs per step (each pair's negatives are the batch's other pairs)")
    opt.add_argument("--lr", type=float, default=5e-4, help="peak learning rate, reached after the warm-up")
    opt.add_argument("--weight-decay", type=float, default=0.1,
                     help="AdamW weight decay on weight matrices (biases, norms, the temperature and "
                     "positional embeddings are not decayed)")
    opt.add_argument("--warmup-steps", type=int, default=200, metavar="N", help="steps of linear warm-up")
    opt.add_argument("--max-steps", type=int, default=None, metavar="N",
                     help="stop after this many steps (default: run every epoch)")
    opt.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                     help="fit the run into this much training time: after 50 timed steps the step count, and so "
                     "the schedule, is set from the measured rate (default: no limit)")
    opt.add_argument("--seed", type=int, default=0, help="seed for initialisation, shuffling and augmentation")


def _add_loss_args(p: argparse.ArgumentParser) -> None:
    """``clipdex train``: the loss terms (hard negatives, the foil term, layout supervision)."""
    loss = p.add_argument_group("loss")
    loss.add_argument("--no-hard-negatives", action="store_true", help="do not use foils as extra negatives")
    loss.add_argument("--foil-weight", type=float, default=1.0,
                      help="weight of the focused caption-vs-foil term (0: foils only as extra negatives)")
    loss.add_argument("--layout-weight", type=float, default=0.0,
                      help="weight of layout supervision (world manifests only): a head shared by both towers must "
                      "read where each shape and colour is, from the image and from the caption's cells and "
                      "relations (0: off)")


def _add_counterfactual_args(p: argparse.ArgumentParser) -> None:
    """``clipdex train``: counterfactual batches of the built-in world, rendered per step."""
    cf = p.add_argument_group("counterfactual batches (the built-in world, rendered per step)")
    cf.add_argument("--counterfactual", action="store_true",
                    help="train on world scenes drawn fresh every step, in groups whose images hold the same "
                    "objects in different places (two objects' cells swapped, objects moved) and whose captions "
                    "say where things are, so only position tells a group apart; --manifest is then only the "
                    "held-out set (--eval-split). Steps: --epochs x --epoch-steps, or --max-steps")
    cf.add_argument("--variants", type=int_at_least(2), default=4, metavar="N",
                    help="layouts per group (--batch-size must be a multiple)")
    cf.add_argument("--epoch-steps", type=int_at_least(1), default=100, metavar="N",
                    help="steps between held-out evaluations and checkpoints")
    cf.add_argument("--curriculum", default="", metavar="STAGES",
                    help="stages of counterfactual batches with their shares of the steps, in order: lone (one "
                    "object moved between cells: position alone tells a group apart), pairs (mostly two objects, "
                    "relations and cell lists), mixed (1-4 objects, relation chains, some count captions), e.g. "
                    "lone:0.2,pairs:0.25,mixed:0.55 (with --layout-weight, what breaks the position saddle from "
                    "scratch; TRAINING.md); needs --max-steps or --epochs, not --time-budget (default: the "
                    "built-in mix throughout)")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """``clipdex train``: evaluation size, device, precision, workers, checkpoints, output."""
    run = p.add_argument_group("run")
    run.add_argument("--eval-gallery", type=int, default=1000, metavar="N",
                     help="images of --eval-split ranked in each held-out evaluation")
    run.add_argument("--device", default="auto", help=DEVICE_HELP)
    run.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help=PRECISION_HELP)
    run.add_argument("--workers", type=int, default=None, metavar="N", help=WORKERS_HELP)
    run.add_argument("--save-every", type=int, default=500, metavar="N",
                     help="steps between resumable checkpoints (one is also written at each epoch's end)")
    run.add_argument("--no-resume", action="store_true", help="start over even if --out holds a checkpoint")
    run.add_argument("--json", action="store_true", help="print the final record as JSON")


def _add_train_decoder(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-decoder", help="train the built-in fused decoder on a built-in world",
        description="Generate a training world (its own seed), index its corpus with clipdex, retrieve each "
        "query's neighbours through the index (a corpus image never retrieves itself), and train the fused "
        "decoder on landmark fact questions (counterfactual facts, distractor landmarks), visual questions and "
        "captions (context dropout). Held-out accuracy is printed every --eval-every steps; --out is "
        "written then too, and re-running the same command resumes.",
        epilog="the shipped decoder: clipdex train-decoder --out runs/decoder/clipdex-answer.safetensors --ship "
        "(27 min on 2 CPU cores)")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="decoder checkpoint (.safetensors); FILE.state.pt beside it lets a rerun resume")
    p.add_argument("--model", default="clipdex-world",
                   help="the dual encoder whose embeddings the decoder reads, a " + SPEC_HELP)
    world = p.add_argument_group("training world (generated only if WORLD_DIR holds none)")
    world.add_argument("--world-dir", default="clipdex-data/decoder-world", help="folder of the training world")
    world.add_argument("--db", default=None, metavar="DIR",
                       help="database for the training collection (default: WORLD_DIR/db)")
    world.add_argument("--seed", type=int, default=1, help="training world seed")
    world.add_argument("--corpus", type=int_at_least(10), default=3000, metavar="N", help="ordinary corpus scenes")
    world.add_argument("--landmarks", type=int_at_least(2), default=300, metavar="N",
                       help="landmarks, a tenth of them held out for evaluation")
    world.add_argument("--views", type=int_at_least(1), default=3, metavar="N", help="query photos per landmark")
    opt = p.add_argument_group("training")
    opt.add_argument("--steps", type=int_at_least(1), default=2000, metavar="N", help="optimizer steps")
    opt.add_argument("--batch-size", type=int_at_least(1), default=32, metavar="N", help="sequences per step")
    opt.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW, warm-up then cosine decay)")
    opt.add_argument("--eval-every", type=int_at_least(1), default=250, metavar="N",
                     help="steps between held-out evaluations (each also writes --out)")
    opt.add_argument("--k", type=int_at_least(1), default=5, help="retrieved items per training sequence, at most")
    opt.add_argument("--mix", type=_mix, default=(0.45, 0.35, 0.20), metavar="L,V,C",
                     help="relative shares of landmark-fact, visual-question and caption sequences")
    shape = p.add_argument_group("decoder shape")
    shape.add_argument("--d-model", type=int_at_least(16), default=128, metavar="N", help="hidden width")
    shape.add_argument("--layers", type=int_at_least(1), default=4, metavar="N", help="transformer blocks")
    shape.add_argument("--heads", type=int_at_least(1), default=4, metavar="N", help="attention heads per block")
    p.add_argument("--ship", action="store_true",
                   help="at the end, rewrite --out compact (fp16, trained token rows only), as the shipped one")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--no-resume", action="store_true", help="start over even if FILE.state.pt exists")
    p.add_argument("--json", action="store_true", help="print the final record as JSON")
    p.set_defaults(func=_train_decoder)


def _mix(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 0 or sum(parts) <= 0:
        raise argparse.ArgumentTypeError(f"expected three non-negative shares like 0.45,0.35,0.2, got {text!r}")
    return parts


def _train(args) -> int:
    from clipdex.retrieval.training.contrastive import TrainConfig, train

    cfg = TrainConfig(
        manifest=args.manifest, out_dir=args.out, model=args.model, train_split=args.train_split or None,
        eval_split=args.eval_split or None, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
        hard_negatives=not args.no_hard_negatives, foil_weight=args.foil_weight,
        layout_weight=args.layout_weight, counterfactual=args.counterfactual, variants=args.variants,
        epoch_steps=args.epoch_steps, curriculum=args.curriculum, eval_gallery=args.eval_gallery, seed=args.seed, device=args.device, precision=args.precision,
        workers=args.workers, save_every=args.save_every, max_steps=args.max_steps, time_budget_s=args.time_budget,
        command="clipdex " + shlex.join(sys.argv[1:]) if sys.argv and "clipdex" in sys.argv[0] else "",
    )
    record = train(cfg, resume=not args.no_resume, progress=not args.json)
    if args.json:
        print(json.dumps(record))
    else:
        print(f"trained {record['steps']} steps in {record['seconds']:.0f} s on {record['device']}; "
              f"checkpoint: {args.out}/model.safetensors")
        if record["final"]:
            from clipdex.retrieval.evaluation.recall import format_table

            print(format_table(record["final"]))
    return 0


def _train_decoder(args) -> int:
    from dataclasses import replace

    from clipdex.retrieval.training.decoder import (
        DecoderTrainConfig,
        WorldSettings,
        train_decoder,
    )

    base = DecoderTrainConfig(out=args.out)
    cfg = replace(base, model=args.model, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                  eval_every=args.eval_every, device=args.device, ship=args.ship,
                  world=WorldSettings(world_dir=args.world_dir, db=args.db, seed=args.seed, corpus=args.corpus,
                                      landmarks=args.landmarks, views=args.views),
                  sampler=replace(base.sampler, k=args.k, mix=args.mix),
                  decoder=replace(base.decoder, d_model=args.d_model, n_layer=args.layers, n_head=args.heads),
                  command="clipdex " + shlex.join(sys.argv[1:]))
    rec = train_decoder(cfg, resume=not args.no_resume, progress=not args.json)
    if args.json:
        print(json.dumps(rec))
    else:
        last = rec["history"][-1] if rec["history"] else {}
        print(f"wrote {args.out} ({rec['parameters']:,} parameters, {rec['steps']} steps, "
              f"{rec['train_seconds']:.0f} s training); last held-out: {json.dumps(last)}")
    return 0
