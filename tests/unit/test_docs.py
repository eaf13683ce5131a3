"""The docs against the code: every `headbench ...` command line in the README and docs/ parses against the
real CLI (an unknown command, option or extra argument fails), every relative link and every repository path
they name exists, the counts they cite are computed here, and they read as a description of the code now
(no dated run logs, no history)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
import typer.main

from flows.cli import app
from infra.data.catalogue import CATALOGUE
from models.strategies import DEMO_STRATEGIES

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
FENCE = re.compile(r"```[^\n]*\n(.*?)```", re.S)
INLINE = re.compile(r"`(headbench [^`]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
REPO_PATH = re.compile(r"`((?:docs|infra|models|flows|tasks|bench|tools|tests|\.ci)/[\w./-]+)(?:::[^`]*)?`")
WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9}
# history in docs: git keeps it (a dated run, "no longer", the morning a figure was taken, issue numbers)
HISTORY = re.compile(r"\b(20\d\d-\d\d-\d\d|no longer|used to|that day|the same morning|issue \d+|an earlier|"
                     r"(this|first|earlier|next) session)\b", re.I)


def _commands(line: str) -> list[str]:
    """A shell line's commands: split at `&&` and `;` outside quotes."""
    parts, current, quote, i = [], "", "", 0
    while i < len(line):
        char = line[i]
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == ";" or line.startswith("&&", i):
            parts.append(current)
            current, i = "", i + (2 if char == "&" else 1)
            continue
        current += char
        i += 1
    return [p.strip() for p in [*parts, current] if p.strip().startswith("headbench")]


def _lines(text: str) -> list[str]:
    """`headbench ...` lines: in fenced blocks (continuations joined, comments dropped) and in inline code."""
    found = []
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            found += _commands(line)
    found += [command for span in INLINE.findall(text) for command in _commands(span)]
    return [line for line in found if not line.startswith("headbench COMMAND")]  # the synopsis of any command


def _args(line: str) -> list[str]:
    """The line as argv for the CLI: placeholders (<run id>, N, IMAGE...) become a value, [optional] groups
    are kept as options, synopsis words ([options], [run options]) and `...` dropped."""
    line = re.sub(r"<[^>]*>", "1", line.replace("\\|", "|"))
    line = re.sub(r"\[([a-z ]+)\]", " ", line)  # [options], [run options]
    line = line.replace("[", " ").replace("]", " ")
    tokens = shlex.split(line, comments=True)[1:]
    out = []
    for token in tokens:
        token = token.removesuffix("...")
        if not token:
            continue
        out.append("1" if re.fullmatch(r"[A-Z][A-Z0-9_]*", token) else token)
    return out


def _parse(args: list[str]) -> None:
    """Parse ``args`` as `headbench` would, without running anything: raises typer's usage error (typer
    vendors click; only its public exception types are used here)."""
    group = typer.main.get_command(app)
    commands = group.commands  # type: ignore[attr-defined]
    if not args or args[0] == "--help":
        return
    assert args[0] in commands, f"no command {args[0]!r}; the CLI has {', '.join(commands)}"
    try:
        commands[args[0]].make_context(args[0], args[1:])
    except typer.Exit:
        pass  # --help
    except typer.BadParameter as exc:
        if type(exc).__name__ != "MissingParameter":  # a partial line (`predict --model ...`, no images) is fine
            raise


def _cases() -> list[tuple[str, str]]:
    return [(path.relative_to(ROOT).as_posix(), line) for path in DOCS for line in _lines(path.read_text())]


@pytest.mark.parametrize("doc, line", _cases())
def test_every_command_line_in_the_docs_parses_against_the_cli(doc: str, line: str) -> None:
    _parse(_args(line))


def test_a_made_up_option_fails_the_check() -> None:
    with pytest.raises(typer.TyperException, match="No such option: --no-such-option"):
        _parse(_args("headbench run --epochs 2 --no-such-option 3"))
    with pytest.raises(typer.TyperException, match="unexpected extra argument"):
        _parse(_args("headbench compare --strategies a,b stray-argument"))
    with pytest.raises(typer.BadParameter, match="valid integer"):
        _parse(_args("headbench run --epochs two"))


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_and_named_path_exists(path: Path) -> None:
    text = path.read_text()
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        assert linked.exists(), f"{path.name}: link to {target} ({linked}) does not exist"
        if anchor and linked.suffix == ".md":
            anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", linked.read_text(), re.M)}
            assert anchor in anchors, f"{path.name}: no heading #{anchor} in {linked.name}"
    for named in REPO_PATH.findall(text):
        assert (ROOT / named.rstrip(".")).exists(), f"{path.name} names {named}, which does not exist"


def test_the_counts_the_docs_cite_are_the_codes() -> None:
    text = "\n".join(p.read_text() for p in DOCS)
    demo = [WORDS[m] for m in re.findall(r"\b(\w+) (?:head )?strategies (?:compared|\(the two common)", text)
            if m in WORDS]
    assert demo and set(demo) == {len(DEMO_STRATEGIES)}, demo
    for count in re.findall(r"\b(\d+) named datasets\b", text):
        assert int(count) == len(CATALOGUE)
    # a number of tests goes stale with the next test: the docs give times, never typed test counts
    assert not re.search(r"\b\d[\d,]* (unit |integration |slow )?tests\b", text), "a typed count of tests"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_the_docs_describe_the_code_now(path: Path) -> None:
    text = path.read_text()
    assert not HISTORY.findall(text), HISTORY.findall(text)
    assert not re.search(r"127\.0\.0\.1:\d+/#/experiments/\d+/runs/", text), "a link to one run on a local server"
