"""The documentation stays navigable and true to the code.

Checked here: every relative link in README.md, SECURITY.md and docs/ reaches a file (and a heading, for
``#anchor`` links, by GitHub's slug rules); every ``make`` target and every ``python -m`` command of the
project's own modules shown in a code block or code span exists, down to its subcommands and flags, in the
Makefile or the module's real argparse parser (``build_parser()``); the architecture page maps every
engine module and the metrics table every exported family; and the pages stay short enough to read.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README_LINES = 200
PAGE_LINES = 300

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_CODE_SPAN = re.compile(r"`([^`]+)`")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
# A shell line that runs one of our commands: optional VAR=value words, then python -m or make.
_COMMAND_START = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)*(?:\S*/)?(?:python3?|make|locust)(?:\s|$)")
_PYTHONS = {"python", "python3"}
_OPERATORS = {"&&", "||", ";", "|"}


def doc_files() -> list[Path]:
    """The documentation a reader navigates: the README, the security pointer and every page in docs/."""
    return [ROOT / "README.md", ROOT / "SECURITY.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# --- Markdown: prose, code, headings, links ---------------------------------------------------------------


def split_markdown(text: str) -> tuple[str, list[str]]:
    """The prose of a Markdown text (fenced blocks blanked, so line numbers stay) and its fenced blocks."""
    prose, blocks, block, fence = [], [], [], None
    for line in text.splitlines():
        marker = _FENCE.match(line)
        if fence is None and marker:
            fence, block = marker.group(1), []
            prose.append("")
        elif fence is not None and line.strip().startswith(fence):
            fence = None
            blocks.append("\n".join(block))
            prose.append("")
        elif fence is not None:
            block.append(line)
            prose.append("")
        else:
            prose.append(line)
    return "\n".join(prose), blocks


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: link syntax reduced to its text, lower case, punctuation dropped
    (letters, digits, ``_`` and ``-`` stay), each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a Markdown text, repeated headings numbered as GitHub numbers them."""
    prose, _ = split_markdown(text)
    seen: dict[str, int] = {}
    found = set()
    for line in prose.splitlines():
        match = _HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links(text: str) -> list[str]:
    """Link targets in the prose: inline links and reference definitions, code spans excluded."""
    prose, _ = split_markdown(text)
    prose = _CODE_SPAN.sub("``", prose)
    return [m.group(1) for m in _LINK.finditer(prose)] + [m.group(1) for m in _REFERENCE.finditer(prose)]


def broken_links(path: Path) -> list[str]:
    """What is wrong with each relative link of ``path``: a missing file, or a missing heading."""
    problems = []
    for target in links(path.read_text()):
        if _SCHEME.match(target) or target.startswith("//"):
            continue  # http(s), mailto: the outside world is not checked here
        file_part, _, anchor = target.partition("#")
        if file_part.startswith("/"):
            problems.append(f"{target}: use a path relative to {path.name}, not an absolute one")
            continue
        destination = (path.parent / file_part).resolve() if file_part else path
        if not destination.exists():
            problems.append(f"{target}: no such file {_name(destination)}")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination.read_text()):
            problems.append(f"{target}: {_name(destination)} has no heading with anchor #{anchor}")
    return problems


# --- Commands shown in the docs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    tokens: tuple[str, ...]
    source: str  # the line as shown, for messages


def shown_commands(text: str) -> Iterator[Command]:
    """Every shell command of ours shown in a fenced block (``$`` prompts and ``\\`` continuations
    understood) or in a code span of the prose, split at ``&&``, ``;`` and pipes."""
    prose, blocks = split_markdown(text)
    lines = [m.group(1).replace("\n", " ") for m in _CODE_SPAN.finditer(prose)]
    for block in blocks:
        lines += re.sub(r"\s*\\\n\s*", " ", block).splitlines()
    for line in lines:
        line = re.sub(r"^\s*\$\s+", "", line).strip()
        if not _COMMAND_START.match(line):
            continue
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError as exc:
            raise AssertionError(f"cannot split the shown command {line!r}: {exc}") from exc
        segment: list[str] = []
        for token in [*tokens, ";"]:
            if token not in _OPERATORS:
                segment.append(token)
                continue
            while segment and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", segment[0]):
                segment.pop(0)  # VAR=value before the command
            if segment:
                yield Command(tuple(segment), line)
            segment = []


def make_targets(makefile: Path) -> set[str]:
    """Targets the Makefile defines (rules and .PHONY names; pattern and variable targets left out)."""
    targets = set()
    for line in makefile.read_text().splitlines():
        match = re.match(r"^([^\s#:=$][^:=]*?)\s*::?(?!=)", line)
        if match:
            targets.update(match.group(1).split())
        if line.startswith(".PHONY:"):
            targets.update(line.partition(":")[2].replace("\\", " ").split())
    return {target for target in targets if not target.startswith(".")}


def module_parser(module: str) -> argparse.ArgumentParser:
    """The argparse parser of ``python -m <module>``: its ``build_parser()``."""
    name = f"{module}.__main__" if module in ("tools", "validation") else module
    builder = getattr(importlib.import_module(name), "build_parser", None)
    if builder is None:
        raise AssertionError(f"{name} has no build_parser(): docs show `python -m {module}`, give it one to check")
    return builder()


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def command_problems(tokens: tuple[str, ...], parser: argparse.ArgumentParser) -> list[str]:
    """Options and subcommands of ``tokens`` (the arguments after the module) that ``parser`` does not know.
    Placeholders (``ADAPTER_DIR``, ``N``) and optional-part brackets (``[--json]``) are allowed."""
    problems = []
    subcommands, chosen = _subcommands(parser), None
    words = [word for word in (token.strip("[]") for token in tokens) if word and word != "..."]
    index = 0
    while index < len(words):
        word = words[index]
        if word.startswith("-") and word != "-":
            option = word.partition("=")[0]
            action = (chosen or parser)._option_string_actions.get(option)
            if action is None and chosen is not None:
                action = parser._option_string_actions.get(option)
            if action is None:
                problems.append(f"unknown option {option}" + (f" of {chosen.prog}" if chosen else ""))
            elif "=" not in word and action.nargs != 0:
                index += 1  # its value
        elif subcommands and chosen is None:
            if word not in subcommands:
                problems.append(f"unknown subcommand {word!r} (known: {', '.join(sorted(subcommands))})")
                return problems
            chosen = subcommands[word]
        index += 1
    return problems


def locust_problems(args: list[str]) -> list[str]:
    """Locust's own options are locust's; ours (``--peft-*``) must be declared by the locustfiles given with
    ``-f``, which must exist. (Importing locust here would monkey-patch the test process with gevent.)"""
    files = args[args.index("-f") + 1].split(",") if "-f" in args else []
    problems = [f"no locustfile {name}" for name in files if not (ROOT / name).is_file()]
    declared = "".join((ROOT / name).read_text() for name in files if (ROOT / name).is_file())
    ours = [word.partition("=")[0] for word in args if word.startswith("--peft-")]
    return problems + [f"unknown option {option}" for option in ours if f'"{option}"' not in declared]


def invalid_commands(path: Path, targets: set[str]) -> list[str]:
    problems = []
    for command in shown_commands(path.read_text()):
        program, *args = command.tokens
        if Path(program).name == "make":
            problems += [
                f"{command.source}: no make target {target!r}"
                for target in args
                if not target.startswith("-") and "=" not in target and target not in targets
            ]
        elif Path(program).name == "locust":
            problems += [f"{command.source}: {p}" for p in locust_problems(args)]
        elif Path(program).name in _PYTHONS and args[:1] == ["-m"] and len(args) > 1:
            module = args[1]
            if module in ("tools", "validation") or module.startswith(("tools.", "loadtests.")):
                try:
                    parser = module_parser(module)
                except AssertionError as exc:
                    problems.append(f"{command.source}: {exc}")
                    continue
                problems += [f"{command.source}: {p}" for p in command_problems(tuple(args[2:]), parser)]
    return problems


# --- The tests --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", doc_files(), ids=_name)
def test_relative_links_resolve(path: Path) -> None:
    problems = broken_links(path)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", doc_files(), ids=_name)
def test_shown_commands_exist(path: Path) -> None:
    problems = invalid_commands(path, make_targets(ROOT / "Makefile"))
    assert not problems, "\n".join(problems)


def test_readme_and_pages_stay_short() -> None:
    lengths = {path: len(path.read_text().splitlines()) for path in doc_files()}
    assert lengths[ROOT / "README.md"] < README_LINES
    too_long = {_name(p): n for p, n in lengths.items() if p.parent != ROOT and n >= PAGE_LINES}
    assert too_long == {}, f"pages of {PAGE_LINES} lines or more: split them"


def test_table_of_contents_lists_every_page() -> None:
    index = ROOT / "docs" / "README.md"
    listed = {(index.parent / target.partition("#")[0]).resolve() for target in links(index.read_text())}
    pages = {page.resolve() for page in (ROOT / "docs").rglob("*.md") if page != index}
    assert sorted(_name(page) for page in pages - listed) == []


def test_architecture_maps_every_engine_module() -> None:
    page = (ROOT / "docs" / "architecture.md").read_text()
    modules = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "peftserve").rglob("*.py"))]
    missing = [m for m in modules if Path(m).name != "__init__.py" and f"(../{m})" not in page]
    assert missing == [], "add these modules to the module map of docs/architecture.md"


def test_metrics_table_lists_every_family() -> None:
    """The metrics table of docs/deployment.md names exactly the families the Triton model exports (read from
    the source: the module imports pb_utils, which exists only inside Triton)."""
    source = ast.parse((ROOT / "peftserve" / "triton" / "metrics.py").read_text())
    assignment = next(
        node
        for node in source.body
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "FAMILIES" for t in node.targets)
    )
    exported = set(ast.literal_eval(assignment.value))
    documented = set(re.findall(r"^\| `(peftserve_\w+)` \|", (ROOT / "docs" / "deployment.md").read_text(), re.M))
    assert documented == exported


# --- The checks themselves can fail -----------------------------------------------------------------------


def test_slugs_follow_github() -> None:
    assert github_slug("Supported architectures (`python -m tools.support_matrix`)") == (
        "supported-architectures-python--m-toolssupport_matrix"
    )
    assert github_slug("Guards: keys ([SECURITY.md](SECURITY.md))") == "guards-keys-securitymd"
    assert anchors("# A\n## A\n```\n## not a heading\n```\n## B.c") == {"a", "a-1", "bc"}


def test_broken_links_are_found(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Present heading\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#present-heading) [web](https://example.com) `[code](missing.md)`\n"
        "[gone](missing.md) [bad anchor](other.md#absent) [here](#top)\n"
        "```\n[in a block](missing.md)\n```\n"
    )
    assert broken_links(page) == [
        "missing.md: no such file " + str(tmp_path / "missing.md"),
        "other.md#absent: " + str(tmp_path / "other.md") + " has no heading with anchor #absent",
        "#top: " + str(page) + " has no heading with anchor #top",
    ]


def test_unknown_subcommands_flags_and_targets_are_found(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "Run `make serve MODEL=smollm2` or `make no-such-target`.\n"
        "```console\n"
        "$ python -m tools --config x.yaml publish pirate ./dir --force   # a comment --nope\n"
        "$ .venv/bin/python -m tools publish pirate ./dir --no-such-flag\n"
        "$ python -m tools no-such-command\n"
        "$ python -m tools.client --adapter robot \\\n    --bogus 'a dog'\n"
        "$ python -m validation ADAPTER_DIR --base-model BASE [--json] [--load]\n"
        "$ locust -f loadtests/locustfile.py,loadtests/shapes/none.py --headless --peft-pattern zipf --peft-x 1\n"
        "```\n"
    )
    assert invalid_commands(page, make_targets(ROOT / "Makefile")) == [
        "make no-such-target: no make target 'no-such-target'",
        ".venv/bin/python -m tools publish pirate ./dir --no-such-flag: unknown option --no-such-flag of "
        "python -m tools publish",
        "python -m tools no-such-command: unknown subcommand 'no-such-command' (known: adapters, health, "
        "history, hot-swap, metrics, model-rollback, model-swap, publish, rollback, serve, status, validate)",
        "python -m tools.client --adapter robot --bogus 'a dog': unknown option --bogus",
        "locust -f loadtests/locustfile.py,loadtests/shapes/none.py --headless --peft-pattern zipf --peft-x 1: "
        "no locustfile loadtests/shapes/none.py",
        "locust -f loadtests/locustfile.py,loadtests/shapes/none.py --headless --peft-pattern zipf --peft-x 1: "
        "unknown option --peft-x",
    ]
