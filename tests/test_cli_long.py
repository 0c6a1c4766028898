"""The CLI's two longest runs, in a file of their own so that pytest-xdist (a file to a worker) can run them
beside the rest of tests/test_cli.py: the demo end to end, and fine-tuning a real open_clip architecture."""

import csv
import json

import pytest
import torch

from conftest import run_cli, run_cli_subprocess


@pytest.mark.slow
def test_demo_runs_on_the_embedded_default(tmp_path):
    out = json.loads(run_cli_subprocess("demo", "--dir", str(tmp_path / "w"), "--gallery", "100", "--json").stdout)
    assert out["recall"]["t2i"]["recall@5"] >= 0.95
    directions = [e["direction"] for e in out["examples"]]
    assert directions.count("text->image") == 3 and "image->image" in directions and "image->text" in directions
    t2i = [e for e in out["examples"] if e["direction"] == "text->image"]
    assert sum(e["results"][0]["hit"] for e in t2i) >= 2  # held-out captions find their own image first
    assert (tmp_path / "w" / "manifest.parquet").exists()
    assert out["index"]["counts"]["images_in_collection"] == 104  # 100 corpus scenes + 4 landmarks, indexed
    sp = out["spatial"]  # twin scenes that only position tells apart, each caption false of its twin
    assert sp["queries"] == 80 and 0 <= sp["dual_top1"] <= 80
    assert (sp["rerank_top1"] is None) == (not sp["rerank"]["used"])
    if sp["example"]:
        assert [r["hit"] for r in sp["example"]["reranked"]][0] and not sp["example"]["dual"][0]["hit"]
    assert [a["question"] for a in out["ask"]] == ["when was it built?", "who built it?"]
    for a in out["ask"]:  # grounded: the item the answer rests on is the landmark whose caption states the fact
        assert a["answer"] and len(a["evidence"]) == 5
        top = max(a["evidence"], key=lambda e: e["weight"])
        assert a["expected"] in top["caption"], a
    again = json.loads(run_cli("demo", "--dir", str(tmp_path / "w"), "--gallery", "100", "--json").stdout)
    assert again["index"]["counts"]["indexed"] == 0 and again["recall"] == out["recall"]  # re-uses the collection


@pytest.mark.slow
def test_finetune_real_open_clip_architecture_from_local_file(tiny_world, tmp_path):
    """ARCH:/path fine-tuning of a real open_clip architecture on a user's CSV of image-caption pairs.

    No weights can be downloaded here, so the 'pretrained' file is a randomly initialised ViT-S-32 saved
    in open_clip's state-dict format, as a downloaded checkpoint would be.
    """
    import open_clip

    from clipdex.data_manifests.pairs import load_pairs
    from clipdex.retrieval.models import checkpoint as ckpt

    torch.manual_seed(0)
    start = tmp_path / "open_clip_pytorch_model.pt"
    torch.save(open_clip.create_model("ViT-S-32").state_dict(), start)
    pairs = load_pairs(tiny_world, split="train").head(8)
    manifest = tmp_path / "pairs.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption"])
        for p, caps in zip(pairs.paths, pairs.captions):
            w.writerow([str(p), caps[0]])
    run_cli("train", "--manifest", str(manifest), "--model", f"ViT-S-32:{start}", "--train-split", "",
            "--eval-split", "", "--batch-size", "4", "--max-steps", "2", "--warmup-steps", "1", "--lr", "1e-5",
            "--workers", "0", "--out", str(tmp_path / "ft"))
    tuned = tmp_path / "ft" / "model.safetensors"
    meta = ckpt.read_meta(tuned)
    assert meta.arch == "ViT-S-32" and meta.records["training"]["steps"] == 2
    before = torch.load(start, weights_only=True)["visual.proj"]
    after = ckpt.load_state_dict(tuned)["visual.proj"]
    assert not torch.equal(before, after), "fine-tuning changed nothing"
