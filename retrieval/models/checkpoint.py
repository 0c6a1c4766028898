"""Self-describing safetensors checkpoints: the weights plus the config they were built from.

A clipdex checkpoint's metadata holds ``clipdex_format``, ``arch``, ``model_config`` (open_clip's JSON),
and free-form JSON records (``training``, ``metrics``). Files are written to a temporary name and renamed,
so a crash never leaves a half-written checkpoint under the real name.

The shipped default is exported *compact*: fp16 weights, and only the rows of the 49,408-token embedding
table that training ever saw (``token_rows``/``token_ids``); the rows never trained are zeros on load. That
keeps the file small without changing any output for text the model was trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clipdex.exceptions import CheckpointError
from clipdex.files import atomic_write

FORMAT_VERSION = "1"
TOKEN_EMBEDDING = "token_embedding.weight"


@dataclass
class CheckpointMeta:
    """What a clipdex checkpoint says about itself."""

    arch: str
    model_config: dict
    records: dict = field(default_factory=dict)  # e.g. {"training": {...}, "metrics": {...}}


def compact_rows(tensors: dict[str, torch.Tensor], *, key: str, ids) -> dict[str, torch.Tensor]:
    """``tensors`` with the embedding table ``key`` replaced by only its rows ``ids`` (stored as ``token_ids``,
    ``token_rows`` and ``token_vocab_size``); :func:`expand_rows` undoes it, other rows coming back as zeros."""
    out = dict(tensors)
    idx = torch.tensor(sorted(set(ids)), dtype=torch.int64)
    full = out.pop(key)
    out["token_ids"], out["token_rows"] = idx, full[idx].contiguous()
    out["token_vocab_size"] = torch.tensor([full.shape[0]], dtype=torch.int64)
    return out


def expand_rows(tensors: dict[str, torch.Tensor], *, key: str) -> dict[str, torch.Tensor]:
    """The full table ``key`` back from :func:`compact_rows`' rows (zeros elsewhere); unchanged if not compact."""
    if "token_rows" not in tensors:
        return tensors
    out = dict(tensors)
    ids, rows = out.pop("token_ids"), out.pop("token_rows")
    full = torch.zeros(int(out.pop("token_vocab_size")[0]), rows.shape[1], dtype=rows.dtype)
    full[ids] = rows
    out[key] = full
    return out


def save_checkpoint(path: Path, *, state_dict: dict[str, torch.Tensor], meta: CheckpointMeta,
                    compact_token_ids: list[int] | None = None, half: bool = False) -> None:
    """Write ``state_dict`` and ``meta`` to ``path`` as safetensors, atomically.

    ``compact_token_ids``: keep only these rows of the token embedding (see the module docstring).
    ``half``: store floating tensors as fp16 (loading upcasts to the model's dtype).
    """
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    if half:
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    if compact_token_ids is not None:
        tensors = compact_rows(tensors, key=TOKEN_EMBEDDING, ids=compact_token_ids)
    metadata = {
        "clipdex_format": FORMAT_VERSION,
        "arch": meta.arch,
        "model_config": json.dumps(meta.model_config, sort_keys=True),
        "records": json.dumps(meta.records, sort_keys=True),
    }
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_meta(path: Path) -> CheckpointMeta | None:
    """The clipdex metadata of a safetensors file, or None for a foreign (e.g. open_clip) checkpoint."""
    from safetensors import safe_open

    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({e}); is it truncated or corrupt?") from e
    if md.get("clipdex_format") is None:
        return None
    try:
        return CheckpointMeta(arch=md["arch"], model_config=json.loads(md["model_config"]),
                              records=json.loads(md.get("records", "{}")))
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: clipdex metadata is damaged ({e})") from e


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint's tensors (safetensors, or a torch pickle of plain tensors), expanding compact rows."""
    path = _existing(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
            if isinstance(sd, dict) and "state_dict" in sd:
                sd = sd["state_dict"]
    except Exception as e:
        raise CheckpointError(f"{path}: could not read the checkpoint ({type(e).__name__}: {e}); "
                              "is it truncated or corrupt? Re-download or re-train it.") from e
    if not isinstance(sd, dict) or not sd:
        raise CheckpointError(f"{path}: holds no tensors")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return expand_rows(sd, key=TOKEN_EMBEDDING)


def load_into(model: torch.nn.Module, path: Path) -> None:
    """Load ``path`` into ``model`` strictly; a shape or key mismatch names the file and the first culprits."""
    sd = load_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{path}: does not fit this architecture: missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"wrong shape {[(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in wrong[:3]]}"
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)


def _existing(path: Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size < 16:
        raise CheckpointError(f"{path}: only {path.stat().st_size} bytes; the checkpoint is truncated")
    return path
