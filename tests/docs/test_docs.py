"""The documentation (README.md and docs/**/*.md) against the files and the real command line.

(a) Every relative link ``[text](path)`` or ``[text](path#anchor)`` names an existing file, and
its anchor a heading of that file (GitHub's slug rules).
(b) In code (inline spans and fenced blocks), every ``entitle <command> [<action>]`` and every
``--flag`` after it on the same line exists in the parser of ``pipeline.cli.parser``; a named
query (``entitle query NAME``) exists in ``sql/queries/``.
(c) docs/reference/cli.md documents every command, action, choice and flag of that parser, in
the section whose heading names the command.

Failures name the file, the line and the bad link, command or flag.
"""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.cli.parser import build_parser

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCS_DIR = REPO_ROOT / "docs"
CLI_REFERENCE = DOCS_DIR / "reference" / "cli.md"
QUERIES_DIR = REPO_ROOT / "sql" / "queries"
# Documented once at the top of docs/reference/cli.md instead of in every command's table.
COMMON_FLAGS = frozenset({"-h", "--help", "--json"})

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...
# `entitle` as a command word: `.venv/bin/entitle run` yes; entitle_ledger, entitle://, entitlement_grant no.
ENTITLE_WORD = re.compile(r"(?<![\w.-])entitle(?=\s|$)")
SHELL_SEPARATORS = frozenset({"|", "||", "&", "&&", ";", ">", ">>", "<", "(", ")"})
PLACEHOLDER = re.compile(r"^(<[^>]+>|[A-Z][A-Z0-9_]*|…|\.\.\.)$")


@dataclass(frozen=True)
class DocLine:
    """One line of a Markdown file, and whether it sits inside a fenced code block."""

    path: Path
    number: int
    text: str
    in_fence: bool

    @property
    def where(self) -> str:
        shown = self.path.relative_to(REPO_ROOT) if self.path.is_relative_to(REPO_ROOT) else self.path.name
        return f"{shown}:{self.number}"


def doc_files() -> list[Path]:
    """README.md and every Markdown file under docs/."""
    return [REPO_ROOT / "README.md", *sorted(DOCS_DIR.rglob("*.md"))]


def doc_lines(path: Path) -> list[DocLine]:
    """The file's lines; fence delimiter lines themselves are dropped."""
    lines: list[DocLine] = []
    fence: str | None = None
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        match = FENCE.match(text)
        if match and (fence is None or match.group(1) == fence):
            fence = match.group(1) if fence is None else None
            continue
        lines.append(DocLine(path, number, text, fence is not None))
    return lines


def github_slug(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation but hyphens and spaces dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file (repeated headings get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for line in doc_lines(path):
        match = HEADING.match(line.text)
        if line.in_fence or not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def link_errors(path: Path) -> Iterator[str]:
    """A message for every relative link of ``path`` that does not resolve."""
    for line in doc_lines(path):
        if line.in_fence:
            continue
        prose = INLINE_CODE.sub("code", line.text)
        for target in LINK.findall(prose):
            if EXTERNAL.match(target):
                continue
            file_part, _, anchor = target.partition("#")
            resolved = (path.parent / file_part).resolve() if file_part else path
            if not resolved.exists():
                yield f"{line.where}: link ({target}): {file_part} does not exist"
                continue
            if not anchor:
                continue
            if resolved.suffix != ".md" or resolved.is_dir():
                yield f"{line.where}: link ({target}): an anchor on {file_part}, which is not a Markdown file"
            elif anchor not in anchors(resolved):
                yield f"{line.where}: link ({target}): no heading with anchor #{anchor} in {file_part or path.name}"


# --------------------------------------------------------------------------- commands


def code_fragments(line: DocLine) -> list[str]:
    """The code of a line: each inline code span, or in a fenced block the line split at backticks
    (program output quotes commands as `entitle …`)."""
    if line.in_fence:
        return line.text.split("`")
    return [match.group(2) for match in INLINE_CODE.finditer(line.text)]


def shell_words(text: str) -> list[str]:
    """Shell words of ``text`` up to the first separator (pipe, ``&&``, ``;``, redirect) or comment."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        words = list(lexer)
    except ValueError:  # an unbalanced quote in a shortened example: plain words will do
        words = text.split()
    kept: list[str] = []
    for word in words:
        if word in SHELL_SEPARATORS or word.startswith("#"):
            break
        kept.append(word.strip("[](),"))
    return [word for word in kept if word]


def entitle_calls(text: str) -> Iterator[list[str]]:
    """The arguments of every ``entitle`` command in a piece of code."""
    for match in ENTITLE_WORD.finditer(text):
        yield shell_words(text[match.end() :])


def query_names() -> set[str]:
    """Named analyst queries: sql/queries/<name>.sql and <name>.<dialect>.sql."""
    return {path.name.split(".")[0] for path in QUERIES_DIR.glob("*.sql")}


def options_of(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {option: action for action in parser._actions for option in action.option_strings}


def positionals_of(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [action for action in parser._actions if not action.option_strings]


def check_call(args: list[str], root: argparse.ArgumentParser, queries: set[str]) -> Iterator[str]:
    """What is wrong with ``entitle ARGS`` for the real parser (nothing when it is right)."""
    parser, path = root, ["entitle"]
    positionals, index = positionals_of(parser), 0
    words = iter(args)
    for word in words:
        shown = " ".join(path)
        if word.startswith("-") and len(word) > 1 and not word[1].isdigit():
            option = word.split("=", 1)[0]
            action = options_of(parser).get(option)
            if action is None:
                yield f"`{shown}` has no option {option}"
            elif action.nargs != 0 and "=" not in word:
                next(words, None)  # the option's value
            continue
        if PLACEHOLDER.match(word) and index < len(positionals):
            if isinstance(positionals[index], argparse._SubParsersAction):
                return  # `entitle COMMAND ...`: nothing more can be resolved
            index += 0 if positionals[index].nargs in ("+", "*") else 1
            continue
        if index >= len(positionals):
            if not PLACEHOLDER.match(word):
                yield f"`{shown}` takes no further argument {word!r}"
            continue
        action = positionals[index]
        if isinstance(action, argparse._SubParsersAction):
            if word not in action.choices:
                kind = "command" if parser is root else "action"
                yield f"`{shown}` has no {kind} {word!r} (known: {', '.join(action.choices)})"
                return
            parser = action.choices[word]
            path.append(word)
            positionals, index = positionals_of(parser), 0
            continue
        if action.choices is not None and word not in action.choices:
            yield f"`{shown}` {action.dest} {word!r} is not one of {', '.join(map(str, action.choices))}"
        elif path == ["entitle", "query"] and action.dest == "name" and word not in queries:
            yield f"`entitle query {word}`: no named query {word!r} in sql/queries/"
        if action.nargs not in ("+", "*"):
            index += 1


def command_errors(path: Path, root: argparse.ArgumentParser, queries: set[str]) -> Iterator[str]:
    """A message for every ``entitle`` command or flag in the code of ``path`` the parser does not know."""
    for line in doc_lines(path):
        for fragment in code_fragments(line):
            for args in entitle_calls(fragment):
                for problem in check_call(args, root, queries):
                    yield f"{line.where}: {problem} (in: {fragment.strip()})"


# --------------------------------------------------------------------------- the CLI reference


def resolve_command(words: list[str], root: argparse.ArgumentParser) -> tuple[str, argparse.ArgumentParser] | None:
    """The command path and parser that ``entitle WORDS`` names (stops at the first non-command word)."""
    parser, path = root, ["entitle"]
    for word in words:
        subparsers = [a for a in positionals_of(parser) if isinstance(a, argparse._SubParsersAction)]
        if not subparsers or word not in subparsers[0].choices:
            break
        parser = subparsers[0].choices[word]
        path.append(word)
    return (" ".join(path), parser) if len(path) > 1 else None


def all_commands(root: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every command and action of the parser, with its own parser (``entitle pass apply``, ...)."""
    stack = [("entitle", root)]
    while stack:
        name, parser = stack.pop()
        for action in positionals_of(parser):
            if isinstance(action, argparse._SubParsersAction):
                for word, child in action.choices.items():
                    stack.append((f"{name} {word}", child))
                    yield f"{name} {word}", child


def documented_sections(root: argparse.ArgumentParser) -> dict[str, tuple[DocLine, set[str]]]:
    """Per command heading of cli.md: the heading's line and the inline code of its table rows' first cells."""
    sections: dict[str, tuple[DocLine, set[str]]] = {}
    current: str | None = None
    for line in doc_lines(CLI_REFERENCE):
        if line.in_fence:
            continue
        heading = HEADING.match(line.text)
        if heading:
            current = None
            for code in INLINE_CODE.finditer(heading.group(2)):
                for args in entitle_calls(code.group(2)):
                    resolved = resolve_command(args, root)
                    if resolved is not None:
                        current = resolved[0]
                        sections[current] = (line, set())
            continue
        if current is not None and line.text.lstrip().startswith("|"):
            first_cell = line.text.strip().strip("|").split("|")[0]
            for code in INLINE_CODE.finditer(first_cell):
                sections[current][1].update(code.group(2).replace(",", " ").split())
    return sections


def reference_errors(root: argparse.ArgumentParser) -> Iterator[str]:
    """What docs/reference/cli.md leaves out of the parser, or documents that the parser lacks."""
    where = CLI_REFERENCE.relative_to(REPO_ROOT)
    text = CLI_REFERENCE.read_text(encoding="utf-8")
    for flag in sorted(COMMON_FLAGS - {"-h"}):
        if f"`{flag}`" not in text:
            yield f"{where}: the common flag `{flag}` is not documented"
    sections = documented_sections(root)
    for name, parser in all_commands(root):
        if name not in sections:
            yield f"{where}: no section (a heading with `{name}`) documents the command `{name}`"
            continue
        line, documented = sections[name]
        wanted = {o for o in options_of(parser) if o.startswith("--")} - COMMON_FLAGS
        for action in positionals_of(parser):
            if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
                wanted |= {str(choice) for choice in action.choices}
        for missing in sorted(wanted - documented):
            yield f"{line.where}: the section of `{name}` has no table row for {missing}"
        for extra in sorted(w for w in documented - wanted if w.startswith("-")):
            if extra not in COMMON_FLAGS:
                yield f"{line.where}: the section of `{name}` documents {extra}, which `{name}` does not have"


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return build_parser()


def test_docs_exist() -> None:
    files = doc_files()
    assert (REPO_ROOT / "README.md") in files and CLI_REFERENCE in files, [str(f) for f in files]
    assert len(files) > 10, "docs/ holds fewer pages than expected: did the glob find them?"


def test_relative_links_resolve() -> None:
    errors = [error for path in doc_files() for error in link_errors(path)]
    assert not errors, "broken links:\n" + "\n".join(errors)


def test_entitle_commands_and_flags_exist(parser: argparse.ArgumentParser) -> None:
    queries = query_names()
    errors = [error for path in doc_files() for error in command_errors(path, parser, queries)]
    assert not errors, "commands or flags the `entitle` parser does not have:\n" + "\n".join(errors)


def test_cli_reference_covers_the_parser(parser: argparse.ArgumentParser) -> None:
    errors = list(reference_errors(parser))
    assert not errors, "docs/reference/cli.md and the parser disagree:\n" + "\n".join(errors)


# --------------------------------------------------------------------------- the checks themselves


def test_checks_catch_a_bad_link_and_a_bad_flag(tmp_path: Path, parser: argparse.ArgumentParser) -> None:
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other page\n\n## Section `two`, here\n", encoding="utf-8")
    page.write_text(
        "# Page\n\n"
        "[ok](other.md) [ok](other.md#section-two-here) [ok](#page) [web](https://example.org/x)\n"
        "[bad](missing.md) [bad anchor](other.md#nothing)\n\n"
        "```sh\n# a comment, not a heading\nentitle run --users u.parquet --exclude b.csv | head -n 3\n"
        "entitle grant --only-faild\n```\n\n"
        "Run `entitle pass status --user 1`, `entitle pass allot` and `entitle query no_such_query`.\n",
        encoding="utf-8",
    )
    assert list(link_errors(page)) == [
        "page.md:4: link (missing.md): missing.md does not exist",
        "page.md:4: link (other.md#nothing): no heading with anchor #nothing in other.md",
    ]
    assert anchors(page) == {"page"}  # the comment inside the fence is no heading
    assert list(command_errors(page, parser, query_names())) == [
        "page.md:9: `entitle grant` has no option --only-faild (in: entitle grant --only-faild)",
        "page.md:12: `entitle pass` has no action 'allot' (known: apply, allocate, status, reconcile, reminders)"
        " (in: entitle pass allot)",
        "page.md:12: `entitle query no_such_query`: no named query 'no_such_query' in sql/queries/"
        " (in: entitle query no_such_query)",
    ]


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("Rerun failed partitions", "rerun-failed-partitions"),
        ("`entitle db upgrade`: one transaction", "entitle-db-upgrade-one-transaction"),
        ("Exit codes (0–70)", "exit-codes-070"),
        ("What `--only-failed` does", "what---only-failed-does"),
        ("ENTITLE_HOME and ENTITLE_DATA_URI", "entitle_home-and-entitle_data_uri"),
    ],
)
def test_github_slug(heading: str, slug: str) -> None:
    assert github_slug(heading) == slug


@pytest.mark.parametrize(
    ("code", "calls"),
    [
        (".venv/bin/entitle status --all", [["status", "--all"]]),
        (
            "ENTITLE_CAMPAIGN=channel-credit-2022 entitle plan --users m.parquet  # dry",
            [["plan", "--users", "m.parquet"]],
        ),
        ("entitle query open_reviews | head -n 8", [["query", "open_reviews"]]),
        ('entitle void --user 1 --reason "fraud case 118"', [["void", "--user", "1", "--reason", "fraud case 118"]]),
        ("airflow connections add entitle_ledger; airflow dags trigger entitlement_grant", []),
        (
            "entitle pass apply --from a.csv [--from …] [--json]",
            [["pass", "apply", "--from", "a.csv", "--from", "…", "--json"]],
        ),
    ],
)
def test_entitle_calls(code: str, calls: list[list[str]]) -> None:
    assert list(entitle_calls(code)) == calls
