"""The spatial probe: scenes that differ only in where things are, each queried by its own caption.

Among random scenes, *which* objects are present is enough to find the right image, so recall on a gallery
says little about position. Here every query competes only with its group: one scene's objects (same shapes,
colours, sizes, fills and background) laid out in different cells. Three kinds of group:

- ``lone``: one object, drawn in each of the nine cells (9 variants); captions in the world's ``list`` form,
  which names the object's cell ("a small red striped circle in the top left, on ...").
- ``swap``: two objects and their twin with the two cells swapped (2 variants), so every relation between
  them flips; captions in the world's ``relation`` form ("a red circle left of a blue star, on ...").
- ``moved``: 2-4 objects, the scene and ``moved_variants - 1`` new layouts of its objects (random distinct
  cells, every layout different; 4 variants); each caption is a ``relation`` chain or a ``list`` of cells,
  half and half.

Every variant is placed (jittered) and rendered on its own, as the world renders its images
(:func:`~clipdex.data_manifests.world.render.render_scene` at 128 px, then the encoder's preprocessing), with
one caption from :func:`~clipdex.data_manifests.world.captions.make_captions`. Groups are drawn from
``(seed, kind, group index)``, so a group does not depend on how many are asked for; the default seed (5) is
not the encoder's training seed (0).

Scoring (recall@1 within the group; chance = 1 / variants): a caption is right when its own variant scores
strictly above every variant the caption is false of (ties count against the model). A caption can be true
of more than one variant ("the circle left of the star" holds for several layouts): each variant it is
true of (checked with :func:`~clipdex.data_manifests.world.claims.satisfies`) counts as right too, and
``also_true`` counts such queries, ``accepted`` those whose top image was such another variant, and
``chance_adjusted`` is the chance rate with them (true variants / variants, averaged). A caption true of
every variant of its group tests nothing (a size relation in a ``swap`` group) and is ``excluded``.
``i2t`` is the other direction: each image picks among its group's captions, right when a caption true of
it scores strictly above every caption false of it. With a matcher, the same figures come again under
``rerank`` with the matcher's logits (from the image tower's patch-token grids and the text tower's token
states) in place of the cosine.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from clipdex.data_manifests.world.captions import make_captions
from clipdex.data_manifests.world.claims import satisfies
from clipdex.data_manifests.world.generate import add_moved_layouts, swap_cells
from clipdex.data_manifests.world.render import render_scene
from clipdex.data_manifests.world.scene import Scene, place, sample_layout
from clipdex.retrieval.models.encoder import DualEncoder
from clipdex.retrieval.models.matcher import Matcher

KINDS = ("lone", "swap", "moved")
KIND_CODES = {"lone": 1, "swap": 2, "moved": 3}
PROBE_STREAM = 11  # RNG stream code of the probe's groups (the world generator uses 0-9)


@dataclass(frozen=True)
class SpatialProbeConfig:
    """What the probe draws: ``probes`` groups of each of ``kinds`` from world seed ``seed`` (keep it apart
    from the encoder's training seed, 0), rendered at ``image_size`` pixels (the world's); ``moved_variants``
    layouts per ``moved`` group; ``batch_size`` images embedded at once."""

    probes: int = 200
    seed: int = 5
    kinds: tuple[str, ...] = KINDS
    image_size: int = 128
    moved_variants: int = 4
    batch_size: int = 256

    def __post_init__(self) -> None:
        unknown = [k for k in self.kinds if k not in KIND_CODES]
        if unknown or not self.kinds:
            raise ValueError(f"SpatialProbeConfig.kinds: unknown kind(s) {unknown}; expected some of {KINDS}")
        if self.probes < 1:
            raise ValueError(f"SpatialProbeConfig.probes must be >= 1, got {self.probes}")
        if self.moved_variants < 2:
            raise ValueError(f"SpatialProbeConfig.moved_variants must be >= 2, got {self.moved_variants}")


@dataclass
class ProbeGroup:
    """One group: placed scenes that differ only in layout, one caption (text, claims, form) for each, and
    the rendered images (PIL, ``image_size`` square)."""

    kind: str
    scenes: list[Scene]
    texts: list[str]
    claims: list[list[dict]]
    forms: list[str]
    images: list

    def truth(self) -> np.ndarray:
        """(captions, images) bool: caption c is true of image i (the diagonal always is)."""
        return truth_matrix(claims=self.claims, scenes=self.scenes)


def truth_matrix(*, claims: list[list[dict]], scenes: list[Scene]) -> np.ndarray:
    """(len(claims), len(scenes)) bool: ``satisfies(claims[c], scenes[i])``."""
    return np.array([[satisfies(c, s) for s in scenes] for c in claims], dtype=bool).reshape(len(claims), len(scenes))


def _moved(base: Scene, rng: np.random.Generator, *, count: int) -> list[Scene]:
    # 2-4 objects have 72+ layouts, so this ends fast
    return add_moved_layouts(base, rng, out=[base], seen={base.signature()}, count=count)


def layouts(kind: str, rng: np.random.Generator, *, moved_variants: int = 4) -> tuple[list[Scene], list[str]]:
    """A group's unplaced layouts (the first is the drawn scene) and each one's caption form."""
    if kind == "lone":
        base = sample_layout(rng, n_objects=1)
        o = base.objects[0]
        scenes = [replace(base, objects=(replace(o, row=c // 3, col=c % 3),)) for c in range(9)]
        return scenes, ["list"] * 9
    if kind == "swap":
        base = sample_layout(rng, n_objects=2)
        return [base, swap_cells(base, 0, 1)], ["relation", "relation"]
    if kind == "moved":
        base = sample_layout(rng, n_objects=int(rng.integers(2, 5)))
        scenes = _moved(base, rng, count=moved_variants)
        return scenes, [("relation", "list")[int(rng.integers(2))] for _ in scenes]
    raise ValueError(f"unknown probe kind {kind!r}; expected one of {KINDS}")


def build_group(kind: str, index: int, *, config: SpatialProbeConfig) -> ProbeGroup:
    """Group ``index`` of ``kind``: its layouts placed, captioned and rendered (a function of the seed, the
    kind and the index only)."""
    rng = np.random.default_rng([config.seed, PROBE_STREAM, KIND_CODES[kind], index])
    scenes, forms = layouts(kind, rng, moved_variants=config.moved_variants)
    placed = [place(s, rng) for s in scenes]
    caps = [make_captions(s, rng, n=1, forms=[f])[0] for s, f in zip(placed, forms)]
    images = [render_scene(s, size=config.image_size, rng=rng) for s in placed]
    return ProbeGroup(kind=kind, scenes=placed, texts=[c.text for c in caps], claims=[c.claims for c in caps],
                      forms=forms, images=images)


@dataclass(frozen=True)
class Outcome:
    """One query's result: ``status`` "hit", "miss" or "excluded" (true of every candidate); ``also_true``:
    true of a candidate besides its own; ``accepted``: a hit whose top candidate was such another one;
    ``chance``: the share of candidates it is true of."""

    status: str
    also_true: bool
    accepted: bool
    chance: float


def query_outcomes(*, scores: np.ndarray, truth: np.ndarray) -> list[Outcome]:
    """Row r of ``scores`` (queries, candidates) ranks the candidates for query r, whose own candidate is r;
    ``truth[r, i]``: query r is true of candidate i. Right when the best true candidate scores strictly above
    every false one (ties count against the model)."""
    scores, truth = np.asarray(scores, dtype=np.float64), np.asarray(truth, dtype=bool)
    if scores.shape != truth.shape or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"scores {scores.shape} and truth {truth.shape} must be the same square shape")
    out = []
    for r in range(len(scores)):
        true = truth[r]
        if not true[r]:
            raise ValueError(f"query {r} is not true of its own candidate (a generator bug)")
        also = bool(true.sum() > 1)
        if true.all():
            out.append(Outcome("excluded", also, False, 1.0))
            continue
        hit = bool(scores[r][true].max() > scores[r][~true].max())
        top = int(np.argmax(scores[r]))
        out.append(Outcome("hit" if hit else "miss", also, hit and top != r, float(true.mean())))
    return out


def summarise(outcomes: list[Outcome]) -> dict:
    """recall@1 over the counted (not excluded) queries, with ``queries``, ``excluded``, ``also_true``,
    ``accepted`` and ``chance_adjusted``; recall@1 is None when nothing was counted."""
    counted = [o for o in outcomes if o.status != "excluded"]
    n = len(counted)
    return {
        "recall@1": round(sum(o.status == "hit" for o in counted) / n, 4) if n else None,
        "queries": n,
        "excluded": len(outcomes) - n,
        "also_true": sum(o.also_true for o in counted),
        "accepted": sum(o.accepted for o in counted),
        "chance_adjusted": round(float(np.mean([o.chance for o in counted])), 4) if n else None,
    }


@dataclass
class GroupScores:
    """A group's (captions, images) scores: the dual encoder's cosines and, with a matcher, its logits."""

    group: ProbeGroup
    cosine: np.ndarray
    matcher: np.ndarray | None


def _chunks(config: SpatialProbeConfig) -> Iterator[list[ProbeGroup]]:
    chunk: list[ProbeGroup] = []
    for kind in config.kinds:
        for index in range(config.probes):
            chunk.append(build_group(kind, index, config=config))
            if sum(len(g.scenes) for g in chunk) >= config.batch_size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


@torch.no_grad()
def score_groups(encoder: DualEncoder, groups: list[ProbeGroup], *, matcher: Matcher | None = None) -> list[GroupScores]:
    """Embed ``groups``' images and captions in one batch and score every caption against every image of its
    own group: cosines, and ``matcher``'s logits (not probabilities, which saturate into ties) when given."""
    pixels = torch.stack([encoder.preprocess(im) for g in groups for im in g.images])
    texts = [t for g in groups for t in g.texts]
    if matcher is not None:
        img, grids = encoder.encode_image_grid_tensors(pixels)
        states, mask = encoder.text_states(texts)
    else:
        img, grids, states, mask = encoder.encode_image_tensors(pixels).cpu(), None, None, None
    img = img.numpy()
    txt = encoder.encode_texts(texts)
    out, at = [], 0
    for g in groups:
        n = len(g.scenes)
        rows = np.arange(at, at + n)
        logits = None
        if matcher is not None:
            ti = torch.from_numpy(np.repeat(rows, n))  # pair (c, i) for every caption c and image i
            ii = torch.from_numpy(np.tile(rows, n))
            cos = txt[rows] @ img[rows].T  # (captions, images)
            logits = matcher(states, mask, grids[ii], torch.from_numpy(cos.reshape(-1).astype(np.float32)),
                             ti).float().numpy().reshape(n, n)
        out.append(GroupScores(g, txt[rows] @ img[rows].T, logits))
        at += n
    return out


def _kind_figures(scored: list[GroupScores], *, which: str) -> dict:
    """Per kind: groups, variants, chance, the text->image summary (top level), ``i2t`` and ``by_form``."""
    t2i: dict[str, list[Outcome]] = defaultdict(list)
    i2t: dict[str, list[Outcome]] = defaultdict(list)
    by_form: dict[str, dict[str, list[Outcome]]] = defaultdict(lambda: defaultdict(list))
    groups: dict[str, list[int]] = defaultdict(list)
    for s in scored:
        g = s.group
        scores = s.cosine if which == "cosine" else s.matcher
        truth = g.truth()
        outs = query_outcomes(scores=scores, truth=truth)
        t2i[g.kind] += outs
        for form, o in zip(g.forms, outs):
            by_form[g.kind][form].append(o)
        i2t[g.kind] += query_outcomes(scores=scores.T, truth=truth.T)
        groups[g.kind].append(len(g.scenes))
    result = {}
    for kind, sizes in groups.items():
        variants = sorted(set(sizes))
        result[kind] = {"groups": len(sizes), "variants": variants[0] if len(variants) == 1 else variants,
                        "chance": round(float(np.mean([1.0 / n for n in sizes])), 4), **summarise(t2i[kind]),
                        "i2t": summarise(i2t[kind]),
                        "by_form": {f: summarise(o) for f, o in sorted(by_form[kind].items())}}
    return result


def evaluate_spatial(encoder: DualEncoder, *, config: SpatialProbeConfig | None = None,
                     matcher: Matcher | None = None, matcher_name: str | None = None) -> dict:
    """Recall@1 within position-only groups (see the module docstring), per kind under ``kinds``, and the
    same with ``matcher``'s scores under ``rerank`` (named ``matcher_name``) when one is given."""
    config = config or SpatialProbeConfig()
    start = time.perf_counter()
    if matcher is not None:
        matcher = matcher.eval()
    scored: list[GroupScores] = []
    for chunk in _chunks(config):
        scored += score_groups(encoder, chunk, matcher=matcher)
    result = {"model": encoder.info.spec, "seed": config.seed, "probes": config.probes,
              "image_size": config.image_size, "kinds": _kind_figures(scored, which="cosine")}
    if matcher is not None:
        result["rerank"] = {"matcher": matcher_name, "kinds": _kind_figures(scored, which="matcher")}
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def _fmt(x: float | None) -> str:
    return f"{x:.3f}" if x is not None else "-"


def _kind_lines(kinds: dict) -> list[str]:
    lines = [f"  {'kind':<8}{'variants':>9}{'chance':>8}{'text->image':>13}{'image->text':>13}{'queries':>9}"
             f"{'also-true':>11}{'accepted':>10}{'excluded':>10}"]
    for kind, k in kinds.items():
        lines.append(f"  {kind:<8}{str(k['variants']):>9}{k['chance']:>8.3f}{_fmt(k['recall@1']):>13}"
                     f"{_fmt(k['i2t']['recall@1']):>13}{k['queries']:>9}{k['also_true']:>11}{k['accepted']:>10}"
                     f"{k['excluded']:>10}")
        if len(k["by_form"]) > 1:
            for form, f in k["by_form"].items():
                lines.append(f"    {form + ' captions':<23}{_fmt(f['recall@1']):>13}{'':>13}{f['queries']:>9}")
    return lines


def format_spatial_table(result: dict) -> str:
    """A readable table of :func:`evaluate_spatial`'s result (the same numbers as the JSON)."""
    lines = [f"model: {result['model']}   seed {result['seed']}, {result['probes']} groups per kind, "
             f"{result['image_size']} px images", "",
             "recall@1 among a group's position variants (ties count against the model; a caption true of "
             "another variant too is right on either):"]
    lines += _kind_lines(result["kinds"])
    rr = result.get("rerank")
    if rr:
        lines += ["", f"with the matcher's scores ({rr['matcher'] or 'given'}):"] + _kind_lines(rr["kinds"])
    lines += ["", f"{result['seconds']:.1f} s"]
    return "\n".join(lines)
