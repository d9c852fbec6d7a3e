import json

from flows import registry


def test_status_before_any_run_names_each_command_and_creates_nothing(tmp_path, monkeypatch, run_cli):
    monkeypatch.setenv("GPTFLOW_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli("status", "--config", "smoke")
    assert code == 0, err
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == registry.names()
    assert all("not run — `gptflow stage " in line and "--config smoke" in line for line in lines)
    assert list(tmp_path.iterdir()) == []

    code, out, err = run_cli("status", "--config", "smoke", "--json")
    assert code == 0, err
    assert [row["stage"] for row in json.loads(out)] == registry.names()


def test_status_shows_a_produced_stage_with_its_key_and_run(tmp_path, monkeypatch, run_cli):
    from flows.settings import load_profile
    from flows.stage import run_stage

    monkeypatch.setenv("GPTFLOW_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    manifest = run_stage("download", load_profile("smoke"))
    code, out, err = run_cli("status", "--config", "smoke")
    assert code == 0, err
    download, tokenize = out.splitlines()[:2]
    assert manifest["key"] in download and manifest["mlflow_run_id"] in download
    assert "not run — `gptflow stage tokenize --config smoke`" in tokenize
    assert f"ran {manifest['created']}" in download and "reused" not in download

    run_stage("download", load_profile("smoke"))
    code, out, err = run_cli("status", "--config", "smoke", "--json")
    row = json.loads(out)[0]
    assert row["reused"] is True and row["created"] == manifest["created"]
    code, out, err = run_cli("status", "--config", "smoke")
    assert f"(ran {manifest['created']})" in out.splitlines()[0] and "reused " in out.splitlines()[0]
