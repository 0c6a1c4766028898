"""``clipdex world generate``: render the built-in captioned world into a folder and print its summary."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from clipdex.commands.argtypes import int_at_least
from clipdex.exceptions import ClipdexError

GENERATE_EPILOG = """\
examples:
  clipdex world generate --out worlds/demo                       # defaults: 20k train, 2k test, 2k corpus
  clipdex world generate --out worlds/tiny --train 500 --test 300 --corpus 200 --landmarks 10
  clipdex world generate --out worlds/big --train 100000 --workers 2 --json
  clipdex world generate --out worlds/demo --overwrite --seed 1  # replace an earlier world

the folder gets images/<split>/album-<k>/IMG_<n>.jpg|png, manifest.parquet (the schema is documented in
clipdex.data_manifests.schema) and world.json (config and summary). The same --seed and counts give
byte-identical files, whatever --workers.
"""


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``world`` command (with its ``generate`` action) to the top-level subparsers."""
    p = sub.add_parser(
        "world", help="the built-in captioned world (synthetic photos with captions, foils, landmarks)",
        description="The built-in captioned world: a generated photo collection of shapes with complete "
        "captions, hard-negative foils, landmark facts and questions, standing in for a real dataset.",
    )
    wsub = p.add_subparsers(dest="world_command", metavar="ACTION", required=True)
    g = wsub.add_parser(
        "generate", help="generate images and a Parquet manifest",
        description="Render a seeded world into --out: train, test (held-out scenes), corpus (a collection "
        "to index, with landmark scenes) and query (photos of the landmarks) splits.",
        epilog=GENERATE_EPILOG,
    )
    g.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder (created if missing)")
    g.add_argument("--seed", type=int, default=0,
                   help="world seed: the same seed and counts give the same world")
    sizes = g.add_argument_group("sizes")
    sizes.add_argument("--train", type=int_at_least(0), default=20000, metavar="N", help="train images")
    sizes.add_argument("--test", type=int_at_least(0), default=2000, metavar="N",
                       help="test images (held-out scenes)")
    sizes.add_argument("--corpus", type=int_at_least(0), default=2000, metavar="N",
                       help="ordinary corpus images; each landmark's scene is added on top")
    sizes.add_argument("--landmarks", type=int_at_least(0), default=50, metavar="N",
                       help="landmarks: corpus scenes whose captions state facts (name, year, city, builder)")
    sizes.add_argument("--views", type=int_at_least(0), default=3, metavar="N",
                       help="query photos per landmark (the query split)")
    sizes.add_argument("--captions", type=int_at_least(0), default=5, metavar="N", help="captions per image")
    sizes.add_argument("--size", type=int_at_least(0), default=128, metavar="PX", help="image side, in pixels")
    sizes.add_argument("--twins", type=float, default=0.0, metavar="FRACTION",
                       help="share of train scenes followed by a twin, 0 to 1: two objects' cells swapped, or a "
                       "lone object moved; twins teach a model that 'A left of B' is not 'B left of A'")
    run = g.add_argument_group("run")
    run.add_argument("--workers", type=int_at_least(0), default=None, metavar="N",
                     help="rendering processes; 0 or 1 renders in this process "
                     f"(default: the CPU count, {os.cpu_count()} here)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the images, manifest and world.json of an existing world in --out")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--json", action="store_true", help="print the summary as JSON")
    g.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    from clipdex.data_manifests.world.generate import WorldConfig, generate_world

    out: Path = args.out
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        what = "is not a folder" if not out.is_dir() else "exists and is not empty"
        raise ClipdexError(f"--out {out} {what}; pass --overwrite to replace a world there, or choose "
                           "another folder")
    try:
        config = WorldConfig(
            seed=args.seed, train=args.train, test=args.test, corpus=args.corpus, landmarks=args.landmarks,
            views_per_landmark=args.views, captions_per_image=args.captions, image_size=args.size,
            workers=args.workers, twin_fraction=args.twins,
        )
    except ValueError as e:
        raise ClipdexError(str(e)) from e
    try:
        summary = generate_world(config, out_dir=out, progress=not (args.no_progress or args.json),
                                 overwrite=args.overwrite)
    except FileExistsError as e:
        raise ClipdexError(str(e)) from e
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    counts = summary["counts"]
    print(f"world written to {summary['out_dir']}")
    print("  " + "  ".join(f"{split} {n}" for split, n in counts.items())
          + f"  ({summary['landmarks']} landmarks)")
    print(f"  {summary['images']} images in {summary['seconds']:.1f}s "
          f"({summary['images_per_s']} images/s, {summary['workers']} workers)")
    print(f"  manifest: {summary['manifest']}")
    return 0
