"""The command line describes itself: every option has help, with its default, and a version."""

import argparse
from importlib import metadata

import pytest

from flows import resources
from flows.cli import HelpFormatter, build_parser


def _subcommands():
    parser = build_parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return commands.choices


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_every_option_has_help_and_shows_its_default(name):
    parser = _subcommands()[name]
    formatter = HelpFormatter(prog=f"gptflow {name}")
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        text = formatter._get_help_string(action)
        assert action.help, f"gptflow {name} {action.dest} has no help"
        if action.option_strings and action.default not in (None, [], argparse.SUPPRESS) \
                and action.default is not False:
            assert "default" in text, f"gptflow {name} {action.option_strings[0]} hides its default"
    if any(a.dest == "config" for a in parser._actions):
        help_text = parser.format_help()
        assert all(profile in help_text for profile in resources.profiles())


def test_version(run_cli):
    code, out, _ = run_cli("--version")
    assert code == 0 and out.strip() == f"gptflow {metadata.version('gptflow')}"


def test_help_names_only_documents_that_exist():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    help_text = build_parser().format_help()
    for doc in ("README.md", "docs/architecture.md"):
        if doc in help_text:
            assert (root / doc).is_file()
    assert "ARCHITECTURE" not in help_text
