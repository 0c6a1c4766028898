"""``clipdex eval retrieval|oracle|spatial|answer``: a model's or a collection's recall (and the text-only foil
baseline), the attribute oracle's recall, the spatial probe, and grounded answering, each printed as a table or
JSON."""

from __future__ import annotations

import argparse
import json

from clipdex.commands.argtypes import (
    DEVICE_HELP,
    SPEC_HELP,
    WORKERS_HELP,
    int_at_least,
)
from clipdex.retrieval.models.registry import DEFAULT_MODEL

EVAL_SEED = 424242  # the evaluation world: never the decoder's training seed (1) nor the encoder's (0)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``eval`` (``retrieval``, ``oracle``, ``spatial``, ``answer``) to the ``clipdex`` parser."""
    p = sub.add_parser("eval", help="evaluate retrieval (a model, a collection, the oracle) or grounded answering",
                       description="Measure recall@1/5/10 both ways and foil accuracy on a manifest split (a model, "
                       "an indexed collection, or the attribute oracle), or the built-in decoder's grounded "
                       "answering on a world it never trained on.")
    esub = p.add_subparsers(dest="eval_command", metavar="WHAT", required=True)
    _add_eval_retrieval(esub)
    o = esub.add_parser("oracle", help="the attribute oracle's recall (the ceiling the world allows)",
                        description="Rank by the generator's own attributes: each caption's claims are checked "
                        "against each scene. Same gallery, same pessimistic ties and same JSON as eval retrieval.")
    _eval_args(o)
    o.set_defaults(func=_eval_oracle)
    _add_eval_spatial(esub)
    _add_eval_answer(esub)


def _add_eval_retrieval(esub: argparse._SubParsersAction) -> None:
    r = esub.add_parser("retrieval", help="a model's held-out recall and foil accuracy",
                        description="Embed the first --gallery images of --split and all their captions; report "
                        "recall@1/5/10 text->image and image->text (ties count against the model) and foil "
                        "accuracy. JSON keys: model, gallery, t2i, i2t, foil (and rerank with a matcher, "
                        "foil_text_only with --text-baseline).",
                        epilog="example:\n  clipdex eval retrieval --model clipdex-world \\\n"
                        "      --manifest worlds/demo/manifest.parquet --split test --gallery 1000 --json")
    r.add_argument("--model", default=None,
                   help=f"the encoder, a {SPEC_HELP} (default: {DEFAULT_MODEL}, or with --db the collection's)")
    r.add_argument("--db", default=None, metavar="DIR",
                   help="evaluate an indexed collection instead, from the vectors it stored (default: embed now)")
    r.add_argument("--collection", default="default", metavar="NAME", help="with --db: the collection")
    _eval_args(r)
    r.add_argument("--matcher", default=None, metavar="FILE",
                   help="also measure re-ranking with this matcher (default: the one beside the model's weights, "
                   "if any); adds a 'rerank' section")
    r.add_argument("--rerank", type=int_at_least(0), default=50, metavar="K",
                   help="with a matcher: re-rank each query's top K (0: do not measure re-ranking)")
    r.add_argument("--rerank-queries", type=int_at_least(1), default=2000, metavar="N",
                   help="text queries re-ranked (the first N captions; each costs K matcher passes)")
    r.add_argument("--text-baseline", action="store_true",
                   help="also score each foil with no image, by a trigram model of the training world's captions "
                   "(the foils are only a fair test if it stays near 0.5); adds 'foil_text_only'")
    r.add_argument("--text-baseline-scenes", type=int_at_least(1), default=20000, metavar="N",
                   help="with --text-baseline: training scenes (world seed 0) whose captions it learns "
                   "(about 1-3 ms each)")
    r.add_argument("--device", default="auto", help=DEVICE_HELP)
    r.add_argument("--workers", type=int, default=None, metavar="N", help=WORKERS_HELP)
    r.set_defaults(func=_eval_retrieval)


def _add_eval_spatial(esub: argparse._SubParsersAction) -> None:
    # the defaults are SpatialProbeConfig's (tests/test_eval_probes.py checks), written out so that building
    # the parser does not import torch
    p = esub.add_parser(
        "spatial", help="the spatial probe: recall@1 among scenes that differ only in where things are",
        description="Draw groups of scenes that differ only in position (lone: one object in each of the nine "
        "cells; swap: two objects and their twin with the cells swapped; moved: 2-4 objects in other cells), "
        "render them as the world does and query each image's group with each variant's caption. Recall@1 "
        "within the group (chance 1/variants; ties count against the model; a caption also true of another "
        "variant is right on either, and one true of every variant is excluded), text->image and image->text. "
        "JSON keys: model, seed, probes, image_size, kinds{lone,swap,moved}, rerank (with a matcher), seconds.",
        epilog="example:\n  clipdex eval spatial --model clipdex-world --probes 200 --json")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"the encoder, a {SPEC_HELP}")
    p.add_argument("--probes", type=int_at_least(1), default=200, metavar="N", help="groups per kind")
    p.add_argument("--seed", type=int, default=5,
                   help="seed of the probe's scenes; keep it apart from the encoder's training seed (0)")
    p.add_argument("--kinds", default="lone,swap,moved", metavar="LIST", help="comma-separated probe kinds")
    p.add_argument("--matcher", default=None, metavar="FILE",
                   help="also score with this matcher (default: the one beside the model's weights, if any); "
                   "adds a 'rerank' section")
    p.add_argument("--no-matcher", action="store_true", help="do not score with a matcher even if there is one")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_eval_spatial)


def _add_eval_answer(esub: argparse._SubParsersAction) -> None:
    p = esub.add_parser(
        "answer", help="grounded answering: with vs without retrieval, random and oracle evidence",
        description="Generate an evaluation world with a seed the decoder never trained on (its landmark facts "
        "only in its corpus captions), index it with clipdex, and measure the built-in decoder: fact questions "
        "with retrieval, without, with random items and with the right landmark forced in; visual questions "
        "with and without retrieval; captions (BLEU-4, CIDEr); evidence top-1; retriever recall@k. JSON keys: "
        "landmark{rag,no_retrieval,random,oracle}, visual{rag,no_retrieval}, caption{bleu4,cider,"
        "bleu4_no_retrieval,cider_no_retrieval}, evidence_top1, retriever_recall@k.")
    p.add_argument("--decoder", default=None, metavar="FILE", help="decoder checkpoint (default: the shipped one)")
    world = p.add_argument_group("evaluation world (generated only if WORLD_DIR holds none)")
    world.add_argument("--world-dir", default="clipdex-data/answer-eval-world", help="folder of the evaluation world")
    world.add_argument("--db", default=None, metavar="DIR", help="database for its collection (default: WORLD_DIR/db)")
    world.add_argument("--collection", default="answer-eval", metavar="NAME", help="collection of its corpus")
    world.add_argument("--seed", type=int, default=EVAL_SEED,
                       help="world seed; keep it apart from the decoder's training seed (1)")
    world.add_argument("--corpus", type=int_at_least(10), default=1000, metavar="N", help="ordinary corpus scenes")
    world.add_argument("--landmarks", type=int_at_least(1), default=60, metavar="N",
                       help="landmarks, whose facts the questions ask")
    world.add_argument("--views", type=int_at_least(1), default=2, metavar="N",
                       help="query photos per landmark (one set of questions each)")
    p.add_argument("-k", "--top-k", type=int_at_least(1), default=5, metavar="K",
                   help="retrieved items given to the decoder per question")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_eval_answer)


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True, metavar="FILE",
                   help="Parquet/CSV/JSONL with path and caption(s) columns (a world's manifest.parquet)")
    p.add_argument("--split", default="test", help="the manifest split evaluated")
    p.add_argument("--gallery", type=int, default=1000, metavar="N",
                   help="gallery size: the first N images of the split and all their captions")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _eval_retrieval(args) -> int:
    from clipdex.data_manifests.pairs import load_pairs
    from clipdex.retrieval.evaluation.recall import evaluate_retrieval, format_table
    from clipdex.retrieval.models.encoder import load_encoder
    from clipdex.retrieval.models.spec import parse_model_spec

    if args.model:
        parse_model_spec(args.model)  # a mistyped spec fails first, before any file is read
    pairs = load_pairs(args.manifest, split=args.split or None)
    if args.db:
        from clipdex.retrieval.evaluation.collection import evaluate_collection
        from clipdex.retrieval.store.record import Database

        result = evaluate_collection(Database(args.db).open(args.collection), pairs, gallery=args.gallery,
                                     model=args.model, device=args.device)
    else:
        enc = load_encoder(args.model or DEFAULT_MODEL, device=args.device)
        result = evaluate_retrieval(enc, pairs, gallery=args.gallery, workers=args.workers)
        matcher = _matcher_for(enc, args.matcher) if args.rerank else None
        if matcher is not None:
            from clipdex.retrieval.evaluation.rerank import evaluate_rerank

            result["rerank"] = evaluate_rerank(enc, matcher, pairs, gallery=args.gallery, k=args.rerank,
                                               queries=args.rerank_queries, workers=args.workers)
    if args.text_baseline:
        from clipdex.retrieval.evaluation.text_baseline import TextBaselineConfig, evaluate_text_baseline

        result["foil_text_only"] = evaluate_text_baseline(
            pairs, gallery=args.gallery, config=TextBaselineConfig(scenes=args.text_baseline_scenes))
    print(json.dumps(result) if args.json else format_table(result))
    return 0


def _matcher_for(encoder, path: str | None):
    """The matcher to measure: ``path``, else the one beside the encoder's weights; None when there is none."""
    from clipdex.retrieval.store.rerank import find_matcher, load_matcher_for

    found = path or find_matcher(encoder)
    return load_matcher_for(encoder, found).model if found else None


def _eval_spatial(args) -> int:
    from clipdex.exceptions import ClipdexError
    from clipdex.retrieval.evaluation.spatial_probe import SpatialProbeConfig, evaluate_spatial, format_spatial_table
    from clipdex.retrieval.models.encoder import load_encoder
    from clipdex.retrieval.models.spec import parse_model_spec

    parse_model_spec(args.model)  # a mistyped spec fails first, before any weights are read
    try:
        config = SpatialProbeConfig(probes=args.probes, seed=args.seed,
                                    kinds=tuple(k.strip() for k in args.kinds.split(",") if k.strip()))
    except ValueError as e:
        raise ClipdexError(f"--kinds {args.kinds!r}: {e}") from e
    enc = load_encoder(args.model, device=args.device)
    matcher = None if args.no_matcher else _matcher_for(enc, args.matcher)
    name = args.matcher or ("beside the model" if matcher is not None else None)
    result = evaluate_spatial(enc, config=config, matcher=matcher, matcher_name=name)
    print(json.dumps(result) if args.json else format_spatial_table(result))
    return 0


def _eval_oracle(args) -> int:
    from clipdex.data_manifests.pairs import read_table
    from clipdex.data_manifests.world.oracle import oracle_recall
    from clipdex.retrieval.evaluation.recall import format_table

    result = oracle_recall(read_table(args.manifest), split=args.split, gallery=args.gallery)
    print(json.dumps(result) if args.json else format_table(result))
    return 0


def _eval_answer(args) -> int:
    from pathlib import Path

    from clipdex.retrieval.answer.checkpoint import load_decoder
    from clipdex.retrieval.evaluation.answer_world import prepare_world
    from clipdex.retrieval.evaluation.answers import (
        evaluate_answers,
        format_answer_table,
    )
    from clipdex.retrieval.models.device import resolve_device

    device = resolve_device(args.device)
    model, meta = load_decoder(args.decoder, device=device)
    data = prepare_world(world_dir=args.world_dir, db=args.db or str(Path(args.world_dir) / "db"),
                         collection=args.collection, model=meta["encoder"]["spec"], seed=args.seed,
                         corpus=args.corpus, landmarks=args.landmarks, views=args.views, top_n=max(10, args.top_k),
                         progress=not args.json)
    result = evaluate_answers(model, data, k=args.top_k, device=device)
    result["decoder"] = args.decoder or "shipped"
    if args.json:
        print(json.dumps(result))
    else:
        print(format_answer_table(result))
    return 0
