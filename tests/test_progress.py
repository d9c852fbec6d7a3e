import io
import logging
import sys
from pathlib import Path

import pytest

from gpt_core.config import get_preset
from gpt_core.model import GPTModel
from gpt_core.progress import Progress
from gpt_core.train import TrainSettings, train

sys.path.insert(0, str(Path(__file__).parent))
import train_job  # noqa: E402


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def gptflow_lines(caplog):
    caplog.set_level(logging.INFO, logger="gptflow")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "gptflow"]


def test_off_a_terminal_progress_is_plain_lines(gptflow_lines):
    stream = io.StringIO()
    with Progress(4, "train", "step", every_s=0, stream=stream) as bar:
        for _ in range(4):
            bar.note("loss 1.000")
            bar.update(1)
    assert stream.getvalue() == ""
    assert gptflow_lines() == [f"train: {n}/4 step ({25 * n}%), loss 1.000" for n in (1, 2, 3, 4)] + \
        ["train: 4/4 step (100%), loss 1.000"]


def test_off_a_terminal_lines_are_spaced_in_time_and_end_with_a_total(gptflow_lines):
    with Progress(3_000_000, "the-verdict.txt", "B", unit_scale=True, every_s=3600, stream=io.StringIO()) as bar:
        for _ in range(3):
            bar.update(1_000_000)
    assert gptflow_lines() == ["the-verdict.txt: 3.00M/3.00M B (100%)"]


def test_on_a_terminal_a_bar_is_drawn_and_nothing_logged(gptflow_lines):
    stream = Terminal()
    with Progress(4, "train", "step", stream=stream) as bar:
        bar.update(4)
    assert "\r" in stream.getvalue() and "train:" in stream.getvalue()
    assert gptflow_lines() == []


def test_disabled_progress_says_nothing(gptflow_lines):
    stream = Terminal()
    with Progress(4, "train", "step", every_s=0, enabled=False, stream=stream) as bar:
        bar.update(4)
    assert stream.getvalue() == "" and gptflow_lines() == []


def test_training_off_a_terminal_writes_no_carriage_returns(shard_dir, tmp_path, capfd, gptflow_lines):
    train_data, val_data = train_job.data(shard_dir)
    model = GPTModel(get_preset("gpt-nano", context_length=32))
    settings = TrainSettings(max_steps=3, eval_every=100, eval_batches=1, precision="fp32")
    train(model, settings, train_data, val_data, tmp_path, progress=True)
    out, err = capfd.readouterr()
    assert "\r" not in out + err
    assert gptflow_lines()[-1].startswith("train: 3/3 step (100%), loss ")


def test_the_judge_reports_its_progress(gptflow_lines):
    from ollama_stub import OllamaStub

    from gpt_core.judge import JudgeClient

    entries = [{"instruction": f"Say {n}.", "input": "", "output": str(n)} for n in range(3)]
    with OllamaStub(reply=lambda prompt: "50") as stub:
        JudgeClient(stub.url, timeout=2.0, retries=0).score_all(entries, ["0", "1", "2"])
    assert gptflow_lines()[-1] == "judge: 3/3 response (100%)"
