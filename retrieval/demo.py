"""``clipdex demo``: the main job on the embedded default, end to end, in about a minute on 2 cores.

Generates a small built-in world (held-out scenes the model never saw) if it is not there yet, measures
the model's recall on it, and shows example searches in each direction with their cosine scores.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from clipdex.data_manifests.pairs import load_pairs
from clipdex.retrieval.encoder import load_encoder
from clipdex.retrieval.evaluate import embed_gallery, format_table, score_gallery

DEMO_SEED = 20261124  # not the seed the default was trained on: every demo scene is new to the model


def ensure_world(world_dir: Path, *, gallery: int) -> Path:
    """Generate the demo world (test split only) unless it already exists; returns its manifest."""
    from clipdex.data_manifests.world.generate import WorldConfig, generate_world

    manifest = world_dir / "manifest.parquet"
    if not manifest.exists():
        cfg = WorldConfig(seed=DEMO_SEED, train=0, test=gallery, corpus=0, landmarks=0, views_per_landmark=0)
        generate_world(cfg, out_dir=world_dir, progress=True)
    return manifest


def _top(scores: np.ndarray, k: int, *, skip: int | None = None) -> list[int]:
    order = np.argsort(-scores, kind="stable")
    return [int(i) for i in order if i != skip][:k]


def run_demo(*, world_dir: str | Path, model: str, gallery: int = 1000, as_json: bool = False, k: int = 3) -> int:
    """Run the demo and print what it finds; returns the exit code."""
    t0 = time.time()
    manifest = ensure_world(Path(world_dir), gallery=gallery)
    pairs = load_pairs(manifest, split="test").head(gallery)
    encoder = load_encoder(model)
    emb = embed_gallery(encoder, pairs, gallery=gallery)  # embedded once: scored, then searched
    result = score_gallery(emb)
    img, txt, texts, owner = emb.img, emb.txt, emb.texts, emb.owner
    examples = []
    for qi in (0, 1, 2):  # text -> image: a held-out caption; the right image is the one it describes
        q = pairs.captions[qi][0]
        s = encoder.encode_texts([q])[0] @ img.T
        examples.append({"direction": "text->image", "query": q, "expected": str(pairs.paths[qi]),
                         "results": [{"path": str(pairs.paths[j]), "score": float(s[j]), "hit": j == qi}
                                     for j in _top(s, k)]})
    qi = 3  # image -> image: nearest other images
    s = img[qi] @ img.T
    examples.append({"direction": "image->image", "query": str(pairs.paths[qi]),
                     "results": [{"path": str(pairs.paths[j]), "score": float(s[j]), "caption": pairs.captions[j][0]}
                                 for j in _top(s, k, skip=qi)]})
    qi = 4  # image -> text: captions from the whole gallery
    s = img[qi] @ txt.T
    examples.append({"direction": "image->text", "query": str(pairs.paths[qi]),
                     "results": [{"caption": texts[j], "score": float(s[j]), "hit": bool(owner[j] == qi)}
                                 for j in _top(s, k)]})
    summary = {"model": model, "world": str(manifest), "recall": result, "examples": examples,
               "seconds": round(time.time() - t0, 1)}
    if as_json:
        print(json.dumps(summary))
        return 0
    print(f"clipdex demo: model {model} on {len(pairs)} held-out scenes of the built-in world ({manifest})\n")
    for ex in examples:
        print(f"[{ex['direction']}] {ex['query']}")
        for r in ex["results"]:
            mark = {True: "  <- right", False: ""}.get(r.get("hit"), "")
            print(f"   {r['score']:.3f}  {r.get('path') or r.get('caption')}{mark}")
            if ex["direction"] == "image->image":
                print(f"          {r['caption']}")
        print()
    print(format_table(result))
    print(f"\n({summary['seconds']:.0f} s)")
    return 0
