"""Each tower can carry position at all: fresh towers learn word order and left/right within a few hundred
CPU steps, and the counterfactual batches are what the trainer needs (groups that differ only in layout)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipdex.data_manifests.world import vocab
from clipdex.data_manifests.world.claims import satisfies
from clipdex.data_manifests.world.render import render_scene
from clipdex.data_manifests.world.scene import Background, Scene, SceneObject, place
from clipdex.retrieval.models.encoder import build_model, encode_text_trimmed
from clipdex.retrieval.training.counterfactual import (
    CounterfactualBatches,
    CounterfactualConfig,
    CurriculumBatches,
    layout_variants,
    parse_curriculum,
)

RELATION = {"left of": True, "to the left of": True, "right of": False, "to the right of": False}


def _order_captions(rng: np.random.Generator, n: int) -> tuple[list[str], torch.Tensor]:
    """"a red circle left of a blue star" and the like; label: the lower-indexed shape is on the left. The
    same words make both labels, so a bag of words is at chance."""
    shapes, colours, rels = list(vocab.SHAPES), list(vocab.COLOURS), list(RELATION)
    caps, labels = [], []
    for _ in range(n):
        a, b = rng.choice(len(shapes), 2, replace=False)
        ca, cb = rng.choice(colours, 2)
        rel = rels[int(rng.integers(len(rels)))]
        caps.append(f"a {ca} {shapes[a]} {rel} a {cb} {shapes[b]}")
        labels.append(float(RELATION[rel] == (a < b)))
    return caps, torch.tensor(labels)


def _probe(encode, make_batch, *, steps: int, params, lr: float) -> float:
    """Train ``encode`` + a linear read-out of its normalised output; held-out accuracy at the end."""
    torch.manual_seed(0)
    held_x, held_y = make_batch(np.random.default_rng(99), 256)
    head = None
    rng = np.random.default_rng(0)
    for _ in range(steps):
        x, y = make_batch(rng, 64)
        e = F.normalize(encode(x), dim=-1)
        if head is None:
            head = torch.nn.Linear(e.shape[1], 1)
            opt = torch.optim.AdamW(list(params) + list(head.parameters()), lr=lr, weight_decay=0.0)
        loss = F.binary_cross_entropy_with_logits(head(10 * e).squeeze(-1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = head(10 * F.normalize(encode(held_x), dim=-1)).squeeze(-1) > 0
    return float((pred.float() == held_y).float().mean())


def test_a_fresh_text_tower_learns_word_order():
    """'A left of B' vs 'B left of A' (and right of): the tower reads order within 160 steps of 64 captions."""
    loaded = build_model("clipdex-tiny:random", seed=0)
    model = loaded.model.train()
    text_params = [p for n, p in model.named_parameters() if not n.startswith("visual")]
    acc = _probe(lambda caps: encode_text_trimmed(model, loaded.tokenizer(caps)), _order_captions, steps=160,
                 params=text_params, lr=1e-3)
    assert acc >= 0.9, acc


def _twin_images(preprocess):
    """Two-object scenes and their twins (the two objects' cells swapped); label: circle left of star."""
    def make(rng: np.random.Generator, n: int):
        xs, ys = [], []
        for _ in range(n // 2):
            c1, c2 = rng.choice(9, size=2, replace=False)
            while c1 % 3 == c2 % 3:  # different columns, so left/right is defined
                c1, c2 = rng.choice(9, size=2, replace=False)
            colours = list(vocab.COLOURS)
            objs = (SceneObject("circle", colours[int(rng.integers(8))], "large", "solid", int(c1) // 3, int(c1) % 3),
                    SceneObject("star", colours[int(rng.integers(8))], "large", "solid", int(c2) // 3, int(c2) % 3))
            scene = Scene(Background("plain", "gray"), objs)
            for variant in layout_variants(scene, rng, count=2):
                xs.append(preprocess(render_scene(place(variant, rng), size=64, rng=rng)))
                ys.append(float(variant.objects[0].col < variant.objects[1].col))
        return torch.stack(xs), torch.tensor(ys)
    return make


def test_a_fresh_image_tower_tells_twins_apart():
    """Twin images (the same two objects, cells swapped) are told apart on held-out scenes: the image tower
    carries left/right after 100 steps."""
    loaded = build_model("clipdex-tiny:random", seed=0)
    model = loaded.model.train()
    acc = _probe(model.encode_image, _twin_images(loaded.preprocess), steps=100,
                 params=list(model.visual.parameters()), lr=1e-3)
    assert acc >= 0.9, acc


def test_counterfactual_groups_differ_only_in_layout():
    """A group shares objects and background; its first two variants swap two cells; captions say where
    things are; a caption also true of a group-mate is marked, never used as its negative."""
    loaded = build_model("clipdex-tiny:random", seed=0)
    cfg = CounterfactualConfig(groups=6, variants=4, seed=3)
    data = CounterfactualBatches(cfg, transform=loaded.preprocess, tokenizer=loaded.tokenizer, steps=2)
    scenes, group, _ = data.scenes(1)
    assert len(scenes) == cfg.batch_size
    for g in set(group):
        members = [s for s, k in zip(scenes, group) if k == g]
        assert len({(s.background, tuple(sorted(o.key()[:4] for o in s.objects))) for s in members}) == 1
        assert len({s.signature() for s in members}) == len(members)  # every layout different
        if len(members[0].objects) >= 2:
            moved = [(a.row, a.col) != (b.row, b.col) for a, b in zip(members[0].objects, members[1].objects)]
            assert sum(moved) == 2
    batch = data[1]
    assert batch.images.shape[0] == cfg.batch_size and batch.captions.shape[0] == cfg.batch_size
    assert not batch.also_true.diagonal().any()
    for i, j in batch.also_true.nonzero().tolist():
        assert group[i] == group[j]
    again = data[1]  # a function of (seed, step): a resumed run sees the same batch
    assert again.texts == batch.texts and torch.equal(again.images, batch.images)
    assert any(w in t for t in batch.texts for w in ("left", "right", "above", "below", "top", "bottom"))


def test_the_loss_leaves_out_captions_true_of_another_image():
    """Marking a pair as also true removes it from the negatives: the loss then equals the loss of a batch
    in which that caption's image-mate is absent from its softmax."""
    from clipdex.retrieval.training.contrastive import contrastive_loss

    torch.manual_seed(0)
    img, cap = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    scale = torch.tensor(10.0)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    plain = contrastive_loss(img, cap, None, scale)
    mask[0, 1] = True  # caption 1 is true of image 0 too
    masked = contrastive_loss(img, cap, None, scale, also_true=mask)
    assert masked != plain
    cap_same = cap.clone()
    cap_same[1] = img[0]  # if caption 1 matched image 0 perfectly, masking must stop it from being penalised
    a = contrastive_loss(img, cap_same, None, scale, also_true=mask)
    b = contrastive_loss(img, cap_same, None, scale)
    assert a < b


def test_satisfies_is_what_marks_a_caption_true_of_a_layout():
    rng = np.random.default_rng(0)
    scene = Scene(Background("plain", "gray"), (SceneObject("circle", "red", "large", "solid", 0, 0),
                                                 SceneObject("star", "blue", "small", "solid", 0, 2)))
    twin = layout_variants(scene, rng, count=2)[1]
    claims = [{"type": "object", "shape": "circle", "colour": "red", "size": "large", "fill": "solid", "cell": None},
              {"type": "object", "shape": "star", "colour": "blue", "size": "small", "fill": "solid", "cell": None},
              {"type": "relation", "rel": "left_of", "a": 0, "b": 1},
              {"type": "background", "kind": "plain", "colour": "gray"}]
    assert satisfies(claims, scene) and not satisfies(claims, twin)


def test_a_curriculum_changes_the_batches_at_its_stage_boundaries():
    """lone:0.25,pairs:0.25,mixed:0.5 over 8 steps: steps 0-1 hold one object per scene and say cells, 2-3
    mostly two objects, 4-7 the mix; a step's batch is the same however often it is drawn."""
    loaded = build_model("clipdex-tiny:random", seed=0)
    stages = parse_curriculum("lone:0.25,pairs:0.25,mixed:0.5")
    data = CurriculumBatches(CounterfactualConfig(groups=4, variants=2, image_size=32, seed=1), stages,
                             transform=loaded.preprocess, tokenizer=loaded.tokenizer, steps=8)
    assert [data.names[data.stage(s)] for s in range(8)] == ["lone"] * 2 + ["pairs"] * 2 + ["mixed"] * 4
    lone = data[1]
    assert all(len(s.objects) == 1 for s in lone.scenes)
    assert not any(w in t for t in lone.texts for w in (" left of", " right of", " above ", " below "))
    assert max(len(s.objects) for s in data[2].scenes) <= 2
    assert data[5].texts == data[5].texts and torch.equal(data[5].images, data[5].images)
    assert parse_curriculum("") == ()
    for bad in ("lone", "lone:x", "lone:0", "wild:1", "lone:0.5,mixed:0.6"):
        with pytest.raises(ValueError):
            parse_curriculum(bad)


def test_the_shipped_spatial_model_reads_where_things_are():
    """clipdex-spatial: "left of" and "right of" embed apart, and a held-out two-object scene is matched to
    the caption that says its relation the right way round, not the converse (clipdex-world is at chance)."""
    from clipdex.data_manifests.world.captions import make_captions
    from clipdex.data_manifests.world.scene import sample_layout
    from clipdex.retrieval.models.encoder import load_encoder

    enc = load_encoder("clipdex-spatial", device="cpu", runtime="torch")
    t = enc.encode_texts(["a red circle left of a blue star", "a red circle right of a blue star"])
    assert float(t[0] @ t[1]) < 0.9
    rng = np.random.default_rng(12345)
    images, captions, foils = [], [], []
    while len(images) < 40:
        scene = place(sample_layout(rng, n_objects=2), rng)
        cap = make_captions(scene, rng, n=1, forms=["relation"])[0]
        foil = [text for kind, text, _ in cap.foils if kind == "relation"]
        if not foil or any(w in cap.text for w in ("larger", "bigger", "smaller")):
            continue
        images.append(render_scene(scene, size=128, rng=rng))
        captions.append(cap.text)
        foils.append(foil[0])
    img, cap, foil = enc.encode_images(images), enc.encode_texts(captions), enc.encode_texts(foils)
    right = ((img * cap).sum(1) > (img * foil).sum(1)).mean()
    assert right >= 0.85, right
