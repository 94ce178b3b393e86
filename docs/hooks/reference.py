"""MkDocs hook: pages generated from the code at build time, so they cannot drift from it.

A page holding :data:`CLI_MARKER` gets the reference of every ``polyburn`` subcommand, built from
the argparse parser of ``polyburn/cli.py``; a page holding :data:`PARAMETERS_MARKER` gets the
parameters of the flow ``polygons-to-masks`` (the fields of ``polyburn.params.RunParameters`` and
``MaskOptions``) with their types, defaults and descriptions, the same text the Prefect UI form
shows; a page holding :data:`FORMATS_MARKER` gets the table of output formats from
``polyburn.formats``' registry.
"""

from __future__ import annotations

import argparse
import enum
import re
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

CLI_MARKER = "<!-- generated: cli-reference -->"
PARAMETERS_MARKER = "<!-- generated: run-parameters -->"
FORMATS_MARKER = "<!-- generated: output-formats -->"
USAGE_WIDTH = 100


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """MkDocs event: replace the markers with the generated reference."""
    if CLI_MARKER in markdown:
        from polyburn.cli import _parser

        markdown = markdown.replace(CLI_MARKER, cli_reference(_parser()))
    if PARAMETERS_MARKER in markdown:
        markdown = markdown.replace(PARAMETERS_MARKER, parameters_reference())
    if FORMATS_MARKER in markdown:
        from polyburn.formats import reference_table

        markdown = markdown.replace(FORMATS_MARKER, reference_table())
    return markdown


def subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[str, argparse.ArgumentParser]]:
    """Subcommand name → (its one-line help, its parser), in the parser's order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return {name: (helps.get(name, ""), sub) for name, sub in action.choices.items()}
    return {}


def cli_reference(parser: argparse.ArgumentParser) -> str:
    """Markdown: for each subcommand a heading, its help, its usage and a table of its
    arguments (positional, then options) with their defaults, choices and help."""
    out: list[str] = []
    for name, (summary, sub) in subcommands(parser).items():
        formatter = argparse.HelpFormatter(sub.prog, width=USAGE_WIDTH)
        formatter.add_usage(sub.usage, sub._actions, sub._mutually_exclusive_groups, prefix="")
        out += [f"## `{parser.prog} {name}`", "", _sentence(summary), ""]
        out += ["```", formatter.format_help().strip(), "```", ""]
        out += ["| argument | default | meaning |", "|---|---|---|"]
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            out.append(f"| {_argument(action)} | {_default(action)} | {_cell(_meaning(action))} |")
        out.append("")
    return "\n".join(out)


def _argument(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    *short, last = action.option_strings  # each name in its own code span: `-o`, `--output FILE`
    if action.nargs != 0:
        metavar = action.metavar or (
            "{" + ",".join(map(str, action.choices)) + "}"
            if action.choices
            else action.dest.upper()
        )
        last = f"{last} {metavar}"
    return ", ".join(f"`{name}`" for name in [*short, last])


def _default(action: argparse.Action) -> str:
    if not action.option_strings or action.nargs == 0 or action.default is None:
        return ""
    return f"`{action.default}`"


def _meaning(action: argparse.Action) -> str:
    text = _sentence(action.help or "")
    if action.choices and action.option_strings and action.nargs != 0:
        text = f"{text} One of {', '.join(f'`{c}`' for c in action.choices)}.".strip()
    if action.option_strings and action.nargs is None and action.type is int:
        text = f"{text} An integer.".strip()
    return text


def parameters_reference() -> str:
    """Markdown: a table of the public flow's parameters (name, type, default, description),
    one per field of ``RunParameters`` with ``MaskOptions``' fields spread out, then a table of
    the internal fields, which only ``polyburn run`` and the shard deployment's flow take."""
    from polyburn.params import FLAT_FIELDS, INTERNAL_FIELDS, MaskOptions, RunParameters

    def table(names: tuple[str, ...], required: tuple[str, ...] = ()) -> list[str]:
        rows = ["| parameter | type | default | description |", "|---|---|---|---|"]
        for name in names:
            model = MaskOptions if name in MaskOptions.model_fields else RunParameters
            field = model.model_fields[name]
            default = "required" if name in required else _field_default(field)
            rows.append(
                f"| `{name}` | {_cell(_type_name(field.annotation))} | {_cell(default)} "
                f"| {_cell(_sentence(field.description or ''))} |"
            )
        return rows

    internal = [
        "",
        "### Set by polyburn",
        "",
        "Not parameters of `polygons-to-masks`, so not in its form: `polyburn run` "
        "(`--shard-deployment`) and the `shard` deployment's flow, which take the whole "
        "`RunParameters` as one `params`, set them.",
        "",
    ]
    return "\n".join(
        table(FLAT_FIELDS, ("source", "destination")) + internal + table(INTERNAL_FIELDS)
    )


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return f"`{annotation.__name__}`"
    text = str(annotation)
    text = re.sub(r"\b(typing|datetime|polyburn\.params)\.", "", text)
    text = re.sub(r"<class '([\w.]+)'>", lambda m: m.group(1).rsplit(".", 1)[-1], text)
    return f"`{text}`"


def _field_default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return "see below" if isinstance(value, BaseModel) else f"`{value!r}`"
    if field.default is PydanticUndefined:
        return "required"
    value = field.default
    if isinstance(value, enum.Enum):
        value = value.value
    if value is None:
        return "none"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def _sentence(text: str) -> str:
    """``text`` on one line, ending with a full stop (help texts are fragments)."""
    text = " ".join(text.split())
    return text if not text or text.endswith((".", "…")) else text + "."


def _cell(text: str) -> str:
    """``text`` safe in a markdown table cell: no pipes, no newlines, no raw HTML."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")
