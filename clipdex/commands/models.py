"""``clipdex models``: the built-in trained models, the architectures and the model-spec forms."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``models`` to the ``clipdex`` parser."""
    p = sub.add_parser("models", help="list built-in models, architectures and spec forms",
                       description="List the built-in trained models, the architectures open_clip can build "
                       "(clipdex's own included) and the forms a model spec may take.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_models)


def _models(args) -> int:
    from clipdex.retrieval.models.registry import (
        BUILTIN_MODELS,
        CONFIG_DIR,
        list_models,
    )
    from clipdex.retrieval.models.spec import FORMS_HELP

    own = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    data = {"builtin": {k: v.description for k, v in BUILTIN_MODELS.items()}, "clipdex_architectures": own,
            "open_clip_architectures": [m for m in list_models() if m not in own], "spec_forms": FORMS_HELP}
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print("built-in models:")
    for k, v in data["builtin"].items():
        print(f"  {k:<16} {v}")
    print("clipdex architectures (train with ARCH:random): " + ", ".join(own))
    print(f"open_clip architectures: {len(data['open_clip_architectures'])} (clipdex models --json lists them)")
    print("spec forms: " + FORMS_HELP)
    return 0
