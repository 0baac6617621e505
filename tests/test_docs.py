"""The docs cannot drift from the code: the CLI reference lists exactly the commands and flags of the
real parser, the config reference exactly the keys, types and defaults of PipelineConfig, README fits
a newcomer (under 200 lines, a two-command Quickstart), and every relative link points somewhere."""

from __future__ import annotations

import argparse
import re
import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from flows.cli import build_parser
from visionflow.config import PipelineConfig

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CLI_REFERENCE = ROOT / "docs" / "reference" / "cli.md"
CONFIG_REFERENCE = ROOT / "docs" / "reference" / "config.md"
MAX_README_LINES = 200
QUICKSTART = ["make run", "make test"]

HEADING = re.compile(r"^(#{1,6}) +(.+?) *$", re.MULTILINE)
TABLE_ROW = re.compile(r"^\|(.+)\|\s*$", re.MULTILINE)
CODE = re.compile(r"`([^`]+)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict[str, set[str]]:
    """'visionflow server start' -> the option strings and positional names it takes (not --help),
    for the parser and every sub-command below it."""
    found: dict[str, set[str]] = {" ".join(("visionflow", *path)): set()}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(commands(sub, (*path, name)))
        elif isinstance(action, argparse._HelpAction):
            continue
        elif action.option_strings:
            found[" ".join(("visionflow", *path))].update(action.option_strings)
        else:
            found[" ".join(("visionflow", *path))].add(action.metavar or action.dest)
    return found


def cells(row: str) -> list[str]:
    """A table row's cells, split at unescaped pipes (`a \\| b` stays one cell)."""
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", row)]


def sections(text: str) -> dict[str, str]:
    """Heading text (backticks removed) -> the text up to the next heading."""
    text = FENCE.sub("", text)
    heads = list(HEADING.finditer(text))
    ends = [h.start() for h in heads[1:]] + [len(text)]
    return {h.group(2).replace("`", ""): text[h.end() : end] for h, end in zip(heads, ends)}


def documented(section: str) -> set[str]:
    """Every backticked name in the first cells of the section's tables, header rows left out."""
    first: list[str] = []
    for table in re.split(r"\n\s*\n", section):
        first += [cells(row)[0] for row in TABLE_ROW.findall(table)][2:]  # header and its rule
    return {name for cell in first for name in CODE.findall(cell)}


def test_cli_reference_lists_every_command_and_flag_of_the_parser():
    documented_sections = sections(CLI_REFERENCE.read_text())
    for command, flags in commands(build_parser()).items():
        assert command in documented_sections, f"{CLI_REFERENCE.name} has no section '## `{command}`'"
        assert documented(documented_sections[command]) == flags, (
            f"{CLI_REFERENCE.name}, `{command}`: the table's first column must name exactly {sorted(flags)}"
        )
    extra = {s for s in documented_sections if s.startswith("visionflow")} - set(commands(build_parser()))
    assert not extra, f"{CLI_REFERENCE.name} documents commands the CLI does not have: {sorted(extra)}"


def type_name(annotation: object) -> str:
    """A field's type as the config reference writes it: int, float | None, "skip" | "fail"."""
    if typing.get_origin(annotation) is typing.Literal:
        return " | ".join(f'"{value}"' if isinstance(value, str) else str(value) for value in annotation.__args__)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " | ".join(type_name(arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    return str(annotation) if typing.get_args(annotation) else annotation.__name__


def config_fields(model: type[BaseModel], prefix: str = "") -> dict[str, tuple[str, str]]:
    """Every leaf field of the config, dotted -> (type, default) as the reference's table shows them."""
    fields: dict[str, tuple[str, str]] = {}
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            fields.update(config_fields(field.annotation, f"{prefix}{name}."))
        else:
            default = field.get_default(call_default_factory=True)
            fields[f"{prefix}{name}"] = (type_name(field.annotation), repr(default).replace("'", '"'))
    return fields


def test_config_reference_lists_every_key_with_its_type_and_default():
    rows = {}
    for row in TABLE_ROW.findall(CONFIG_REFERENCE.read_text()):
        key, kind, default, *_ = cells(row) + ["", "", ""]
        names = CODE.findall(key)
        if names and "." in names[0]:
            rows[names[0]] = (kind.strip("`").replace("\\|", "|"), default.strip("`"))
    expected = config_fields(PipelineConfig)
    assert set(rows) == set(expected), (
        f"{CONFIG_REFERENCE.name}: missing keys {sorted(set(expected) - set(rows))}, "
        f"unknown keys {sorted(set(rows) - set(expected))}"
    )
    for key, (kind, default) in expected.items():
        escaped = kind.replace("|", "\\|")
        assert rows[key] == (kind, default), (
            f"{CONFIG_REFERENCE.name}: the row of {key} must start | `{key}` | `{escaped}` | `{default}` |"
        )


def test_readme_fits_a_newcomer_with_a_two_command_quickstart():
    text = README.read_text()
    assert len(text.splitlines()) < MAX_README_LINES, f"README.md has {len(text.splitlines())} lines"
    quickstart = re.search(r"^## Quickstart\n(.*?)^## ", text, re.MULTILINE | re.DOTALL)
    assert quickstart, "README.md has no '## Quickstart' section"
    block = re.search(r"^```\w*\n(.*?)^```", quickstart.group(1), re.MULTILINE | re.DOTALL)
    lines = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    assert [line for line in lines if line] == QUICKSTART


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


MARKDOWN = [README, *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.mark.parametrize("page", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files_and_headings(page: Path):
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.relative_to(ROOT)} links to missing {target}"
        if anchor and linked.suffix == ".md":
            anchors = {slug(h) for _, h in HEADING.findall(FENCE.sub("", linked.read_text()))}
            assert anchor in anchors, f"{page.relative_to(ROOT)} links to {target}: no such heading"


@pytest.mark.parametrize("page", MARKDOWN, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_code_fences_close_and_no_table_has_an_empty_header(page: Path):
    text = page.read_text()
    fences = [line for line in text.splitlines() if line.startswith("```")]
    assert len(fences) % 2 == 0, f"{page.name}: an unclosed code fence"
    prose = FENCE.sub("", text)
    headers = re.findall(r"^(\|.*\|)\s*\n\|[-:| ]+\|\s*$", prose, re.MULTILINE)
    empty = [row for row in headers if not any(cells(row))]
    assert not empty, f"{page.name}: tables with an empty header row: {empty}"


def test_the_architecture_page_names_every_core_module():
    """docs/ARCHITECTURE.md's module tables name every module of visionflow/ by its path there."""
    page = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    core = ROOT / "visionflow"
    modules = [p.relative_to(core).as_posix() for p in sorted(core.rglob("*.py")) if p.name != "__init__.py"]
    missing = [m for m in modules if f"`{m}`" not in page]
    assert not missing, f"docs/ARCHITECTURE.md does not name: {missing}"
