"""What every subcommand's parser shares: the parser and help formatter, argparse value types, help texts.

:class:`CommandParser` is the top-level parser (``cli.build_parser`` makes it) and :class:`SubcommandParser`
the class of every subcommand's parser under it: help in :class:`HelpFormatter`'s one style, and an unknown
flag reported with the usage of the subcommand it was given to.
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable


class HelpFormatter(argparse.HelpFormatter):
    """One help style for every command: prose wrapped, examples as written, each default said once.

    A description or epilog paragraph (paragraphs are separated by a blank line) written on one line is
    wrapped to the terminal, never at a hyphen; one written on several lines (examples) is kept as written.
    ``(default: X)`` is added to a flag's help unless the help already says ``default:`` (the way to explain
    a default that is computed or None, e.g. ``(default: cores - 1)``), the flag is a switch, or the
    default is None. Sequences are shown as typed on the command line (``0.45,0.35,0.2``), never as reprs.
    """

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for para in text.split("\n\n"):
            if "\n" in para.strip("\n"):  # laid out by hand: keep it
                paragraphs.append("".join(indent + line for line in para.splitlines(keepends=True)))
            else:
                lines = self._split_lines(para, width - len(indent))
                paragraphs.append("\n".join(indent + line for line in lines))
        return "\n\n".join(paragraphs)

    def _split_lines(self, text: str, width: int) -> list[str]:
        # never inside a flag, a path or a model name: no breaks at hyphens, no broken words
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False, break_long_words=False)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default:" in text or "%(default)" in text or not action.option_strings or action.nargs == 0
                or action.default is None or action.default is argparse.SUPPRESS):
            return text
        return f"{text} (default: {_shown_default(action.default).replace('%', '%%')})"


def _shown_default(value: object) -> str:
    """A default as a user would type it: ``a,b`` for sequences, ``''`` for the empty string."""
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    if value == "":
        return "''"
    return str(value)


class CommandParser(argparse.ArgumentParser):
    """The top-level ``clipdex`` parser: help in :class:`HelpFormatter`'s style, subcommands as
    :class:`SubcommandParser`."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_subparsers(self, **kwargs) -> argparse._SubParsersAction:
        """argparse's ``add_subparsers``, whose parsers are :class:`SubcommandParser` unless told otherwise."""
        kwargs.setdefault("parser_class", SubcommandParser)
        return super().add_subparsers(**kwargs)


class SubcommandParser(CommandParser):
    """A subcommand's parser: an argument it does not know is its own error, shown with its own usage.

    argparse hands a subcommand's unknown arguments up to the top-level parser, which reports them with the
    top-level usage (``clipdex [-h] ... COMMAND``); here ``clipdex search --nope`` prints ``clipdex search``'s
    usage, and ``clipdex eval retrieval --nope`` that of ``clipdex eval retrieval``. No clipdex command passes
    arguments through to anything else, so nothing is lost.
    """

    def parse_known_args(self, args=None, namespace=None) -> tuple[argparse.Namespace, list[str]]:
        """Parse ``args``; an argument this subcommand does not know exits with its usage (status 2)."""
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def _at_least(minimum, convert, what: str, name: str) -> Callable[[str], float]:
    """An argparse ``type``: ``convert(text)`` when it is >= ``minimum``, else a message that says what is wanted."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not value >= minimum:  # also refuses nan
            raise argparse.ArgumentTypeError(f"expected a number >= {minimum:g}, got {text}")
        return value

    parse.__name__ = name
    return parse


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` accepting whole numbers >= ``minimum``, with a message that says so."""
    return _at_least(minimum, int, "a whole number", f"int>={minimum}")


def float_at_least(minimum: float) -> Callable[[str], float]:
    """An argparse ``type`` accepting numbers >= ``minimum`` (fractions too), with a message that says so."""
    return _at_least(minimum, float, "a number", f"float>={minimum:g}")


SPEC_HELP = ("model spec: a built-in name (clipdex-world), ARCH:TAG (ViT-B-32:laion2b_s34b_b79k), ARCH:random, "
             "ARCH:/path/weights.pt, hf-hub:ORG/REPO, or a checkpoint path")
def read_first_line(path: str, *, flag: str) -> str:
    """The first line of a secret file named by ``flag`` (a password or token file); empty if the file is;
    ClipdexError naming the flag when it cannot be read."""
    from pathlib import Path

    from clipdex.exceptions import ClipdexError

    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ClipdexError(f"{flag} {path}: cannot read it ({e})") from e
    return lines[0] if lines else ""


RUNTIMES = ("torch", "onnx", "auto")  # what --runtime takes (retrieval.models.encoder.RUNTIMES, without importing torch)
RUNTIME_HELP = ("what runs the encoder's towers: auto (default: on the CPU, the text tower in ONNX Runtime and the "
                "image tower in PyTorch, the faster of each here; the text export is made once per model and cached, "
                "and a search with a cached one starts without PyTorch), onnx (both towers in ONNX Runtime), torch "
                "(PyTorch only). Exports are checked against PyTorch fp32 (cosine >= 0.9999) and kept in "
                "$CLIPDEX_CACHE/onnx (default ~/.cache/clipdex/onnx)")
DEVICE_HELP = "where the model runs: auto (cuda if available, else cpu), cpu, cuda, cuda:1"
PRECISION_HELP = ("GPU arithmetic: auto and bf16 use bf16 autocast on CUDA, fp16 float16 autocast, fp32 none; "
                  "the CPU runs fp32, or with int8 the image tower quantised to int8 in ONNX Runtime (about 2x the "
                  "images/s; embeddings at cosine >= 0.99 to fp32, checked; a collection keeps the image precision it "
                  "was made with)")
WORKERS_HELP = "image decoding processes; 0 decodes in the main process (default: cores - 1, from 1 to 8)"
