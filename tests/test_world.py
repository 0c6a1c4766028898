"""The built-in world: determinism, caption/claim agreement, foils, oracle recall, landmarks, splits,
schema validation, rendering and the CLI."""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from clipdex.commands import world as world_cli
from clipdex.data_manifests.schema import WORLD_SCHEMA, read_manifest, write_manifest
from clipdex.data_manifests.world.claims import satisfies, score
from clipdex.data_manifests.world.generate import WorldConfig, generate_world
from clipdex.data_manifests.world.oracle import oracle_recall
from clipdex.data_manifests.world.render import render_scene
from clipdex.data_manifests.world.scene import (
    Background,
    LandmarkFacts,
    Scene,
    SceneObject,
)
from clipdex.exceptions import ManifestError
from conftest import run_cli

SMALL = dict(train=60, test=300, corpus=40, landmarks=5, views_per_landmark=2)
TINY = dict(train=12, test=12, corpus=8, landmarks=2, views_per_landmark=2, image_size=64)


@pytest.fixture(scope="module")
def small_world(tmp_path_factory) -> Path:
    """A world with a 300-image test split (for the oracle); returns its folder."""
    out = tmp_path_factory.mktemp("small_world")
    generate_world(WorldConfig(seed=11, workers=2, **SMALL), out_dir=out, progress=False)
    return out


@pytest.fixture(scope="module")
def rows(small_world) -> list[dict]:
    return read_manifest(small_world / "manifest.parquet").to_pylist()


def _digest_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "world.json"}


# ---- determinism ------------------------------------------------------------------------------------

def test_same_seed_is_byte_identical_whatever_the_workers(tmp_path):
    a = generate_world(WorldConfig(seed=5, workers=2, **TINY), out_dir=tmp_path / "a", progress=False)
    b = generate_world(WorldConfig(seed=5, workers=1, **TINY), out_dir=tmp_path / "b", progress=False)
    da, db = _digest_tree(tmp_path / "a"), _digest_tree(tmp_path / "b")
    assert a["images"] == b["images"] == 12 + 12 + 10 + 4
    assert len(da) == a["images"] + 1  # every image plus the manifest
    assert da == db


def test_different_seed_differs(tmp_path):
    generate_world(WorldConfig(seed=5, workers=1, **TINY), out_dir=tmp_path / "a", progress=False)
    generate_world(WorldConfig(seed=6, workers=1, **TINY), out_dir=tmp_path / "b", progress=False)
    da, db = _digest_tree(tmp_path / "a"), _digest_tree(tmp_path / "b")
    assert da["manifest.parquet"] != db["manifest.parquet"]
    shared = set(da) & set(db)
    assert sum(da[k] == db[k] for k in shared) == 0
    names = lambda d: {r["landmark"]["name"] for r in read_manifest(d / "manifest.parquet").to_pylist()  # noqa: E731
                       if r["landmark"]}
    assert names(tmp_path / "a").isdisjoint(names(tmp_path / "b"))


# ---- captions, claims, foils ------------------------------------------------------------------------

_RELATION_TOKENS = {"left", "right", "above", "over", "below", "under", "beneath", "larger", "bigger", "smaller"}


def test_every_caption_fits_its_scene_and_every_foil_does_not(rows):
    n_foils = Counter()
    for r in rows:
        n_obj = len(r["attributes"]["objects"])
        assert len(r["captions"]) == len(set(r["captions"])) == len(r["caption_claims"]) == 5
        forms = []
        for text, cj in zip(r["captions"], r["caption_claims"], strict=True):
            claims = json.loads(cj)
            assert satisfies(claims, r), (r["id"], text)
            assert sum(c["type"] == "object" for c in claims) == n_obj  # complete: every object said
            assert any(c["type"] == "background" for c in claims)
            forms.append(any(c["type"] == "relation" for c in claims))
        if n_obj >= 2:
            assert sum(forms) >= 2, r["captions"]
        for f in r["foils"]:
            n_foils[f["kind"]] += 1
            assert not satisfies(json.loads(f["claims"]), r), (r["id"], f["text"])
            assert f["text"] != r["captions"][f["caption_index"]]
            if f["kind"] == "relation":  # one relation said the other way round; every other word in place
                cap = r["captions"][f["caption_index"]].split()
                foil = f["text"].split()
                assert [w for w in foil if w not in _RELATION_TOKENS] == [w for w in cap if w not in _RELATION_TOKENS]
                assert len(foil) == len(cap) and 0 < sum(a != b for a, b in zip(foil, cap)) <= 1
    assert n_foils["relation"] > 200 and n_foils["attribute"] > 400


def test_relation_caption_has_a_relation_foil(rows):
    for r in rows:
        for i, cj in enumerate(r["caption_claims"]):
            if any(c["type"] == "relation" for c in json.loads(cj)):
                kinds = {f["kind"] for f in r["foils"] if f["caption_index"] == i}
                assert "relation" in kinds, r["captions"][i]


def test_satisfies_and_score_by_hand():
    circle = SceneObject("circle", "red", "large", "striped", 0, 0)
    star = SceneObject("star", "blue", "small", "solid", 1, 1)
    scene = Scene(Background("checkered", "gray"), (circle, star))
    obj = lambda shape, colour, size, fill, cell=None: {  # noqa: E731
        "type": "object", "shape": shape, "colour": colour, "size": size, "fill": fill, "cell": cell}
    bg = {"type": "background", "kind": "checkered", "colour": "gray"}
    c, s = obj("circle", "red", "large", "striped", [0, 0]), obj("star", "blue", "small", "solid")
    assert satisfies([s, c, bg], scene)  # claim order does not matter (assignment)
    assert satisfies([c, s, {"type": "relation", "rel": "left_of", "a": 0, "b": 1}, bg], scene)
    assert not satisfies([c, s, {"type": "relation", "rel": "left_of", "a": 1, "b": 0}, bg], scene)
    size_rel = [obj("circle", "red", None, "striped"), obj("star", "blue", None, "solid"),
                {"type": "relation", "rel": "larger_than", "a": 0, "b": 1}, bg]
    assert satisfies(size_rel, scene)
    assert not satisfies([c, bg], scene)  # the star is not mentioned: captions are complete
    assert score([c, bg], scene) == pytest.approx(2 / 3)
    wrong = [obj("circle", "blue", "large", "striped"), obj("star", "red", "small", "solid"), bg]
    assert score(wrong, scene) == pytest.approx(1 / 3)
    assert not satisfies([c, s, {"type": "count", "n": 3}, bg], scene)
    lm = {"type": "landmark", "landmark_id": 0, "name": "the X Gate", "year": 1500, "city": "Y", "builder": "Z"}
    assert not satisfies([c, s, bg, lm], scene)
    facts = LandmarkFacts(0, "the X Gate", 1500, "Y", "Z")
    assert satisfies([c, s, bg, lm], Scene(scene.background, scene.objects, facts))


def test_questions_agree_with_attributes(rows):
    words = ["zero", "one", "two", "three", "four"]
    kinds = Counter()
    for r in rows:
        objs = r["attributes"]["objects"]
        for q in r["questions"]:
            kinds[q["kind"]] += 1
            if q["kind"] == "count":
                assert q["answer"] == words[len(objs)]
            elif q["kind"] == "colour":
                shape = q["question"].removeprefix("what colour is the ").removesuffix("?")
                assert [o["colour"] for o in objs if o["shape"] == shape] == [q["answer"]]
            elif q["kind"] == "relation":
                colour, shape = q["answer"].split()
                assert any(o["colour"] == colour and o["shape"] == shape for o in objs)
    assert kinds["relation"] > 50 and kinds["colour"] > 200 and kinds["landmark_name"] == 10


def test_oracle_recall_is_high(small_world):
    table = read_manifest(small_world / "manifest.parquet")
    result = oracle_recall(table, split="test", gallery=300)
    assert result["model"] == "oracle" and result["gallery"] == 300
    assert result["queries"] == {"t2i": 1500, "i2t": 300}
    assert result["t2i"]["recall@1"] >= 0.95 and result["i2t"]["recall@1"] >= 0.95
    assert result["t2i"]["recall@10"] >= result["t2i"]["recall@1"]
    assert result["foil"] == {"attribute": 1.0, "relation": 1.0}


def test_oracle_fast_path_matches_plain_scoring(rows):
    from clipdex.data_manifests.world.claims import as_scene
    from clipdex.data_manifests.world.oracle import score_matrix
    from clipdex.metrics import pessimistic_ranks

    gallery = [r for r in rows if r["split"] in ("test", "corpus")][:120]
    scenes = [as_scene(r) for r in gallery]
    claims = [json.loads(c) for r in gallery for c in r["caption_claims"]]
    owner = np.repeat(np.arange(len(gallery)), 5)
    fast = score_matrix(claims, scenes)  # (C, N)
    plain = np.array([[score(c, s) for s in scenes] for c in claims])
    assert ((fast >= 1.0) == (plain >= 1.0)).all() and (fast <= 1.0).all()
    relevant = owner[:, None] == np.arange(len(gallery))[None, :]
    assert (pessimistic_ranks(fast, relevant) == pessimistic_ranks(plain, relevant)).all()
    assert (pessimistic_ranks(fast.T, relevant.T) == pessimistic_ranks(plain.T, relevant.T)).all()


# ---- landmarks and splits ---------------------------------------------------------------------------

def test_landmark_facts_only_in_landmark_captions_and_query_answers(rows):
    landmarks = {r["landmark"]["landmark_id"]: r["landmark"] for r in rows if r["landmark"]}
    assert len(landmarks) == 5
    for r in rows:
        lm = r["landmark"]
        for facts in landmarks.values():
            proper = facts["name"].removeprefix("the ")  # "The Varn Gate" starts a sentence
            strings = [proper, facts["city"], facts["builder"], str(facts["year"])]
            mine = lm is not None and lm["landmark_id"] == facts["landmark_id"]
            in_captions = [any(s in c for c in r["captions"]) for s in strings]
            answers = {q["answer"] for q in r["questions"]}
            if mine and r["split"] == "corpus":
                assert all(all(s in c for s in strings) for c in r["captions"])
            else:
                assert not any(in_captions), (r["id"], facts["name"])
            answers = {a.removeprefix("the ") for a in answers}
            if mine and r["split"] == "query":
                assert set(strings) <= answers
            else:
                assert not set(strings) & answers
    query = [r for r in rows if r["split"] == "query"]
    assert len(query) == 10 and all(r["landmark"] for r in query)
    corpus_lm = {r["landmark"]["landmark_id"]: r for r in rows if r["split"] == "corpus" and r["landmark"]}
    for q in query:  # same objects in the same cells as the landmark's corpus image
        key = lambda row: sorted((o["shape"], o["colour"], o["size"], o["fill"], o["row"], o["col"])  # noqa: E731
                                 for o in row["attributes"]["objects"])
        assert key(q) == key(corpus_lm[q["landmark"]["landmark_id"]])
        assert 3 <= len(q["attributes"]["objects"]) <= 4


def test_splits_are_disjoint_and_files_match_the_manifest(small_world, rows):
    assert Counter(r["split"] for r in rows) == {"train": 60, "test": 300, "corpus": 45, "query": 10}
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    sig = {}
    for r in rows:
        a = r["attributes"]
        key = (a["background"]["kind"], a["background"]["colour"],
               tuple(sorted((o["shape"], o["colour"], o["size"], o["fill"], o["row"], o["col"])
                            for o in a["objects"])))
        if r["split"] != "query":
            assert key not in sig, f"{r['id']} repeats {sig.get(key)}"
            sig[key] = r["id"]
        path = small_world / r["path"]
        assert path.is_file() and r["path"].startswith(f"images/{r['split']}/album-")
        head = path.read_bytes()[:4]
        assert head.startswith(b"\x89PNG") if r["path"].endswith(".png") else head.startswith(b"\xff\xd8")
    png = sum(r["path"].endswith(".png") for r in rows) / len(rows)
    assert 0.05 < png < 0.3
    summary = json.loads((small_world / "world.json").read_text())
    assert summary["summary"]["images"] == len(rows) and summary["config"]["seed"] == 11


# ---- schema -----------------------------------------------------------------------------------------

def test_manifest_schema_and_missing_column(small_world, tmp_path):
    table = read_manifest(small_world / "manifest.parquet")
    assert table.schema.equals(WORLD_SCHEMA, check_metadata=False)
    broken = write_manifest(table.drop_columns(["caption_claims"]), tmp_path / "broken.parquet")
    with pytest.raises(ManifestError, match=r"broken\.parquet.*caption_claims"):
        read_manifest(broken)
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "nope.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(ManifestError, match="junk.parquet"):
        read_manifest(tmp_path / "junk.parquet")
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write leaves no temporary file


def test_config_validation():
    with pytest.raises(ValueError, match="train"):
        WorldConfig(train=-1)
    with pytest.raises(ValueError, match="image_size"):
        WorldConfig(image_size=8)


# ---- rendering --------------------------------------------------------------------------------------

def _one(fill: str, size: str = "large") -> np.ndarray:
    obj = SceneObject("square", "red", size, fill, 1, 1, x=0.5, y=0.5, radius=0.14 if size == "large" else 0.085)
    img = render_scene(Scene(Background("plain", "gray"), (obj,)), size=128, rng=np.random.default_rng(0))
    return np.asarray(img, dtype=np.float32)


def test_fills_and_sizes_are_visibly_different():
    red = lambda px: px[0] > 170 and px[1] < 90 and px[2] < 90  # noqa: E731
    gray = lambda px: all(abs(v - 118) < 30 for v in px)  # noqa: E731
    solid, outline, striped = _one("solid"), _one("outline"), _one("striped")
    assert red(solid[64, 64]) and gray(solid[4, 4])
    assert gray(outline[64, 64]) and red(outline[64, 64 - 12])  # hollow centre, coloured border
    row = striped[64, 52:77]  # across the object: coloured stripes with light gaps
    assert sum(red(px) for px in row) > 5 and sum(px.min() > 180 for px in row) > 3
    is_red = lambda a: (a[..., 0] > 150) & (a[..., 1] < 100)  # noqa: E731
    assert is_red(_one("solid")).sum() > 2.0 * is_red(_one("solid", "small")).sum()


# ---- CLI --------------------------------------------------------------------------------------------

def test_cli_register_in_process(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="clipdex")
    world_cli.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "w"
    args = parser.parse_args(["world", "generate", "--out", str(out), "--train", "4", "--test", "3",
                              "--corpus", "2", "--landmarks", "1", "--views", "1", "--size", "64",
                              "--workers", "1", "--json"])
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["counts"] == {"train": 4, "test": 3, "corpus": 3, "query": 1}
    from clipdex.exceptions import ClipdexError
    with pytest.raises(ClipdexError, match="not empty"):
        args.func(args)


def test_cli_end_to_end_subprocess(tmp_path):
    out = tmp_path / "w"
    cmd = [sys.executable, "-m", "clipdex", "world", "generate", "--out", str(out), "--train", "5", "--test",
           "5", "--corpus", "3", "--landmarks", "1", "--views", "2", "--size", "64", "--workers", "2"]
    proc = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["images"] == 5 + 5 + 4 + 2 and Path(summary["manifest"]).is_file()
    assert pq.read_table(summary["manifest"]).num_rows == summary["images"]
    # the rest in process (one real run is enough): main's return code is the process's exit status
    again = run_cli(*cmd[3:], check=False)
    assert again.returncode == 1 and "--overwrite" in again.stderr.strip().splitlines()[-1]
    before = Path(summary["manifest"]).read_bytes()
    ok = run_cli(*cmd[3:], "--overwrite", "--seed", "1", "--no-progress")
    assert ok.returncode == 0 and "world written to" in ok.stdout
    assert Path(summary["manifest"]).read_bytes() != before  # another seed, written over the old world
