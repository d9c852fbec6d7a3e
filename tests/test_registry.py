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
    sources = [p for d in ("flows", "gpt_core", "tests") for p in (ROOT / d).rglob("*.py")]
    assert [str(p) for p in sources if spelled.search(p.read_text())] == []


def test_cli_stage_choices_come_from_the_registry():
    stage = next(a for a in build_parser()._subparsers._group_actions[0].choices["stage"]._actions
                 if a.dest == "name")
    assert list(stage.choices) == registry.names()


def test_readme_lists_the_metric_vocabulary():
    from gpt_core import metrics
    assert metrics.markdown_table() in (ROOT / "README.md").read_text()


def test_vocabulary_matches_names_and_refuses_others():
    from gpt_core import metrics
    for name in ("train/loss", "val/loss", "summary/bytes.the-verdict", "summary/test_accuracy",
                 "spam.test_accuracy", "pretrain.final/val_loss", "summary/spam_train_rows"):
        assert metrics.declared(name), name
    for name in ("eval/val_loss", "summary/nonsense", "val/loss/extra", "test_accuracy"):
        assert not metrics.declared(name), name
