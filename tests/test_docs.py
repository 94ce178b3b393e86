"""The generated reference pages of the docs site cover the code they are generated from: every
subcommand and option of the CLI parser, every field of the run parameters."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from polyburn.cli import _parser
from polyburn.params import MaskOptions, RunParameters

ROOT = Path(__file__).resolve().parents[1]


def _hook():
    spec = importlib.util.spec_from_file_location(
        "docs_reference", ROOT / "docs/hooks/reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rendered(page: str) -> str:
    hook = _hook()
    markdown = (ROOT / "docs" / page).read_text()
    return hook.on_page_markdown(markdown, page=None, config=None, files=None)


def test_the_cli_page_lists_every_subcommand_and_option_of_the_parser():
    page = _rendered("cli.md")
    assert "<!-- generated" not in page
    sub_actions = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert sub_actions, "the parser has no subcommands"
    for action in _parser()._actions:  # polyburn's own options, e.g. --version
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            assert f"`polyburn {action.option_strings[-1]}`" in page, action.option_strings
    subcommands = sub_actions[0].choices
    assert set(subcommands) >= {"run", "validate", "serve", "events"}
    for name, sub in subcommands.items():
        section = page.split(f"## `polyburn {name}`", 1)[1].split("\n## ", 1)[0]
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            for option in action.option_strings or [action.metavar or action.dest]:
                assert f"`{option}" in section, f"polyburn {name}: {option} is not documented"
            if action.help:
                first_words = " ".join(action.help.split()[:3])
                assert first_words in section.replace("&lt;", "<"), (name, action.help)


def test_the_parameters_page_lists_every_field_with_its_description():
    page = _rendered("parameters.md").replace("&lt;", "<")
    assert "<!-- generated" not in page
    for model in (RunParameters, MaskOptions):  # the flow's parameters are flat
        for name, field in model.model_fields.items():
            if name == "options":
                continue
            row = next(
                (line for line in page.splitlines() if line.startswith(f"| `{name}` |")),
                None,
            )
            assert row is not None, f"{name} is not documented"
            if field.description:
                assert " ".join(field.description.split()) in row.replace("\\|", "|")


def test_the_outputs_page_has_a_row_for_every_output_format_of_the_registry():
    from polyburn import formats

    page = _rendered("outputs.md")
    assert "<!-- generated" not in page
    for output_format in formats.registry().values():
        row = next(
            (line for line in page.splitlines() if line.startswith(f"| `{output_format.name}` |")),
            None,
        )
        assert row is not None, f"{output_format.name} is not documented"
        assert output_format.summary in row
