"""The CLI: the JSON contracts, the shipped default, the oracle, errors (the demo and fine-tuning: test_cli_long.py)."""

import json

import pytest

from conftest import run_cli

KEYS = {"recall@1", "recall@5", "recall@10"}


def test_help_teaches():
    out = run_cli("--help").stdout  # in process: a real start-up is shown by each command family's subprocess
    for word in ("world", "train", "eval", "models", "demo", "index", "search", "collections", "examples:"):
        assert word in out
    assert "--time-budget" in run_cli("train", "--help").stdout


def test_models_json_lists_builtin_and_forms():
    data = json.loads(run_cli("models", "--json").stdout)
    assert "clipdex-world" in data["builtin"]
    assert {"clipdex-s", "clipdex-tiny"} <= set(data["clipdex_architectures"])
    assert "ViT-B-32" in data["open_clip_architectures"]


@pytest.mark.slow
def test_shipped_default_finds_unseen_scenes(tiny_world):
    """The embedded default on a world generated with a seed it was not trained on (JSON contract too)."""
    out = json.loads(run_cli("eval", "retrieval", "--model", "clipdex-world", "--manifest", str(tiny_world),
                             "--split", "test", "--gallery", "200", "--json").stdout)
    assert out["model"] == "clipdex-world" and out["gallery"] == 200
    assert set(out["t2i"]) == KEYS and set(out["i2t"]) == KEYS and set(out["foil"]) == {"relation", "attribute", "by_kind"}
    assert out["t2i"]["recall@5"] >= 0.95, out
    assert out["i2t"]["recall@5"] >= 0.9, out
    assert out["foil"]["attribute"] >= 0.85, out
    table = run_cli("eval", "retrieval", "--model", "clipdex-world", "--manifest", str(tiny_world),
                    "--split", "test", "--gallery", "20").stdout
    assert "text->image" in table and "relation" in table


def test_oracle_command(tiny_world):
    out = json.loads(run_cli("eval", "oracle", "--manifest", str(tiny_world), "--split", "test",
                             "--gallery", "200", "--json").stdout)
    assert out["model"] == "oracle" and out["gallery"] == 200
    assert out["t2i"]["recall@1"] >= 0.95 and out["i2t"]["recall@1"] >= 0.95


@pytest.mark.parametrize(
    "args, says",
    [
        (["eval", "retrieval", "--model", "nope", "--manifest", "x.parquet"], "unknown model"),
        (["eval", "retrieval", "--model", "clipdex-world", "--manifest", "/no/such.parquet"], "manifest not found"),
        (["eval", "retrieval", "--model", "/no/such/model.safetensors", "--manifest", "x.parquet"], "not found"),
    ],
)
def test_bad_input_gives_one_clear_line(args, says, tmp_path):
    proc = run_cli(*args, check=False, cwd=tmp_path)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("clipdex: error:") and says in last and "Traceback" not in proc.stderr, proc.stderr
