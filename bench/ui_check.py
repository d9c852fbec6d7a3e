"""Look at the pipeline the way a user does: through the Prefect and MLflow UIs in a browser.

Starts a Prefect server and runs the smoke pipeline against it, starts the MLflow UI on the
run's tracking database, then renders their pages in headless Chromium (Debian's `chromium`
package), checks that each shows what it should and saves screenshots.

    python -m bench.ui_check [--out DIR]

Needs GPTFLOW_MIRROR (or the team's ../shared/data/mirror). Everything runs on 127.0.0.1 and is
stopped at the end.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
PREFECT_PORT, MLFLOW_PORT = 4299, 5099
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--virtual-time-budget=15000", "--window-size=1400,1000"]


def wait_for(url: str, seconds: float = 120):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if requests.get(url, timeout=2).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} did not come up within {seconds:.0f} s")


def render(url: str, screenshot: Path, profile_dir: Path) -> str:
    """The page's DOM after its scripts ran, and a screenshot of it."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise RuntimeError("chromium not found: apt-get install chromium")
    flags = [*CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}"]
    subprocess.run([browser, *flags, f"--screenshot={screenshot}", url], check=True, capture_output=True, timeout=120)
    return subprocess.run([browser, *flags, "--dump-dom", url], check=True, capture_output=True, text=True,
                          timeout=120).stdout


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("ui-screenshots"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gptflow-ui-"))
    (work / "mlflow.yaml").write_text(f"tracking_uri: sqlite:///{work}/mlflow.db\nexperiment: gptflow\n"
                                      f"artifact_location: {work}/mlruns\nmodel_alias: newest\n")
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": f"http://127.0.0.1:{PREFECT_PORT}/api"}
    env.setdefault("GPTFLOW_MIRROR", str(ROOT.parent / "shared" / "data" / "mirror"))
    env.pop("MLFLOW_TRACKING_URI", None)
    servers = []
    try:
        servers.append(subprocess.Popen(["prefect", "server", "start", "--host", "127.0.0.1", "--port",
                                         str(PREFECT_PORT)], env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL))
        wait_for(f"http://127.0.0.1:{PREFECT_PORT}/api/health")
        subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", str(ROOT / "configs/smoke.yaml"),
                        "--set", f"data_dir={work / 'data'}", "--set", f"mlflow_config={work / 'mlflow.yaml'}",
                        "--set", f"sources_manifest={ROOT / 'data/sources.json'}", "--set", "judge.optional=true"],
                       env=env, check=True, cwd=ROOT)
        servers.append(subprocess.Popen(["mlflow", "ui", "--backend-store-uri", f"sqlite:///{work}/mlflow.db",
                                         "--host", "127.0.0.1", "--port", str(MLFLOW_PORT)], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for(f"http://127.0.0.1:{MLFLOW_PORT}/health")
        experiment = requests.get(f"http://127.0.0.1:{MLFLOW_PORT}/api/2.0/mlflow/experiments/get-by-name",
                                  params={"experiment_name": "gptflow"}, timeout=10).json()["experiment"]
        pages = {
            "prefect-runs": (f"http://127.0.0.1:{PREFECT_PORT}/runs", ["gptflow-pipeline"]),
            "prefect-artifacts": (f"http://127.0.0.1:{PREFECT_PORT}/artifacts", ["pipeline-summary", "spam-summary"]),
            "mlflow-runs": (f"http://127.0.0.1:{MLFLOW_PORT}/#/experiments/{experiment['experiment_id']}/runs",
                            ["pipeline", "matching runs"]),  # the parent; its 7 stage runs nest under it
        }
        failures = []
        for name, (url, expected) in pages.items():
            dom = render(url, args.out / f"{name}.png", work / "chromium")
            missing = [text for text in expected if text not in dom]
            status = "ok" if not missing else f"MISSING {', '.join(missing)}"
            print(f"{name:<18} {status:<10} {args.out / f'{name}.png'}  ({url})")
            failures += missing
        return 1 if failures else 0
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
