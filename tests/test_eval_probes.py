"""Issue 14's evaluation probes: the text-only foil baseline (a trigram model of the training captions, no image)
and the spatial probe (recall@1 among scenes that differ only in where things are), library and CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from clipdex.data_manifests.world.scene import Background, Scene, SceneObject
from conftest import run_cli


@pytest.fixture(scope="module")
def lm():
    """A trigram model of 150 training scenes' captions (world seed 0): small, so it fits in about a second."""
    from clipdex.retrieval.evaluation.text_baseline import TextBaselineConfig, fit_training_lm

    return fit_training_lm(config=TextBaselineConfig(scenes=150))


def _pairs_of(scenes, *, seed: int):
    """In-memory Pairs of ``scenes`` captioned as the world's make_row captions them (no images written)."""
    from pathlib import Path

    from clipdex.data_manifests.pairs import Pairs
    from clipdex.data_manifests.world.captions import make_captions
    from clipdex.data_manifests.world.generate import claims_json

    caps = [make_captions(s, np.random.default_rng([seed, i]), n=5) for i, s in enumerate(scenes)]
    return Pairs(manifest=Path("in-memory"), ids=[f"test/{i:06d}" for i in range(len(scenes))],
                 paths=[Path(f"{i}.png") for i in range(len(scenes))], captions=[[c.text for c in cs] for cs in caps],
                 foils=[[{"caption_index": ci, "kind": k, "text": t, "claims": claims_json(cl)}
                         for ci, c in enumerate(cs) for k, t, cl in c.foils] for cs in caps],
                 groups=[], objects=[s.to_attributes()["objects"] for s in scenes],
                 caption_claims=[[claims_json(c.claims) for c in cs] for cs in caps])


def _held_out_scenes(n: int, *, seed: int = 7):
    from clipdex.data_manifests.world.scene import sample_layout

    return [sample_layout(np.random.default_rng([seed, i]), n_objects=2 + i % 3) for i in range(n)]


# ---- the text-only baseline ---------------------------------------------------------------------------


def test_the_trigram_model_is_a_distribution_and_prefers_a_seen_word_order(lm):
    from clipdex.retrieval.evaluation.text_baseline import tokenize

    assert lm.sentences == 750 and "circle" in lm.vocab and "," in lm.vocab
    for context in (("a", "red"), ("<s>", "<s>"), ("never", "seen"), ("left", "of")):
        total = sum(lm.prob(*context, w) for w in lm.vocab)
        assert abs(total - 1.0) < 1e-3, (context, total)  # the unseen-word slot holds only the floor's share
    pairs = _pairs_of(_held_out_scenes(20), seed=11)
    rng = np.random.default_rng(0)
    for caps in pairs.captions:
        text = caps[0]
        words = tokenize(text)
        scrambled = " ".join(words[int(i)] for i in rng.permutation(len(words)))
        assert scrambled != " ".join(words)
        assert lm.logprob(text)[0] > lm.logprob(scrambled)[0] + 5.0, (text, scrambled)
    assert lm.logprob("a red circle")[1] == 4  # three words and the end marker


def test_text_only_foils_have_eval_retrievals_by_kind_shape(lm):
    from clipdex.retrieval.evaluation.recall import foil_accuracy_by_kind, foil_kind
    from clipdex.retrieval.evaluation.text_baseline import text_only_foils

    pairs = _pairs_of(_held_out_scenes(24), seed=12)
    kinds = [foil_kind(pairs, i, f) for i, fs in enumerate(pairs.foils) for f in fs]
    reference = foil_accuracy_by_kind(kinds, [True] * len(kinds))
    result = text_only_foils(lm, pairs, gallery=20)  # the first 20 images only, as eval retrieval's gallery
    first = [foil_kind(pairs, i, f) for i, fs in enumerate(pairs.foils[:20]) for f in fs]
    assert result["foils"] == len(first) < len(kinds)
    expect = foil_accuracy_by_kind(first, [True] * len(first))
    for table in ("by_kind", "total", "per_token"):
        got = result[table]
        assert {k: {p: c["count"] for p, c in parts.items()} for k, parts in got.items()} == \
            {k: {p: c["count"] for p, c in parts.items()} for k, parts in expect.items()}
        assert all(0.0 <= c["accuracy"] <= 1.0 for parts in got.values() for c in parts.values())
    assert {"spatial", "attribute"} <= set(reference) and set(result["scorer"]) == set(expect)
    for kind, parts in result["by_kind"].items():  # each cell is the better scorer's
        for part, cell in parts.items():
            assert cell["accuracy"] == max(result["total"][kind][part]["accuracy"],
                                           result["per_token"][kind][part]["accuracy"])


def test_a_foil_that_breaks_the_word_order_is_caught_without_the_image(lm):
    from clipdex.retrieval.evaluation.text_baseline import text_only_foils, tokenize

    pairs = _pairs_of(_held_out_scenes(6), seed=13)
    rng = np.random.default_rng(1)
    pairs.foils = [[{"caption_index": ci, "kind": "attribute",
                     "text": " ".join(np.array(tokenize(c), dtype=object)[rng.permutation(len(tokenize(c)))])}
                    for ci, c in enumerate(caps)] for caps in pairs.captions]
    result = text_only_foils(lm, pairs)
    assert result["by_kind"]["attribute"]["all"] == {"accuracy": 1.0, "count": 30}
    pairs.foils = [[{"caption_index": ci, "kind": "attribute", "text": c} for ci, c in enumerate(caps)]
                   for caps in pairs.captions]  # a foil identical to its caption: a tie, a coin flip
    result = text_only_foils(lm, pairs)
    assert result["by_kind"]["attribute"]["all"]["accuracy"] == 0.5 and result["ties"]["total"] == 30


@pytest.fixture
def cli_encoder(shipped_encoder, monkeypatch):
    """The CLI's ``load_encoder`` handing out the session's clipdex-world (loaded once); records the specs asked."""
    import clipdex.retrieval.models.encoder as encoder

    asked = []
    monkeypatch.setattr(encoder, "load_encoder", lambda spec, **kw: asked.append(spec) or shipped_encoder)
    return asked


def test_eval_retrieval_text_baseline_adds_foil_text_only(tmp_path, cli_encoder):
    from clipdex.cli import build_parser
    from clipdex.data_manifests.world.generate import WorldConfig, generate_world
    from clipdex.retrieval.evaluation.recall import format_table

    generate_world(WorldConfig(seed=3, train=0, test=4, corpus=0, landmarks=0, views_per_landmark=0, image_size=64,
                               workers=0), out_dir=tmp_path / "w", progress=False)
    args = ["eval", "retrieval", "--manifest", str(tmp_path / "w" / "manifest.parquet"), "--gallery", "3",
            "--device", "cpu", "--rerank", "0"]
    result = json.loads(run_cli(*args, "--text-baseline", "--text-baseline-scenes", "40", "--json").stdout)
    assert cli_encoder == ["clipdex-world"]
    blind, seen = result["foil_text_only"], result["foil"]["by_kind"]
    assert blind["lm"]["scenes"] == 40 and blind["lm"]["captions"] == 200 and blind["lm"]["seed"] == 0
    assert seen and {k: {p: c["count"] for p, c in v.items()} for k, v in blind["by_kind"].items()} == \
        {k: {p: c["count"] for p, c in v.items()} for k, v in seen.items()}
    assert {"t2i", "i2t", "foil", "foil_count"} <= set(result)  # the existing keys stay
    table = format_table(result)
    assert "text-only" in table and "trigram" in table
    kind, part = next((k, p) for k, v in blind["by_kind"].items() for p in v)
    row = next(line for line in table.splitlines() if line.startswith(f"  {kind:<10}{part:<12}"))
    assert row.split()[-3] == f"{blind['by_kind'][kind][part]['accuracy']:.3f}"  # model, text-only, (N pairs)
    assert "text-only" not in format_table({**result, "foil_text_only": None})
    assert build_parser().parse_args(args).text_baseline is False  # off unless asked


# ---- the spatial probe --------------------------------------------------------------------------------


def _obj(shape, colour, row, col):
    return SceneObject(shape=shape, colour=colour, size="large", fill="solid", row=row, col=col)


def _claim(shape, colour, cell=None):
    return {"type": "object", "shape": shape, "colour": colour, "size": "large", "fill": "solid", "cell": cell}


def test_a_caption_true_of_two_variants_is_right_on_either():
    from clipdex.retrieval.evaluation.spatial_probe import query_outcomes, summarise, truth_matrix

    bg = Background(kind="plain", colour="gray")
    v0 = Scene(bg, (_obj("circle", "red", 0, 0), _obj("star", "blue", 0, 2)))
    v1 = Scene(bg, (_obj("circle", "red", 1, 0), _obj("star", "blue", 1, 1)))  # still left of the star
    v2 = Scene(bg, (_obj("circle", "red", 0, 2), _obj("star", "blue", 0, 0)))  # v0 with the cells swapped
    back = {"type": "background", "kind": "plain", "colour": "gray"}
    claims = [
        [_claim("circle", "red"), _claim("star", "blue"), {"type": "relation", "rel": "left_of", "a": 0, "b": 1}, back],
        [_claim("circle", "red", [1, 0]), _claim("star", "blue", [1, 1]), back],
        [_claim("star", "blue"), _claim("circle", "red"), {"type": "relation", "rel": "left_of", "a": 0, "b": 1}, back],
    ]
    truth = truth_matrix(claims=claims, scenes=[v0, v1, v2])
    assert truth.tolist() == [[True, True, False], [False, True, False], [False, False, True]]

    def first(scores):
        return query_outcomes(scores=np.array([scores, [0, 1, 0], [0, 0, 1]], float), truth=truth)[0]

    assert first([0.9, 0.1, 0.2]).status == "hit" and not first([0.9, 0.1, 0.2]).accepted  # its own variant
    assert first([0.1, 0.9, 0.2]).status == "hit" and first([0.1, 0.9, 0.2]).accepted  # the other true one
    assert first([0.1, 0.2, 0.9]).status == "miss"  # the swapped twin, which it is false of
    assert first([0.5, 0.9, 0.9]).status == "miss"  # a tie with a false variant counts against the model
    summary = summarise(query_outcomes(scores=np.array([[0.1, 0.9, 0.2], [0, 1, 0], [0, 0, 1]], float), truth=truth))
    assert summary == {"recall@1": 1.0, "queries": 3, "excluded": 0, "also_true": 1, "accepted": 1,
                       "chance_adjusted": round((2 / 3 + 1 / 3 + 1 / 3) / 3, 4)}
    # image -> text: image v1 has two true captions (0 and 1); either ranked first is right
    i2t = query_outcomes(scores=np.array([[1, 0, 0], [0.9, 0.1, 0.2], [0, 0, 1]], float), truth=truth.T)
    assert i2t[1].status == "hit" and i2t[1].accepted and i2t[1].also_true
    everywhere = [[_claim("circle", "red"), _claim("star", "blue"), back]] * 3  # true of all three: tests nothing
    outs = query_outcomes(scores=np.eye(3), truth=truth_matrix(claims=everywhere, scenes=[v0, v1, v2]))
    assert [o.status for o in outs] == ["excluded"] * 3 and summarise(outs)["recall@1"] is None


def test_probe_groups_differ_only_in_layout_and_are_seeded_by_their_index():
    from clipdex.retrieval.evaluation.spatial_probe import SpatialProbeConfig, build_group

    cfg = SpatialProbeConfig(probes=1)
    lone = build_group("lone", 0, config=cfg)
    assert sorted((s.objects[0].row, s.objects[0].col) for s in lone.scenes) == [(r, c) for r in range(3) for c in range(3)]
    assert len({replace(s.objects[0], row=0, col=0, x=0, y=0, radius=0, rotation=0) for s in lone.scenes}) == 1
    assert lone.forms == ["list"] * 9 and lone.images[0].size == (128, 128)
    swap = build_group("swap", 3, config=cfg)
    (a0, b0), (a1, b1) = (s.objects for s in swap.scenes)
    assert (a0.row, a0.col, b0.row, b0.col) == (b1.row, b1.col, a1.row, a1.col)
    moved = build_group("moved", 1, config=cfg)
    assert len(moved.scenes) == 4 and len({s.signature() for s in moved.scenes}) == 4
    assert 2 <= len(moved.scenes[0].objects) <= 4
    again = build_group("swap", 3, config=SpatialProbeConfig(probes=50))
    assert again.texts == swap.texts and build_group("swap", 4, config=cfg).texts != swap.texts
    with pytest.raises(ValueError, match="unknown kind"):
        SpatialProbeConfig(kinds=("lone", "diagonal"))


def _random_matcher(enc, *, seed: int = 0):
    from clipdex.retrieval.models.matcher import Matcher, MatcherConfig

    text_dim = enc.text_states(["a"])[0].shape[-1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Matcher(MatcherConfig(image_dim=256, text_dim=text_dim, cells=16, width=32, layers=1, heads=2))


def test_the_spatial_probe_counts_queries_and_chance_per_kind(shipped_encoder):
    from clipdex.retrieval.evaluation.spatial_probe import SpatialProbeConfig, evaluate_spatial, format_spatial_table

    result = evaluate_spatial(shipped_encoder, config=SpatialProbeConfig(probes=1),
                              matcher=_random_matcher(shipped_encoder), matcher_name="random")
    assert result["model"] == "clipdex-world" and result["seed"] == 5
    for section in (result["kinds"], result["rerank"]["kinds"]):
        assert list(section) == ["lone", "swap", "moved"]
        for kind, variants in (("lone", 9), ("swap", 2), ("moved", 4)):
            k = section[kind]
            assert (k["groups"], k["variants"], k["chance"]) == (1, variants, round(1 / variants, 4))
            assert k["queries"] + k["excluded"] == variants == k["i2t"]["queries"] + k["i2t"]["excluded"]
            for r in (k["recall@1"], k["i2t"]["recall@1"]):
                assert r is None or 0.0 <= r <= 1.0
            assert k["chance_adjusted"] is None or k["chance_adjusted"] >= k["chance"]
            assert sum(f["queries"] for f in k["by_form"].values()) == k["queries"]
        assert section["lone"]["excluded"] == 0 and section["lone"]["also_true"] == 0  # a cell said is one cell
    assert result["rerank"]["matcher"] == "random"
    table = format_spatial_table(result)
    assert "with the matcher's scores (random)" in table and table.count("  lone ") == 2


def test_group_scores_pair_each_caption_with_each_image_of_its_group(shipped_encoder):
    from clipdex.retrieval.evaluation.spatial_probe import SpatialProbeConfig, build_group, score_groups
    from clipdex.retrieval.models.matcher import match_scores

    enc, matcher = shipped_encoder, _random_matcher(shipped_encoder).eval()
    cfg = SpatialProbeConfig(probes=1)
    groups = [build_group("swap", 0, config=cfg), build_group("moved", 0, config=SpatialProbeConfig(moved_variants=3))]
    scored = score_groups(enc, groups, matcher=matcher)
    g, s = groups[1], scored[1]  # the second group: its rows sit after the first group's in the batch
    assert s.group is g and s.cosine.shape == s.matcher.shape == (3, 3)
    pixels = torch.stack([enc.preprocess(im) for im in g.images])
    emb, grids = enc.encode_image_grid_tensors(pixels)
    for c in (0, 2):
        np.testing.assert_allclose(s.cosine[c], enc.encode_texts([g.texts[c]])[0] @ emb.numpy().T, atol=2e-3)
        states, mask = enc.text_states([g.texts[c]])
        np.testing.assert_allclose(torch.sigmoid(torch.from_numpy(s.matcher[c])).numpy(),
                                   match_scores(matcher, states, mask, grids,
                                                torch.from_numpy(s.cosine[c].astype(np.float32))).numpy(), atol=2e-3)
    assert np.ptp(s.matcher) > 1e-4  # a random matcher still tells the pairs apart, so the check above bites
    assert score_groups(enc, groups[:1])[0].matcher is None


def test_eval_spatial_cli_help_json_and_defaults(cli_encoder, shipped_encoder, tmp_path):
    from clipdex.cli import build_parser
    from clipdex.retrieval.evaluation.spatial_probe import SpatialProbeConfig
    from clipdex.retrieval.models.matcher import save_matcher

    out = run_cli("eval", "spatial", "--help").stdout
    assert out.startswith("usage: clipdex eval spatial") and "--probes N" in out and "--no-matcher" in out
    args = build_parser().parse_args(["eval", "spatial"])
    cfg = SpatialProbeConfig()
    assert (args.probes, args.seed, tuple(args.kinds.split(","))) == (cfg.probes, cfg.seed, cfg.kinds)
    assert (args.matcher, args.no_matcher) == (None, False)
    path = tmp_path / "m.matcher.safetensors"
    save_matcher(_random_matcher(shipped_encoder), path, encoder_weights=shipped_encoder.info.weights)
    result = json.loads(run_cli("eval", "spatial", "--probes", "1", "--kinds", "swap,lone", "--device", "cpu",
                                "--matcher", str(path), "--json").stdout)
    assert cli_encoder == ["clipdex-world"]
    assert list(result["kinds"]) == ["swap", "lone"] and result["probes"] == 1
    assert result["kinds"]["lone"]["queries"] == 9 and result["kinds"]["swap"]["groups"] == 1
    assert result["rerank"]["matcher"] == str(path) and list(result["rerank"]["kinds"]) == ["swap", "lone"]
    bad = run_cli("eval", "spatial", "--kinds", "lone,diagonal", "--device", "cpu", check=False)
    assert bad.returncode == 1 and "diagonal" in bad.stderr and cli_encoder == ["clipdex-world"]
