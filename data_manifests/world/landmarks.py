"""Landmarks: fixed compositions that carry facts (name, year, city, builder) only their captions state.

Each landmark is a 3-4 object scene rendered once in the ``corpus`` split with captions that state its
facts, plus re-rendered query views in the ``query`` split (other jitter, a small crop, other noise and
sometimes another background) whose questions ask for the facts. Names are built from syllable pools
(about 140,000 two-syllable words, times 20 kinds of place, so two seeds practically never share
a name); a world never repeats a name.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from clipdex.data_manifests.world.scene import (
    LandmarkFacts,
    Scene,
    sample_background,
    sample_layout,
)

ONSETS = ("b", "br", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "st", "t", "th", "v", "w", "z")
VOWELS = ("a", "e", "i", "o", "u", "ai")
CODAS = ("", "n", "r", "l", "s", "th", "m", "rn", "nd", "sk")  # only after a word's last syllable
PLACE_KINDS = ("Gate", "Tower", "Bridge", "Hall", "Arch", "Temple", "Fountain", "Column", "Palace", "Abbey",
               "Library", "Lighthouse", "Citadel", "Mill", "Observatory", "Cathedral", "Market", "Theatre",
               "Monument", "Spire")
YEARS = (1200, 1999)
OTHER_BACKGROUND_PROB = 0.3  # a query view is sometimes photographed against another background
LANDMARK_STREAM = 7  # RNG stream code for landmark definitions


def make_word(rng: np.random.Generator, *, syllables: tuple[int, int]) -> str:
    """A capitalised made-up word of ``syllables[0]..syllables[1]`` syllables ("Varn", "Tobel")."""
    n = int(rng.integers(syllables[0], syllables[1] + 1))
    parts = [ONSETS[rng.integers(len(ONSETS))] + VOWELS[rng.integers(len(VOWELS))] for _ in range(n)]
    return ("".join(parts) + CODAS[rng.integers(len(CODAS))]).capitalize()


def make_landmark(seed: int, index: int, *, taken: set[str], attempt: int = 0) -> Scene:
    """Landmark ``index`` of world ``seed``: its scene (unplaced) with facts; names in ``taken`` are avoided.

    ``attempt`` > 0 draws another landmark for the same index (used when a composition is already taken).
    """
    rng = np.random.default_rng([seed, LANDMARK_STREAM, index, attempt])
    while True:
        name = f"the {make_word(rng, syllables=(1, 2))} {PLACE_KINDS[rng.integers(len(PLACE_KINDS))]}"
        if name not in taken:
            break
    facts = LandmarkFacts(
        landmark_id=index, name=name, year=int(rng.integers(YEARS[0], YEARS[1] + 1)),
        city=make_word(rng, syllables=(2, 3)),
        builder=f"{make_word(rng, syllables=(2, 2))} {make_word(rng, syllables=(2, 3))}",
    )
    scene = sample_layout(rng, n_objects=int(rng.integers(3, 5)))
    return replace(scene, landmark=facts)


def query_view(landmark: Scene, rng: np.random.Generator) -> Scene:
    """The landmark as a user photographs it: same objects and cells, maybe another background."""
    if rng.random() < OTHER_BACKGROUND_PROB:
        return replace(landmark, background=sample_background(rng))
    return landmark
