"""Grounded answering: prompt building, decoding, a tiny decoder trained here, the CLI contract, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clipdex.retrieval.answer.decoder import IGNORE, DecoderConfig, FusedDecoder
from clipdex.retrieval.answer.generate import beam_search, greedy
from clipdex.retrieval.answer.prompt import (
    Prompt,
    add_answer,
    collate,
    decode_ids,
    encode_prompt,
    encode_text,
    normalise,
    restore_case,
)
from clipdex.retrieval.training.decoder_data import random_facts, swap_facts
from conftest import run_cli

TINY = DecoderConfig(d_model=32, n_layer=1, n_head=2, image_tokens=2, dropout=0.0, max_len=200)
CAPTION = ("The Varn Gate in Oskel, built in 1742 by Mira Talon: a large red circle in the top left and a small "
           "blue star in the center, on a gray plain background")


def test_answers_are_compared_and_shown_as_written():
    assert normalise("The Varn Gate") == normalise("the varn gate") == "the varn gate"
    assert decode_ids(encode_text("built in 1742, by Mira")) == "built in 1742, by mira"
    assert restore_case("1742", [CAPTION]) == "1742"
    assert restore_case("mira talon", ["no", CAPTION]) == "Mira Talon"
    assert restore_case("red circle", [CAPTION]) == "red circle"
    assert restore_case("varn", ["The Varnish"]) == "varn"  # whole words only


def test_counterfactual_swap_changes_every_fact_in_caption():
    old = {"name": "the Varn Gate", "year": "1742", "city": "Oskel", "builder": "Mira Talon"}
    new = random_facts(np.random.default_rng(0))
    out = swap_facts(CAPTION, old, new)
    assert all(v not in out for v in old.values()) and new["year"] in out and new["builder"] in out
    assert out.startswith(new["name"][:1].upper() + new["name"][1:])


def test_sequence_layout_marks_items_and_targets():
    vec = np.ones(TINY.embed_dim, np.float32)
    seq = encode_prompt(Prompt("who built it?", vec, [(vec, CAPTION), (None, "a blue star")]), TINY)
    full = add_answer(seq, encode_text("Mira Talon"), teacher_forcing=True)
    b = collate([full, seq], TINY)
    assert b.tokens.shape[0] == 2 and int(b.lengths[1]) == len(seq.tokens)
    assert set(b.items[0].tolist()) == {0, 1, 2}
    assert int((b.image_slot[0] >= 0).sum()) == 2 * TINY.image_tokens  # query image and item 1's image
    assert torch.allclose(b.item_sim[0][b.items[0] == 1], torch.tensor(1.0))  # same direction as the query
    assert not b.item_sim[0][b.items[0] != 1].any()  # item 2 has no image; non-item tokens carry none
    targets = b.targets[0][b.targets[0] != IGNORE].tolist()
    assert targets == encode_text("Mira Talon") + [49407]
    # only question and caption tokens may be copied, never image slots or the answer
    assert not b.copyable[0][b.image_slot[0] >= 0].any() and not b.copyable[0][len(seq.tokens):].any()


def test_copy_head_can_put_all_mass_on_context_and_weights_follow_it():
    torch.manual_seed(0)
    model = FusedDecoder(TINY)
    vec = np.zeros(TINY.embed_dim, np.float32)
    seq = encode_prompt(Prompt("who built it?", vec, [(vec, "a red circle"), (vec, CAPTION)]), TINY)
    with torch.no_grad():
        model.gate.bias.fill_(-30.0)  # everything from the copy distribution
    d = greedy(model, [seq], max_new_tokens=3)[0]
    context = set(seq.tokens)
    assert d.ids and all(t in context for t in d.ids)
    # all output mass is copy mass, on the items' or the question's tokens: the items get their share of it,
    # the long caption more than the three-word one
    assert len(d.weights) == 2 and 0.5 < sum(d.weights) <= 1.0001 and d.weights[1] > d.weights[0]
    beam = beam_search(model, seq, beams=3, max_new_tokens=3)
    assert beam.logp >= d.logp - 1e-4 or len(beam.ids) != len(d.ids)


@pytest.fixture(scope="module")
def trained(tiny_decoder):
    """The session's tiny decoder (tests/conftest.py: trained by ``clipdex train-decoder``)."""
    return tiny_decoder


@pytest.fixture(scope="module")
def evaluated(trained):
    """``clipdex eval answer`` of the tiny decoder on a world of another seed (made and indexed by the command,
    in ``root/eval-world``, which the ask tests use too); returns its JSON."""
    root = trained["root"]
    proc = run_cli("eval", "answer", "--decoder", str(trained["decoder"]), "--world-dir", str(root / "eval-world"),
                   "--seed", "6", "--corpus", "40", "--landmarks", "16", "--views", "1", "-k", "3", "--json")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_tiny_decoder_answers_unseen_landmarks_from_retrieval(trained, evaluated):
    assert trained["record"]["steps"] == 200 and trained["decoder"].exists()
    r = evaluated
    assert set(r) >= {"landmark", "visual", "caption", "evidence_top1", "retriever_recall@k"}
    assert set(r["landmark"]) >= {"rag", "no_retrieval", "random", "oracle"}
    assert set(r["caption"]) >= {"bleu4", "cider", "bleu4_no_retrieval", "cider_no_retrieval"}
    # facts of another seed's landmarks are only in the retrieved captions: without them nothing is right
    assert r["landmark"]["no_retrieval"] <= 0.05
    assert r["landmark"]["rag"] >= r["landmark"]["no_retrieval"] + 0.15, r
    assert r["landmark"]["oracle"] >= r["landmark"]["random"] + 0.15, r


@pytest.mark.slow
def test_ask_json_contract_and_caption(trained, evaluated, capsys):
    root = trained["root"]
    db, world = root / "eval-world" / "db", root / "eval-world"
    view = sorted((world / "images" / "query").rglob("IMG_*"))[0]
    # in process (main(argv)): what a real process adds, start-up and signals, is tested by test_help and the
    # SIGKILL tests; an ask subprocess costs 8 s of imports and shows nothing more
    proc = run_cli("ask", "--image", str(view), "when was it built?", "--db", str(db), "--collection",
                   "answer-eval", "--decoder", str(trained["decoder"]), "-k", "3", "--json")
    r = json.loads(proc.stdout)
    assert list(r) == ["question", "answer", "evidence"] and r["question"] == "when was it built?"
    assert isinstance(r["answer"], str) and len(r["evidence"]) == 3
    for rank, e in enumerate(r["evidence"], 1):
        assert list(e) == ["rank", "id", "path", "caption", "score", "weight"] and e["rank"] == rank
        assert e["caption"] and 0.0 <= e["weight"] <= 1.0 and -1.0 <= e["score"] <= 1.0
    assert [e["score"] for e in r["evidence"]] == sorted((e["score"] for e in r["evidence"]), reverse=True)
    from clipdex.cli import (
        main,  # the caption in process: one subprocess per test is enough
    )

    capsys.readouterr()
    assert main(["ask", "--image", str(view), "--db", str(db), "--collection", "answer-eval", "--decoder",
                 str(trained["decoder"]), "--beams", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Q: (caption this image)\nA: ") and "evidence" in out


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing-image", "nothing", "unknown-collection", "other-encoder", "not-decoder"])
def test_ask_bad_input_is_one_clear_error(case, trained, evaluated, tmp_path, capsys):
    from clipdex.cli import (
        main,  # in process: the CLI's main(argv), as the subprocess runs it
    )

    root = trained["root"]
    db = root / "eval-world" / "db"
    base = ["--db", str(db), "--collection", "answer-eval", "--decoder", str(trained["decoder"])]
    if case == "missing-image":
        args, says = ["ask", "--image", str(tmp_path / "nope.jpg"), "what?", *base], "nope.jpg"
    elif case == "nothing":
        args, says = ["ask", *base], "give a question"
    elif case == "unknown-collection":
        args, says = ["ask", "what?", "--db", str(db), "--collection", "nosuch"], "nosuch"
    elif case == "other-encoder":
        world = root / "eval-world" / "manifest.parquet"
        assert main(["index", str(world), "--split", "corpus", "--db", str(tmp_path / "db"), "--collection", "other",
                     "--model", "clipdex-tiny:random", "--workers", "0", "--json"]) == 0
        args = ["ask", "what?", "--db", str(tmp_path / "db"), "--collection", "other", "--decoder",
                str(trained["decoder"])]
        says = "clipdex-tiny:random"
    else:
        bad = tmp_path / "enc.safetensors"
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2)}, str(bad))
        args, says = ["ask", "what?", "--db", str(db), "--collection", "answer-eval", "--decoder", str(bad)], \
            "not a clipdex decoder"
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("clipdex: error:") and says in err[-1], err
    assert not any("Traceback" in line for line in err)
