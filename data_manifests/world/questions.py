"""Questions with answers: visual questions for every image, fact questions for landmark query views.

Answers are short canonical strings, so they can be compared exactly:

- ``count``: "how many shapes are there?" -> a count word ("three").
- ``colour``: "what colour is the star?" (only for shapes that occur once) -> a colour name ("red").
- ``position``: "what shape is in the top left?" -> a shape name ("circle").
- ``relation``: "what is left of the star?" -> "<colour> <shape>" ("red circle"); asked only when the
  reference shape occurs once and exactly one object stands in that relation to it (left of = a column
  further left, whatever the row; above = a row higher, whatever the column).
- ``landmark_name`` / ``landmark_year`` / ``landmark_city`` / ``landmark_builder`` (query views only):
  "what is this place called?" -> "the Varn Gate", "when was it built?" -> "1742",
  "in which city is it?" -> "Oskel", "who built it?" -> "Mira Talon".
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from clipdex.data_manifests.world import vocab
from clipdex.data_manifests.world.claims import RELATIONS
from clipdex.data_manifests.world.scene import Scene

MAX_COLOUR_QUESTIONS = 2
RELATION_QUESTION_WORDS = {"left_of": "left of", "right_of": "right of", "above": "above", "below": "below"}


def _q(question: str, answer: str, kind: str) -> dict:
    return {"question": question, "answer": answer, "kind": kind}


def visual_questions(scene: Scene, rng: np.random.Generator) -> list[dict]:
    """Count, colour, position and (when well defined) relation questions about ``scene``."""
    objs = scene.objects
    out = [_q("how many shapes are there?", vocab.COUNT_WORDS[len(objs)], "count")]
    shape_counts = Counter(o.shape for o in objs)
    unique = [o for o in objs if shape_counts[o.shape] == 1]
    for k in rng.permutation(len(unique))[:MAX_COLOUR_QUESTIONS]:
        o = unique[int(k)]
        out.append(_q(f"what colour is the {o.shape}?", o.colour, "colour"))
    o = objs[int(rng.integers(len(objs)))]
    cell = vocab.cell_words(o.row, o.col)[0]
    out.append(_q(f"what shape is in the {cell}?", o.shape, "position"))
    candidates = []
    for ref in unique:
        for rel in RELATION_QUESTION_WORDS:
            hits = [t for t in objs if t is not ref and RELATIONS[rel](t, ref)]
            if len(hits) == 1:
                candidates.append((rel, ref, hits[0]))
    if candidates:
        rel, ref, hit = candidates[int(rng.integers(len(candidates)))]
        out.append(_q(f"what is {RELATION_QUESTION_WORDS[rel]} the {ref.shape}?", f"{hit.colour} {hit.shape}",
                      "relation"))
    return out


def landmark_questions(scene: Scene) -> list[dict]:
    """The four fact questions of a landmark query view (empty for ordinary scenes)."""
    lm = scene.landmark
    if lm is None:
        return []
    return [
        _q("what is this place called?", lm.name, "landmark_name"),
        _q("when was it built?", str(lm.year), "landmark_year"),
        _q("in which city is it?", lm.city, "landmark_city"),
        _q("who built it?", lm.builder, "landmark_builder"),
    ]
