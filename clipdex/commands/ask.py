"""``clipdex ask``: a question about an image answered from the collection, printed with its evidence.

``print_evidence`` is the evidence table ``clipdex demo`` prints too."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from clipdex.commands.argtypes import DEVICE_HELP, int_at_least
from clipdex.retrieval.store.record import DEFAULT_COLLECTION, DEFAULT_DB

if TYPE_CHECKING:
    from clipdex.retrieval.answer.backend import Evidence


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``ask`` to the ``clipdex`` parser."""
    p = sub.add_parser(
        "ask", help="answer a question about an image from the collection, with the evidence",
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
    p.add_argument("--image", metavar="FILE", help="the query image (retrieval then starts from it)")
    p.add_argument("--db", default=DEFAULT_DB, metavar="DIR", help="database folder")
    p.add_argument("--collection", default=DEFAULT_COLLECTION, metavar="NAME", help="collection to retrieve from")
    p.add_argument("-k", "--top-k", type=int_at_least(0), default=5, metavar="K",
                   help="retrieved items given to the decoder; 0 answers without retrieval")
    p.add_argument("--backend", default="builtin", metavar="NAME",
                   help="builtin (the fused decoder) or hf:<model id or folder> (pip install 'clipdex[hf]')")
    p.add_argument("--decoder", default=None, metavar="FILE",
                   help="built-in decoder checkpoint (default: the shipped one)")
    p.add_argument("--beams", type=int_at_least(1), default=1, metavar="N", help="beam width (1: greedy decoding)")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=32, metavar="N",
                   help="longest answer, in tokens")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_ask)


def _ask(args) -> int:
    from clipdex.exceptions import ClipdexError
    from clipdex.retrieval.answer.answerer import Answerer, AskSettings

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


def print_evidence(evidence: list[Evidence]) -> None:
    """The evidence table: rank, retrieval score, weight, the item and its caption."""
    if not evidence:
        print("(no retrieved evidence)")
        return
    print("evidence (score = cosine similarity to the query; weight = share of the answer drawn from it):")
    for e in evidence:
        w = "   -  " if e.weight is None else f"{e.weight:.3f}"
        print(f"  #{e.rank}  score {e.score:.3f}  weight {w}  {e.path or e.id}")
        if e.caption:
            print(f"        {e.caption}")
