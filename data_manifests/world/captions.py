"""Captions: several differently worded, complete descriptions per scene, each with its claims and foils.

Every caption is rendered from a :class:`CaptionPlan` (what to say and which words to say it with), so its
claims (see :mod:`.claims`) come from the same plan as its text. Three template families:

- ``list``: each object with its grid cell, then the background
  ("a large red striped circle in the top left and a small blue star in the center, on a gray
  checkered background").
- ``count``: "three shapes on a slate striped background: a ..., a ... and a ..." (cells said half the time).
- ``relation`` (2+ objects): a chain of spatial relations from the grid cells that mentions every object
  ("a big red striped circle left of a small blue star, and a green hollow heart below the star, on a sand
  plain background"); a relation is sometimes a size relation ("larger than"), which then replaces the
  two objects' size words.

Foils (hard negatives) re-render a perturbed plan: ``relation`` swaps the two objects of one relation,
``attribute`` swaps colours (else fills, else sizes) between two objects. A foil is kept only when the
scene does not satisfy its claims.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from clipdex.data_manifests.world import vocab
from clipdex.data_manifests.world.claims import RELATIONS, satisfies
from clipdex.data_manifests.world.scene import (
    Background,
    LandmarkFacts,
    Scene,
    SceneObject,
)

SIZE_RELATION_PROB = 0.15
COUNT_CELLS_PROB = 0.5
FORM_PROBS = {"list": 0.4, "count": 0.3, "relation": 0.3}  # forms of captions beyond the required relations
MIN_RELATION_CAPTIONS = 2


@dataclass(frozen=True)
class Mention:
    """How one object is said: its claimed attributes and the words chosen for them."""

    shape: str
    colour: str
    size: str | None
    fill: str
    cell: tuple[int, int] | None
    size_word: str
    fill_word: str
    fill_after_shape: bool  # "red circle with stripes" rather than "striped red circle"
    fill_before_colour: bool  # "striped red circle" rather than "red striped circle"
    cell_word: str
    cell_prep: str


@dataclass(frozen=True)
class RelationMention:
    """``objects[a] <rel> objects[b]``, said with ``word``."""

    rel: str
    a: int
    b: int
    word: str


@dataclass(frozen=True)
class CaptionPlan:
    """Everything a caption says and how: rendered by :func:`render_text`, claimed by :func:`plan_claims`."""

    form: str
    objects: tuple[Mention, ...]
    background: Background
    bg_word: str
    bg_colour_first: bool
    template: int
    relations: tuple[RelationMention, ...] = ()
    count_noun: str = "shapes"
    landmark: LandmarkFacts | None = None
    landmark_template: int = 0


@dataclass
class Caption:
    """A caption's text, its claims, and its foils as (kind, text, claims)."""

    text: str
    claims: list[dict]
    foils: list[tuple[str, str, list[dict]]] = field(default_factory=list)


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def _mention(o: SceneObject, rng: np.random.Generator, *, with_cell: bool) -> Mention:
    post = o.fill in vocab.FILL_POST and rng.random() < 0.3
    words = vocab.FILL_POST[o.fill] if post else vocab.FILL_PRE[o.fill]
    return Mention(
        shape=o.shape, colour=o.colour, size=o.size, fill=o.fill,
        cell=(o.row, o.col) if with_cell else None,
        size_word=_pick(rng, vocab.SIZE_WORDS[o.size]), fill_word=_pick(rng, words),
        fill_after_shape=post, fill_before_colour=bool(rng.random() < 0.3),
        cell_word=_pick(rng, vocab.cell_words(o.row, o.col)), cell_prep=_pick(rng, ("in", "at")),
    )


def _phrase(m: Mention) -> str:
    """The full indefinite phrase: "a large red striped circle in the top left"."""
    words = [m.size_word] if m.size is not None else []
    if m.fill_after_shape:
        words += [m.colour, m.shape, m.fill_word]
    elif m.fill_before_colour:
        words += [m.fill_word, m.colour, m.shape]
    else:
        words += [m.colour, m.fill_word, m.shape]
    text = _article(" ".join(words))
    if m.cell is not None:
        text += f" {m.cell_prep} the {m.cell_word}"
    return text


def _reference(objects: tuple[Mention, ...], i: int) -> str:
    """The shortest definite description that singles out ``objects[i]``: "the star", "the red star"."""
    def key(m: Mention, level: int) -> tuple:
        return ((m.shape,), (m.colour, m.shape), (m.size, m.colour, m.shape))[level]

    m = objects[i]
    for level in range(3):
        if level == 2 and m.size is None:
            break
        if sum(key(o, level) == key(m, level) for o in objects) == 1:
            words = ([m.size_word] if level == 2 else []) + ([m.colour] if level >= 1 else []) + [m.shape]
            return "the " + " ".join(words)
    return "the " + _phrase(replace(m, cell=None)).split(" ", 1)[1]


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _background_phrase(plan: CaptionPlan) -> str:
    words = [plan.background.colour, plan.bg_word] if plan.bg_colour_first else [plan.bg_word,
                                                                                  plan.background.colour]
    return _article(" ".join(words) + " background")


def _relation_clauses(plan: CaptionPlan) -> str:
    mentioned: set[int] = set()
    clauses = []
    for r in plan.relations:
        sides = []
        for i in (r.a, r.b):
            sides.append(_reference(plan.objects, i) if i in mentioned else _phrase(plan.objects[i]))
            mentioned.add(i)
        clauses.append(f"{sides[0]} {r.word} {sides[1]}")
    return clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + ", and " + clauses[-1]


def render_text(plan: CaptionPlan) -> str:
    """The caption text of ``plan``."""
    bg = _background_phrase(plan)
    t = plan.template
    if plan.form == "relation":
        body = _relation_clauses(plan)
        desc = [f"{body}, on {bg}", f"{body} against {bg}", f"on {bg}, {body}", f"{bg} with {body}"][t]
    else:
        objs = _join([_phrase(m) for m in plan.objects])
        if plan.form == "list":
            desc = [f"{objs}, on {bg}", f"{objs} against {bg}", f"{bg} with {objs}", f"on {bg}: {objs}"][t]
        else:
            n = len(plan.objects)
            noun = plan.count_noun[:-1] if n == 1 else plan.count_noun
            head = f"{vocab.COUNT_WORDS[n]} {noun}"
            desc = [f"{head} on {bg}: {objs}", f"{bg} with {head}: {objs}", f"{head} against {bg}: {objs}",
                    f"there {'is' if n == 1 else 'are'} {head} on {bg}: {objs}"][t]
    lm = plan.landmark
    if lm is None:
        return desc
    name = lm.name
    cap = name[:1].upper() + name[1:]
    return [
        f"{cap} in {lm.city}, built in {lm.year} by {lm.builder}: {desc}",
        f"{desc}. This is {name} in {lm.city}, built by {lm.builder} in {lm.year}",
        f"{cap}, built in {lm.year} by {lm.builder} in {lm.city}: {desc}",
        f"a photo of {name} in {lm.city} (built {lm.year} by {lm.builder}): {desc}",
    ][plan.landmark_template]


def plan_claims(plan: CaptionPlan) -> list[dict]:
    """The claims ``plan`` makes (object claims first, so relation indices are object positions)."""
    claims: list[dict] = [
        {"type": "object", "shape": m.shape, "colour": m.colour, "size": m.size, "fill": m.fill,
         "cell": list(m.cell) if m.cell is not None else None}
        for m in plan.objects
    ]
    claims += [{"type": "relation", "rel": r.rel, "a": r.a, "b": r.b} for r in plan.relations]
    if plan.form == "count":
        claims.append({"type": "count", "n": len(plan.objects)})
    claims.append({"type": "background", "kind": plan.background.kind, "colour": plan.background.colour})
    if plan.landmark is not None:
        lm = plan.landmark
        claims.append({"type": "landmark", "landmark_id": lm.landmark_id, "name": lm.name, "year": lm.year,
                       "city": lm.city, "builder": lm.builder})
    return claims


def _relation_chain(scene: Scene, rng: np.random.Generator, order: list[int],
                    mentions: list[Mention]) -> tuple[RelationMention, ...]:
    """Relations linking every object: o0-o1, then each later object to a random earlier one."""
    rels = []
    for i in range(1, len(order)):
        a, b = (0, 1) if i == 1 else (i, int(rng.integers(i)))
        oa, ob = scene.objects[order[a]], scene.objects[order[b]]
        if oa.size != ob.size and rng.random() < SIZE_RELATION_PROB:
            rel = "larger_than" if oa.size == "large" else "smaller_than"
            mentions[a] = replace(mentions[a], size=None)
            mentions[b] = replace(mentions[b], size=None)
        else:
            rel = _pick(rng, [r for r in vocab.SPATIAL_RELATIONS if RELATIONS[r](oa, ob)])
        rels.append(RelationMention(rel=rel, a=a, b=b, word=_pick(rng, vocab.RELATION_WORDS[rel])))
    return tuple(rels)


def make_plan(scene: Scene, rng: np.random.Generator, *, form: str,
              landmark: LandmarkFacts | None = None) -> CaptionPlan:
    """A random plan of ``form`` ("list", "count" or "relation") describing all of ``scene``."""
    order = [int(i) for i in rng.permutation(len(scene.objects))]
    with_cells = form == "list" or (form == "count" and rng.random() < COUNT_CELLS_PROB)
    mentions = [_mention(scene.objects[i], rng, with_cell=with_cells) for i in order]
    relations: tuple[RelationMention, ...] = ()
    if form == "relation":
        if len(order) < 2:
            raise ValueError("a relation caption needs a scene with at least two objects")
        relations = _relation_chain(scene, rng, order, mentions)
    elif form not in ("list", "count"):
        raise ValueError(f"unknown caption form {form!r}; expected list, count or relation")
    bg = scene.background
    return CaptionPlan(
        form=form, objects=tuple(mentions), background=bg, bg_word=_pick(rng, vocab.BACKGROUND_WORDS[bg.kind]),
        bg_colour_first=bool(rng.random() < 0.7), template=int(rng.integers(4)), relations=relations,
        count_noun=_pick(rng, ("shapes", "objects", "shapes")), landmark=landmark,
        landmark_template=int(rng.integers(4)),
    )


CONVERSE = {"left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above",
            "larger_than": "smaller_than", "smaller_than": "larger_than"}


def _converse_word(rel: str, word: str) -> str:
    """The converse relation said in the same style ("to the left of" -> "to the right of")."""
    words, theirs = vocab.RELATION_WORDS[rel], vocab.RELATION_WORDS[CONVERSE[rel]]
    i = words.index(word) if word in words else 0
    return theirs[i] if i < len(theirs) else theirs[0]


def _relation_foil(plan: CaptionPlan, scene: Scene, rng: np.random.Generator) -> CaptionPlan | None:
    """One relation said the other way round ("A left of B" -> "A right of B"), which makes it false.

    The converse keeps every word but one in place: swapping the objects instead ("B left of A") moves an
    article ("..., and the circle above a star" never occurs in a real chain, where each later clause
    introduces a new object), a tell that a text-only model of the captions reads without the image."""
    for k in rng.permutation(len(plan.relations)):
        rels = list(plan.relations)
        r = rels[int(k)]
        rels[int(k)] = replace(r, rel=CONVERSE[r.rel], word=_converse_word(r.rel, r.word))
        foil = replace(plan, relations=tuple(rels))
        if not satisfies(plan_claims(foil), scene):
            return foil
    return None


def _attribute_foil(plan: CaptionPlan, scene: Scene, rng: np.random.Generator) -> CaptionPlan | None:
    n = len(plan.objects)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    for attr in ("colour", "fill", "size"):
        for p in rng.permutation(len(pairs)):
            i, j = pairs[int(p)]
            mi, mj = plan.objects[i], plan.objects[j]
            vi, vj = getattr(mi, attr), getattr(mj, attr)
            if vi is None or vj is None or vi == vj:
                continue
            objs = list(plan.objects)
            if attr == "colour":
                objs[i], objs[j] = replace(mi, colour=vj), replace(mj, colour=vi)
            elif attr == "fill":  # the fill words travel with the fill
                objs[i] = replace(mi, fill=vj, fill_word=mj.fill_word, fill_after_shape=mj.fill_after_shape)
                objs[j] = replace(mj, fill=vi, fill_word=mi.fill_word, fill_after_shape=mi.fill_after_shape)
            else:
                objs[i] = replace(mi, size=vj, size_word=mj.size_word)
                objs[j] = replace(mj, size=vi, size_word=mi.size_word)
            foil = replace(plan, objects=tuple(objs))
            if not satisfies(plan_claims(foil), scene):
                return foil
    return None


def caption_forms(n_objects: int, n_captions: int, rng: np.random.Generator) -> list[str]:
    """Forms of a scene's captions: at least two relation captions when the scene has 2+ objects."""
    if n_objects < 2:
        return [_pick(rng, ("list", "list", "count")) for _ in range(n_captions)]
    forms = ["relation"] * min(MIN_RELATION_CAPTIONS, n_captions)
    names, probs = list(FORM_PROBS), list(FORM_PROBS.values())
    forms += [names[int(rng.choice(len(names), p=probs))] for _ in range(n_captions - len(forms))]
    return [forms[int(i)] for i in rng.permutation(len(forms))]


def make_captions(scene: Scene, rng: np.random.Generator, *, n: int = 5, with_landmark: bool = False,
                  max_tries: int = 30, forms: list[str] | None = None) -> list[Caption]:
    """``n`` distinct captions of ``scene`` with their claims and foils.

    With ``with_landmark`` (and ``scene.landmark`` set) each caption also states the landmark's facts.
    ``forms`` fixes each caption's form (its length is the count); by default :func:`caption_forms` picks.
    Raises RuntimeError if a caption's claims were not satisfied by its own scene (a generator bug).
    """
    landmark = scene.landmark if with_landmark else None
    out: list[Caption] = []
    seen: set[str] = set()
    for form in forms if forms is not None else caption_forms(len(scene.objects), n, rng):
        for _ in range(max_tries):
            plan = make_plan(scene, rng, form=form, landmark=landmark)
            text = render_text(plan)
            if text not in seen:
                break
        seen.add(text)
        claims = plan_claims(plan)
        if not satisfies(claims, scene):
            raise RuntimeError(f"caption {text!r} is not satisfied by its own scene {scene}")
        cap = Caption(text=text, claims=claims)
        if plan.relations:
            foil = _relation_foil(plan, scene, rng)
            if foil is not None:
                cap.foils.append(("relation", render_text(foil), plan_claims(foil)))
        if len(plan.objects) >= 2:
            foil = _attribute_foil(plan, scene, rng)
            if foil is not None:
                cap.foils.append(("attribute", render_text(foil), plan_claims(foil)))
        out.append(cap)
    return out
