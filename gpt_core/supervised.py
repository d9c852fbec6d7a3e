"""The fine-tuning datasets of the book: SMS spam (chapter 6) and instruction data (chapter 7).

Both are split exactly as the book splits them, with the book's pandas calls and seeds, and
written as Parquet (plus JSON for the instruction data, the book's format).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .errors import GptflowError
from .files import atomic_output, sha256_file

SPAM_LABELS = {"ham": 0, "spam": 1}
INSTRUCTION_KEYS = ("instruction", "input", "output")


def read_sms_spam(path: str | Path) -> pd.DataFrame:
    """The `SMSSpamCollection` file (`label<TAB>text` lines) as a frame with columns Label, Text.

    Parsed line by line, not with the book's `pd.read_csv(sep="\\t")`: read_csv treats a text that
    starts with a double quote as a quoted field, which strips quotes from 54 messages and merges
    three lines into one (5572 rows instead of 5574).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise GptflowError(f"cannot read the SMS spam collection {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise GptflowError(f"{path} is not valid UTF-8 (byte offset {err.start})") from None
    # split("\n"), not splitlines(): messages contain characters splitlines() also breaks at (\x85, \u2028).
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    labels, texts = [], []
    for number, line in enumerate(lines, start=1):
        label, tab, message = line.removesuffix("\r").partition("\t")
        if not tab:
            raise GptflowError(f"{path}, line {number}: expected 'ham' or 'spam', a tab, then the message")
        if label not in SPAM_LABELS:
            raise GptflowError(f"{path}, line {number}: label must be 'ham' or 'spam', got {label!r}")
        labels.append(label)
        texts.append(message)
    if not labels:
        raise GptflowError(f"{path} holds no messages")
    return pd.DataFrame({"Label": labels, "Text": texts})


def split_sms_spam(df: pd.DataFrame, seed: int = 123) -> dict[str, pd.DataFrame]:
    """The book's create_balanced_dataset + random_split: as many ham as spam, then 70/10/20."""
    num_spam = df[df["Label"] == "spam"].shape[0]
    ham_subset = df[df["Label"] == "ham"].sample(num_spam, random_state=seed)
    balanced = pd.concat([ham_subset, df[df["Label"] == "spam"]])
    balanced["Label"] = balanced["Label"].map(SPAM_LABELS)
    shuffled = balanced.sample(frac=1, random_state=seed).reset_index(drop=True)
    train_end = int(len(shuffled) * 0.7)
    validation_end = train_end + int(len(shuffled) * 0.1)
    parts = {"train": shuffled[:train_end], "validation": shuffled[train_end:validation_end],
             "test": shuffled[validation_end:]}
    return {name: part.rename(columns={"Text": "text", "Label": "label"})[["text", "label"]].reset_index(drop=True)
            for name, part in parts.items()}


def prepare_spam(path: str | Path, out_dir: str | Path, seed: int = 123) -> dict:
    """Write spam-{train,validation,test}.parquet (columns text, label: ham=0 spam=1) under `out_dir`."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {}
    for split, frame in split_sms_spam(read_sms_spam(path), seed).items():
        target = out_dir / f"spam-{split}.parquet"
        with atomic_output(target) as tmp:
            frame.to_parquet(tmp, index=False)
        summary[split] = {"path": str(target), "rows": len(frame), "spam": int(frame["label"].sum()),
                          "sha256": sha256_file(target)}
    return summary


def read_instructions(path: str | Path) -> list[dict]:
    """The Alpaca-style JSON list, each entry checked to hold instruction, input and output strings."""
    path = Path(path)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise GptflowError(f"cannot read instruction data {path}: {err.strerror or err}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise GptflowError(f"instruction data {path} is not valid JSON: {err}") from None
    if not isinstance(data, list) or not data:
        raise GptflowError(f"instruction data {path} must be a non-empty JSON list of objects")
    for index, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise GptflowError(f"instruction data {path}, entry {index}: must be an object with keys "
                               f"{', '.join(INSTRUCTION_KEYS)}")
        for key in INSTRUCTION_KEYS:
            if not isinstance(entry.get(key), str):
                problem = "is missing" if key not in entry else "must be a string"
                raise GptflowError(f"instruction data {path}, entry {index}: key '{key}' {problem}")
    return [{key: entry[key] for key in INSTRUCTION_KEYS} for entry in data]


def split_instructions(data: list[dict]) -> dict[str, list[dict]]:
    """The book's split, in file order: 85% train, 10% test, the rest validation."""
    train_end = int(len(data) * 0.85)
    test_end = train_end + int(len(data) * 0.1)
    return {"train": data[:train_end], "test": data[train_end:test_end], "validation": data[test_end:]}


def prepare_instructions(path: str | Path, out_dir: str | Path) -> dict:
    """Write instruct-{train,test,validation}.parquet and .json under `out_dir`."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {}
    for split, entries in split_instructions(read_instructions(path)).items():
        parquet, as_json = out_dir / f"instruct-{split}.parquet", out_dir / f"instruct-{split}.json"
        with atomic_output(parquet) as tmp:
            pd.DataFrame(entries, columns=list(INSTRUCTION_KEYS)).to_parquet(tmp, index=False)
        with atomic_output(as_json) as tmp:
            tmp.write_text(json.dumps(entries, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        summary[split] = {"path": str(parquet), "json_path": str(as_json), "rows": len(entries),
                          "sha256": sha256_file(parquet), "json_sha256": sha256_file(as_json)}
    return summary
