"""Shipped profiles, the working folder, and upstreams that are this profile's own."""

import re
from pathlib import Path

import pytest
import yaml

from flows import registry, resources
from flows.settings import load_profile
from flows.stage import run_stage
from gpt_core.errors import GptflowError

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_profiles_load_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GPTFLOW_HOME", raising=False)
    assert set(resources.profiles()) >= {"default", "smoke", "book"}
    for name in resources.profiles():
        profile = load_profile(name)
        assert profile.data_dir == tmp_path / "data"
        assert profile.sources_manifest.is_file() and profile.mlflow_config.is_file()
    assert load_profile(None).describe() == "default"
    assert list(tmp_path.iterdir()) == []


def test_relative_paths_are_taken_from_gptflow_home(tmp_path, monkeypatch):
    from flows.tracking import load_config
    home = tmp_path / "work"
    monkeypatch.setenv("GPTFLOW_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    profile = load_profile("smoke", ["data_dir=runs/data"])
    assert profile.data_dir == home / "runs" / "data"
    settings = load_config(profile.mlflow_config)
    assert settings["tracking_uri"] == f"sqlite:///{home / 'mlflow.db'}"
    assert settings["artifact_location"] == (home / "mlruns").as_uri()
    # A profile given as a file is read from where the command runs, like any command-line path.
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({"pretrain": {"max_steps": 3}}))
    monkeypatch.chdir(tmp_path)
    assert load_profile("mine.yaml").pretrain.max_steps == 3


def test_an_unknown_profile_name_lists_the_shipped_ones(run_cli):
    code, _, err = run_cli("run", "--config", "nightly")
    assert code == 2
    assert err.strip().splitlines() == [
        f"gptflow: error: --config nightly: no such profile; shipped: {', '.join(resources.profiles())}, "
        "or a YAML file"]


def _registered_names(profile: str) -> set[str]:
    loaded = load_profile(profile)
    return {loaded.section(s.name).registered_name for s in registry.STAGES
            if getattr(loaded.section(s.name), "registered_name", None)}


def test_readme_model_uris_are_ones_a_profile_registers():
    readme = (ROOT / "README.md").read_text()
    used = set(re.findall(r"models:/([a-z0-9-]+)@", readme))
    assert used and used <= _registered_names("default")
    for profile in resources.profiles():
        listed = re.search(rf"`{profile}`[^\n]*registers ([^\n]+)", readme)
        assert listed, f"the README does not say what the {profile} profile registers"
        assert set(re.findall(r"`([a-z0-9-]+)`", listed.group(1))) == _registered_names(profile)


def test_reading_a_model_uri_creates_no_database(tmp_path, monkeypatch, run_cli):
    monkeypatch.setenv("GPTFLOW_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, _, err = run_cli("generate", "--model", "models:/gptflow-base@newest", "Hello")
    assert code == 2 and "no MLflow database" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_a_missing_registered_model_lists_the_registered_ones(tracking, run_cli, capsys):
    import mlflow

    from flows.tracking import configure
    configure(tracking)
    mlflow.MlflowClient().create_registered_model("smoke-base")
    mlflow.MlflowClient().create_registered_model("smoke-spam")
    capsys.readouterr()  # MLflow's own lines while it created the database
    code, _, err = run_cli("generate", "--model", "models:/gptflow-base@newest", "Hello")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "registered: smoke-base, smoke-spam" in err


def test_a_stage_on_its_own_uses_its_own_profiles_upstream(tmp_path, tracking, mirror, run_cli, capsys):
    """After the default profile's tokenize, the book's pretrain does not train on tiny Shakespeare."""
    common = [f"data_dir={tmp_path / 'data'}", f"mlflow_config={tracking}"]
    default = load_profile("default", common)
    run_stage("download", default)
    run_stage("tokenize", default)
    capsys.readouterr()
    code, _, err = run_cli("stage", "pretrain", "--config", "book", *[a for o in common for a in ("--set", o)])
    assert code == 2
    # The book reads other sources: the first command it needs is its own download.
    [line] = err.strip().splitlines()
    assert "needs the 'download' stage's output for this profile" in line
    assert f"`gptflow stage download --config book --set data_dir={tmp_path / 'data'} --set" in line
    assert not (tmp_path / "data" / "pretrain").exists()
    book = load_profile("book", common)
    run_stage("download", book)
    with pytest.raises(GptflowError, match="pretrain needs the 'tokenize' stage's output.*--config book"):
        run_stage("pretrain", book)
