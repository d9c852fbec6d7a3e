"""gpt_core.supervised: the book's SMS spam and instruction-data splits."""

import json
import os
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from gpt_core.errors import GptflowError
from gpt_core.supervised import prepare_instructions, prepare_spam, read_sms_spam

MIRROR = Path(os.environ.get("GPTFLOW_MIRROR") or Path(__file__).resolve().parents[2] / "shared/data/mirror")
needs_mirror = pytest.mark.skipif(not MIRROR.is_dir(), reason=f"no mirror folder at {MIRROR}; set GPTFLOW_MIRROR")


@pytest.fixture(scope="module")
def sms(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sms")
    with zipfile.ZipFile(MIRROR / "sms+spam+collection.zip") as zf:
        return Path(zf.extract("SMSSpamCollection", folder))


@needs_mirror
def test_spam_is_the_books_balanced_split(sms, tmp_path):
    df = read_sms_spam(sms)
    assert len(df) == 5574 and df["Label"].value_counts().to_dict() == {"ham": 4827, "spam": 747}
    summary = prepare_spam(sms, tmp_path)
    assert {split: part["rows"] for split, part in summary.items()} == {"train": 1045, "validation": 149, "test": 300}
    frames = {split: pd.read_parquet(part["path"]) for split, part in summary.items()}
    together = pd.concat(frames.values())
    assert together["label"].value_counts().to_dict() == {0: 747, 1: 747}
    assert list(frames["train"].columns) == ["text", "label"]
    assert sum(part["spam"] for part in summary.values()) == 747
    assert prepare_spam(sms, tmp_path / "again") == {
        split: {**part, "path": str(tmp_path / "again" / Path(part["path"]).name)} for split, part in summary.items()}


@pytest.mark.parametrize("line, problem", [
    (b"ham no tab here", "expected 'ham' or 'spam', a tab"),
    (b"eggs\tnot a label", "label must be 'ham' or 'spam', got 'eggs'"),
])
def test_malformed_sms_line_is_named(tmp_path, line, problem):
    path = tmp_path / "SMSSpamCollection"
    path.write_bytes(b"ham\tHello\r\nspam\tWIN now\r\n" + line + b"\r\nham\tbye\r\n")
    with pytest.raises(GptflowError, match=rf"SMSSpamCollection, line 3: {problem}"):
        read_sms_spam(path)


@needs_mirror
def test_instruction_split(tmp_path):
    summary = prepare_instructions(MIRROR / "instruction-data.json", tmp_path)
    assert {split: part["rows"] for split, part in summary.items()} == {"train": 935, "test": 110, "validation": 55}
    data = json.loads((MIRROR / "instruction-data.json").read_text())
    assert json.loads(Path(summary["test"]["json_path"]).read_text()) == data[935:1045]
    frame = pd.read_parquet(summary["validation"]["path"])
    assert list(frame.columns) == ["instruction", "input", "output"]
    assert frame.to_dict("records") == data[1045:]


@pytest.mark.parametrize("entry, problem", [
    ({"instruction": "x", "output": "y"}, "key 'input' is missing"),
    ({"instruction": "x", "input": "", "output": 3}, "key 'output' must be a string"),
    ("just text", "must be an object"),
])
def test_bad_instruction_entry_is_named(tmp_path, entry, problem):
    good = {"instruction": "Say hi.", "input": "", "output": "Hi."}
    path = tmp_path / "data.json"
    path.write_text(json.dumps([good, good, entry]))
    with pytest.raises(GptflowError, match=rf"entry 2: .*{problem}"):
        prepare_instructions(path, tmp_path / "out")
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []
