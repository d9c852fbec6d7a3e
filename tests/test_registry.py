"""The stage registry is the one list of stages, and it is in running order."""

import re
from pathlib import Path

from flows import registry
from flows.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def test_stages_are_listed_after_everything_they_read():
    seen = set()
    for stage in registry.STAGES:
        assert set(stage.upstream) <= seen, stage.name
        assert hasattr(stage.implementation, "run") and hasattr(stage.config, "__dataclass_fields__")
        seen.add(stage.name)


def test_the_stage_list_is_written_once():
    """No file spells out the stage names as a list of its own: each reads flows.registry."""
    spelled = re.compile(r"""["']download["'],\s*["']tokenize["']""")
    sources = [p for d in ("flows", "gpt_core", "tests", "bench") for p in (ROOT / d).rglob("*.py")]
    assert [str(p) for p in sources if spelled.search(p.read_text())] == []


def test_cli_stage_choices_come_from_the_registry():
    stage = next(a for a in build_parser()._subparsers._group_actions[0].choices["stage"]._actions
                 if a.dest == "name")
    assert list(stage.choices) == registry.names()
