"""Every command's help, as a new user reads it, and a wrong flag's error, in process through ``main(argv)``."""

from __future__ import annotations

import argparse

import pytest

from clipdex.cli import build_parser, main


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(path, parser) for the top-level parser and every subcommand under it, depth first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


COMMANDS = [path for path, _ in _commands(build_parser())]


@pytest.fixture(autouse=True)
def _fixed_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps to the terminal: the same lines on every machine


def test_every_command_is_covered():
    names = {" ".join(p) for p in COMMANDS}
    assert {"world generate", "index", "models", "train", "train-decoder", "eval retrieval", "eval oracle",
            "eval answer", "search", "collections", "demo", "ask", "app"} <= names


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "clipdex")
def test_help_exits_0_and_says_each_default_once_and_plainly(path, capsys):
    with pytest.raises(SystemExit) as e:
        main([*path, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: " + " ".join(("clipdex", *path)))
    flat = " ".join(out.split())  # wrapping may split a phrase over lines
    assert "(default: None)" not in flat
    assert "default: (" not in flat and "default: [" not in flat  # no Python tuple or list reprs
    assert "%(" not in flat
    for line in out.splitlines():
        assert line.count("(default") <= 1, line


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "clipdex")
def test_every_flag_has_a_help_text_with_at_most_one_default(path):
    parser = dict(_commands(build_parser()))[path]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                assert (choice.help or "").strip(), f"{' '.join(path)} {choice.dest}: no help"
            continue
        name = "/".join(action.option_strings) or action.dest
        text = formatter._expand_help(action)
        assert text.strip(), f"clipdex {' '.join(path)} {name}: no help text"
        assert text.count("default:") <= 1, f"{name}: {text}"
        assert "(default: None)" not in text and "default: (" not in text, f"{name}: {text}"


def test_tuple_default_is_shown_as_typed(capsys):
    with pytest.raises(SystemExit):
        main(["train-decoder", "--help"])
    flat = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.45,0.35,0.2)" in flat


def test_computed_defaults_are_explained_and_examples_keep_their_lines(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    flat = " ".join(out.split())
    assert "(default: cores - 1, from 1 to 8)" in flat  # --workers: what None means, said once
    assert "(default: run every epoch)" in flat  # --max-steps
    assert "examples:\n  clipdex train --manifest worlds/w/manifest.parquet --out runs/w\n" in out


@pytest.mark.parametrize(
    "argv, prog",
    [
        (["search", "--nope", "x"], "clipdex search"),
        (["search", "a", "b"], "clipdex search"),
        (["collections", "--nope"], "clipdex collections"),
        (["eval", "retrieval", "--manifest", "m.parquet", "--nope"], "clipdex eval retrieval"),
        (["eval", "--nope", "oracle", "--manifest", "m.parquet"], "clipdex eval"),
        (["world", "generate", "--out", "w", "--nope"], "clipdex world generate"),
        (["train", "--manifest", "m.parquet", "--out", "o", "--nope"], "clipdex train"),
        (["--nope", "models"], "clipdex"),
    ],
)
def test_a_wrong_flag_shows_the_usage_of_the_command_it_was_given_to(argv, prog, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: {prog} [-h]"), err
    wrong = "b" if argv[-1] == "b" else "--nope"
    assert f"{prog}: error: unrecognized arguments: {wrong}\n" in err, err
