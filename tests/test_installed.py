"""gptflow installed from its wheel (not editable), run from an empty folder as a new user would.

The wheel is built from the tracked files, installed into a virtual environment that borrows this
one's dependencies (`--system-site-packages`, `--no-deps`), and driven by its `gptflow` script with
a scratch HOME and temporary folder, so anything written outside the working folder shows.
"""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from flows import registry

ROOT = Path(__file__).resolve().parents[1]
# What Prefect and matplotlib keep in a home folder: Prefect's run history (which the Prefect UI
# reads) and matplotlib's font cache. Everything of gptflow's own is in the working folder.
THIRD_PARTY_HOME = {".prefect", ".cache", ".cache/matplotlib", ".config", ".config/matplotlib"}


def run(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, **kwargs)
    assert result.returncode == 0, f"{command}: {result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the venv's bin folder, the wheel's file names)"""
    scratch = tmp_path_factory.mktemp("installed")
    source = scratch / "source"
    tracked = run(["git", "ls-files", "-z"], cwd=ROOT).stdout.split("\0")
    for name in filter(None, tracked):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((ROOT / name).read_bytes())
    run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(scratch / "wheel")], cwd=source)
    (wheel,) = (scratch / "wheel").glob("gptflow-*.whl")
    run([sys.executable, "-m", "venv", "--system-site-packages", str(scratch / "venv")])
    run([str(scratch / "venv" / "bin" / "pip"), "install", "-q", "--no-deps", str(wheel)])
    return scratch / "venv" / "bin", zipfile.ZipFile(wheel).namelist()


def test_the_wheel_installs_only_gptflows_own_import_names_and_its_resources(installed):
    _, names = installed
    top = {name.split("/")[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"flows", "gpt_core"}
    for resource in ("flows/resources/configs/default.yaml", "flows/resources/configs/smoke.yaml",
                     "flows/resources/configs/book.yaml", "flows/resources/mlflow.yaml",
                     "flows/resources/sources.json"):
        assert resource in names


def test_smoke_run_and_status_from_an_empty_folder_write_nowhere_else(installed, tmp_path):
    bin_dir, _ = installed
    work, home, tmp = tmp_path / "work", tmp_path / "home", tmp_path / "tmp"
    for folder in (work, home, tmp):
        folder.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "PREFECT_", "GPTFLOW_", "TIKTOKEN_", "PYTHON"))}
    env.update(HOME=str(home), TMPDIR=str(tmp), GPTFLOW_MIRROR=os.environ["GPTFLOW_MIRROR"],
               PATH=f"{bin_dir}{os.pathsep}{env['PATH']}")
    before = run(["git", "status", "--porcelain", "--ignored"], cwd=ROOT).stdout

    where = run([str(bin_dir / "python"), "-c", "import flows, gpt_core; print(flows.__file__, gpt_core.__file__)"],
                cwd=work, env=env).stdout.split()
    assert all(path.startswith(str(bin_dir.parent)) for path in where), where

    result = run(["gptflow", "run", "--config", "smoke"], cwd=work, env=env)
    summary = result.stdout + result.stderr
    assert "Ollama is not reachable" in summary and "Finished in state Completed()" in summary
    status = run(["gptflow", "status", "--config", "smoke"], cwd=work, env=env).stdout.splitlines()
    rows = {line.split()[0]: line for line in status}
    assert "models:/smoke-base@newest" in rows["pretrain"] and "models:/smoke-instruct@newest" in rows["instruct"]
    assert all(" ran " in rows[s] for s in registry.names() if s != "judge")
    assert "not run — `gptflow stage judge --config smoke`" in rows["judge"]

    assert {p.name for p in work.iterdir()} >= {"data", "mlflow.db", "mlruns", ".cache"}
    in_home = {str(p.relative_to(home)) for p in home.rglob("*") if len(p.relative_to(home).parts) <= 2}
    assert {p for p in in_home if not p.startswith(".prefect/")} <= THIRD_PARTY_HOME, in_home
    # Temporary files: the stage locks (machine-local by nature) and torch's compile scratch only.
    assert {p.name.split("_")[0] for p in tmp.iterdir()} <= {"gptflow-locks", "torchinductor"}
    assert run(["git", "status", "--porcelain", "--ignored"], cwd=ROOT).stdout == before
