"""The world's closed vocabulary: shapes, colours, sizes, fills, cells, backgrounds and their words.

Everything the generator can draw and every word a caption can use lives here, so that the renderer, the
captioner and the oracle agree. Canonical names (the values stored in the manifest and in claims) are the
dictionary keys; the word lists are the synonyms a caption may use for them.
"""

from __future__ import annotations

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "heart")

# Saturated, well separated object colours (RGB). Per-image jitter is a few units (COLOUR_JITTER).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 25, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 225, 20),
    "green": (20, 170, 50),
    "cyan": (0, 210, 230),
    "blue": (25, 60, 235),
    "purple": (135, 40, 205),
    "pink": (255, 110, 190),
}
COLOUR_JITTER = 6

# Radius (circumradius, as a fraction of the image width) of each size; +-SIZE_JITTER relative jitter.
SIZES: dict[str, float] = {"small": 0.085, "large": 0.14}
SIZE_JITTER = 0.10

FILLS: tuple[str, ...] = ("solid", "striped", "outline")

# Background kinds and muted colours (low saturation, mid/dark value: never confusable with COLOURS).
BACKGROUND_KINDS: tuple[str, ...] = ("plain", "gradient", "checkered", "noisy", "striped")
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "gray": (118, 118, 118),
    "sand": (150, 136, 108),
    "slate": (72, 82, 98),
    "olive": (92, 96, 60),
    "brown": (98, 72, 56),
}

ROWS: tuple[str, ...] = ("top", "middle", "bottom")
COLS: tuple[str, ...] = ("left", "center", "right")

# Objects per scene: 1..4 with these probabilities.
OBJECT_COUNT_PROBS: tuple[float, ...] = (0.2, 0.35, 0.25, 0.2)

# ---- words -----------------------------------------------------------------------------------------

SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}

# A fill is said before the colour/shape ("striped red circle") or after the shape ("red circle with stripes").
FILL_PRE: dict[str, tuple[str, ...]] = {
    "solid": ("solid", "filled"),
    "striped": ("striped",),
    "outline": ("hollow", "outlined"),
}
FILL_POST: dict[str, tuple[str, ...]] = {"striped": ("with stripes",), "outline": ("outline",)}

BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {
    "plain": ("plain", "flat"),
    "gradient": ("gradient", "shaded"),
    "checkered": ("checkered", "checked"),
    "noisy": ("noisy", "grainy"),
    "striped": ("striped", "lined"),
}


def cell_words(row: int, col: int) -> tuple[str, ...]:
    """Phrases naming cell (row, col) of the 3x3 grid, e.g. ("top left", "upper left")."""
    vertical = {0: ("top", "upper"), 1: ("middle", "center"), 2: ("bottom", "lower")}[row]
    if row == 1 and col == 1:
        return ("center", "middle")
    if col == 1:
        return (f"{vertical[0]} center", f"{vertical[0]} middle", f"{vertical[1]} middle")
    side = COLS[col]
    if row == 1:
        return (f"middle {side}", f"center {side}")
    return (f"{vertical[0]} {side}", f"{vertical[1]} {side}")


RELATION_WORDS: dict[str, tuple[str, ...]] = {
    "left_of": ("left of", "to the left of"),
    "right_of": ("right of", "to the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
    "larger_than": ("larger than", "bigger than"),
    "smaller_than": ("smaller than",),
}
SPATIAL_RELATIONS = ("left_of", "right_of", "above", "below")

COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
