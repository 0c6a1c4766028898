"""The cross-attention matcher: its trainer's pairs and labels, a short real run, and the re-rank evaluation."""

from __future__ import annotations

import numpy as np
import torch

from clipdex.retrieval.evaluation.rerank import _reranked_rank, evaluate_rerank
from clipdex.retrieval.models.matcher import load_matcher
from clipdex.retrieval.training.counterfactual import CounterfactualBatches, CounterfactualConfig
from clipdex.retrieval.training.matcher import MatcherTrainConfig, batch_pairs, train_matcher


def test_pairs_label_group_mates_and_foils_by_the_claims(shipped_encoder):
    enc = shipped_encoder
    data = CounterfactualBatches(CounterfactualConfig(groups=4, variants=3, seed=2), transform=enc.preprocess,
                                 tokenizer=enc.tokenizer, steps=1)
    b = data[0]
    n = len(b.texts)
    emb = torch.nn.functional.normalize(torch.randn(n, 8), dim=-1)
    p = batch_pairs(b, emb, emb, np.random.default_rng(0))
    from clipdex.data_manifests.world.claims import satisfies

    for i, t, y in zip(p.image.tolist(), p.text.tolist(), p.label.tolist()):
        if t >= n:  # a foil of image i's own caption: never true of it
            assert y == 0.0 and b.foil_owner[t - n] == i
        else:
            assert y == float(satisfies(b.claims[t], b.scenes[i]))
    assert all((i, i, 1.0) in zip(p.image.tolist(), p.text.tolist(), p.label.tolist()) for i in range(n))
    # every group contributes a layout counterfactual: a group-mate's caption that is false of the image
    mates = [(i, t) for i, t, y in zip(p.image.tolist(), p.text.tolist(), p.label.tolist())
             if t < n and t != i and b.group[t] == b.group[i] and y == 0.0]
    assert {b.group[i] for i, _ in mates} == set(b.group)


def test_a_short_matcher_run_saves_a_matcher_of_its_encoder(tmp_path, shipped_encoder, tiny_world):
    from clipdex.data_manifests.pairs import load_pairs

    out = tmp_path / "m.safetensors"
    cfg = MatcherTrainConfig(steps=3, pool=1, warmup=1, out=out, workers=0, width=32, layers=1, heads=2,
                             batches=CounterfactualConfig(groups=4, variants=2, image_size=64))
    record = train_matcher(cfg, progress=False)
    loaded = load_matcher(out)
    assert loaded.encoder_weights == shipped_encoder.info.weights == record["encoder_weights"]
    assert record["steps"] == 3 and record["images"] == 8 and np.isfinite(record["final_loss"])
    result = evaluate_rerank(shipped_encoder, loaded.model, load_pairs(tiny_world, split="test"), gallery=12,
                             k=5, queries=6, workers=0)
    assert result["text_queries"] == 6 and result["gallery"] == 12 and result["k"] == 5
    assert set(result["t2i"]) == {"recall@1", "recall@5", "recall@10"}
    assert 0.0 <= result["foil"]["all"] <= 1.0 and result["foil"]["count"] > 0
    assert sum(v["all"]["count"] for v in result["foil"]["by_kind"].values()) == result["foil"]["count"]


def test_reranked_rank_reorders_only_the_top_k():
    order = np.array([3, 1, 0, 2, 4])  # the dual encoder's order
    relevant = np.zeros(5, bool)
    relevant[0] = True  # item 0 is third by cosine
    assert _reranked_rank(order, np.array([0.1, 0.2, 0.9]), relevant) == 1  # the matcher lifts it to the top
    assert _reranked_rank(order, np.array([0.9, 0.2, 0.9]), relevant) == 2  # a tie counts against the model
    relevant[:] = False
    relevant[4] = True  # outside the top 3: keeps its dual-encoder rank
    assert _reranked_rank(order, np.array([0.1, 0.2, 0.9]), relevant) == 5
