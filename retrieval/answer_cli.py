"""CLI subcommands for grounded answering: ``ask``, ``train-decoder`` and ``eval answer``."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from clipdex.argtypes import int_at_least
from clipdex.retrieval.store import DEFAULT_COLLECTION, DEFAULT_DB

EVAL_SEED = 424242  # the evaluation world: never the decoder's training seed (1) nor the encoder's (0)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``ask`` and ``train-decoder`` to the ``clipdex`` parser."""
    p = sub.add_parser(
        "ask", help="answer a question about an image from the collection, with the evidence",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Retrieve the top-k images (and their captions) for the query image, or for the question "
        "when there is no image, and let a fused vision-language decoder answer from them. With no question "
        "it writes a caption for the image. The evidence is printed with each item's retrieval score and its "
        "weight: the share of the answer's probability mass that came from that item (built-in decoder).",
        epilog="examples:\n"
        "  clipdex ask --image photo.jpg \"when was it built?\" --db clipdex-data/demo-world/db --collection demo\n"
        "  clipdex ask --image photo.jpg                      # a caption, prompted by retrieved captions\n"
        "  clipdex ask \"who built the Varn Gate?\" -k 3 --json\n"
        "  clipdex ask --image photo.jpg \"what is this?\" --backend hf:HuggingFaceTB/SmolVLM-256M-Instruct\n"
        "JSON: {\"question\", \"answer\", \"evidence\": [{\"rank\", \"id\", \"path\", \"caption\", \"score\", "
        "\"weight\"}]}")
    p.add_argument("question", nargs="?", help="the question (omit to caption --image)")
    p.add_argument("--image", help="the query image")
    p.add_argument("--db", default=DEFAULT_DB, help="database folder (default: %(default)s)")
    p.add_argument("--collection", default=DEFAULT_COLLECTION, help="collection (default: %(default)s)")
    p.add_argument("-k", "--top-k", type=int_at_least(0), default=5,
                   help="retrieved items given to the decoder; 0 answers without retrieval (default: %(default)s)")
    p.add_argument("--backend", default="builtin",
                   help="builtin (the fused decoder) or hf:<model id or folder> (pip install 'clipdex[hf]')")
    p.add_argument("--decoder", default=None, help="built-in decoder checkpoint (default: the shipped one)")
    p.add_argument("--beams", type=int_at_least(1), default=1, help="beam width (1: greedy)")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_ask)

    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser(
        "train-decoder", help="train the built-in fused decoder on a built-in world", formatter_class=fmt,
        description="Generate a training world (its own seed), index its corpus with clipdex, retrieve each "
        "query's neighbours through the index (a corpus image never retrieves itself), and train the fused "
        "decoder on landmark fact questions (counterfactual facts, distractor landmarks), visual questions and "
        "captions (context dropout). Held-out accuracy is printed every --eval-every steps; --out is "
        "written then too, and re-running the same command resumes.",
        epilog="the shipped decoder: clipdex train-decoder --out runs/decoder/clipdex-answer.safetensors --ship "
        "(27 min on 2 CPU cores)")
    p.add_argument("--out", required=True, help="decoder checkpoint (.safetensors); <out>.state.pt resumes")
    p.add_argument("--model", default="clipdex-world", help="the dual encoder whose embeddings it reads")
    p.add_argument("--world-dir", default="clipdex-data/decoder-world")
    p.add_argument("--db", default=None, help="database for the training collection (default: WORLD_DIR/db)")
    p.add_argument("--seed", type=int, default=1, help="training world seed")
    p.add_argument("--corpus", type=int_at_least(10), default=3000, help="ordinary corpus scenes")
    p.add_argument("--landmarks", type=int_at_least(2), default=300)
    p.add_argument("--views", type=int_at_least(1), default=3, help="query views per landmark")
    p.add_argument("--steps", type=int_at_least(1), default=2000)
    p.add_argument("--batch-size", type=int_at_least(1), default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int_at_least(1), default=250)
    p.add_argument("--k", type=int_at_least(1), default=5, help="retrieved items per training sequence, at most")
    p.add_argument("--mix", type=_mix, default=(0.45, 0.35, 0.20), metavar="L,V,C",
                   help="shares of landmark-fact, visual-question and caption sequences")
    p.add_argument("--d-model", type=int_at_least(16), default=128)
    p.add_argument("--layers", type=int_at_least(1), default=4)
    p.add_argument("--heads", type=int_at_least(1), default=4)
    p.add_argument("--ship", action="store_true", help="write --out compact (fp16, trained token rows only)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--json", action="store_true", help="print the final record as JSON")
    p.set_defaults(func=_train_decoder)


def register_eval(esub: argparse._SubParsersAction) -> None:
    """Add ``eval answer``."""
    p = esub.add_parser(
        "answer", help="grounded answering: with vs without retrieval, random and oracle evidence",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Generate an evaluation world with a seed the decoder never trained on (its landmark facts "
        "only in its corpus captions), index it with clipdex, and measure the built-in decoder: fact questions "
        "with retrieval, without, with random items and with the right landmark forced in; visual questions "
        "with and without retrieval; captions (BLEU-4, CIDEr); evidence top-1; retriever recall@k. JSON keys: "
        "landmark{rag,no_retrieval,random,oracle}, visual{rag,no_retrieval}, caption{bleu4,cider,"
        "bleu4_no_retrieval,cider_no_retrieval}, evidence_top1, retriever_recall@k.")
    p.add_argument("--decoder", default=None, help="decoder checkpoint (default: the shipped one)")
    p.add_argument("--world-dir", default="clipdex-data/answer-eval-world")
    p.add_argument("--db", default=None, help="default: WORLD_DIR/db")
    p.add_argument("--collection", default="answer-eval")
    p.add_argument("--seed", type=int, default=EVAL_SEED)
    p.add_argument("--corpus", type=int_at_least(10), default=1000)
    p.add_argument("--landmarks", type=int_at_least(1), default=60)
    p.add_argument("--views", type=int_at_least(1), default=2)
    p.add_argument("-k", "--top-k", type=int_at_least(1), default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_eval_answer)


def _mix(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 0 or sum(parts) <= 0:
        raise argparse.ArgumentTypeError(f"expected three non-negative shares like 0.45,0.35,0.2, got {text!r}")
    return parts


def _ask(args) -> int:
    from clipdex.retrieval.answer import Answerer, AskSettings
    from clipdex.retrieval.exceptions import ClipdexError

    if not args.question and not args.image:
        raise ClipdexError("nothing to ask: give a question, --image FILE, or both (see `clipdex ask --help`)")
    settings = AskSettings(db=args.db, collection=args.collection, k=args.top_k, backend=args.backend,
                           decoder=args.decoder, beams=args.beams, max_new_tokens=args.max_new_tokens,
                           device=args.device)
    result = Answerer.open(settings).ask(image=args.image, question=args.question)
    if args.json:
        print(json.dumps(result.as_dict()))
        return 0
    print(f"Q: {result.question or '(caption this image)'}")
    print(f"A: {result.answer}")
    print_evidence(result.evidence)
    return 0


def print_evidence(evidence: list[dict]) -> None:
    """The evidence table: rank, retrieval score, weight, the item and its caption."""
    if not evidence:
        print("(no retrieved evidence)")
        return
    print("evidence (score = cosine similarity to the query; weight = share of the answer drawn from it):")
    for e in evidence:
        w = "   -  " if e["weight"] is None else f"{e['weight']:.3f}"
        print(f"  #{e['rank']}  score {e['score']:.3f}  weight {w}  {e['path'] or e['id']}")
        if e["caption"]:
            print(f"        {e['caption']}")


def _train_decoder(args) -> int:
    from dataclasses import replace

    from clipdex.retrieval.train_decoder import DecoderTrainConfig, WorldSettings, train_decoder

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


def _eval_answer(args) -> int:
    from pathlib import Path

    from clipdex.retrieval.answer_data import prepare_world
    from clipdex.retrieval.answer_eval import evaluate_answers, format_answer_table
    from clipdex.retrieval.decoder_checkpoint import load_decoder
    from clipdex.retrieval.device import resolve_device

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
