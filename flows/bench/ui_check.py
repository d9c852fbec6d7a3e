"""Look at the pipeline the way a user does: through the Prefect and MLflow UIs in a browser.

Starts a Prefect server, runs the smoke pipeline against it three times (a first run, the same
again, which reuses every stage, and one with `--set pretrain.lr=0.002`), starts the MLflow UI on
the runs' tracking database, then opens their pages in headless Chromium (Debian's `chromium`
package), does what a person would (opens a tab, expands the nested runs, filters the charts),
checks that the page shows what it should, on screen and not blank, and saves a screenshot of
each:

    prefect-runs          the flow runs list: the three pipeline runs and both pretrain runs
    prefect-pipeline-run  the first pipeline run: its graph and its seven stage subflows
    prefect-cached-run    the re-run: its seven subflows in the state named Cached
    prefect-artifacts     the pipeline-summary and per-stage summary artifacts
    mlflow-runs           the runs list with every pipeline run expanded to its stage runs
    mlflow-metrics        a pretrain run's train/loss and val/loss charts
    mlflow-compare        the two pretrain runs side by side, the lr they differ by
    mlflow-models         the registered models, each with its @newest alias
    mlflow-model          one registered model's versions and aliases

    python -m flows.bench.ui_check [--out DIR]

Takes several minutes (the pipeline trains twice). Needs GPTFLOW_MIRROR (or the team's
../shared/data/mirror). The judge stage talks to the tests' Ollama stub, so every stage runs and
the second run reuses all seven. Everything listens on 127.0.0.1 only and is stopped at the end;
exits 1 with one line per failed check.
"""

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import requests
import yaml
from PIL import Image  # a matplotlib dependency
from websockets.sync.client import connect  # a Prefect dependency

from flows import registry
from flows.resources import profile_path

ROOT = Path(__file__).resolve().parents[2]  # the checkout: this check drives its tests/ stubs
WIDTH = 1600
PAGE_SECONDS = 120  # how long a page may take to show what it should, on a busy machine
OVERRIDE = "pretrain.lr=0.002"
BLANK = 0.02  # a page or chart with less ink than this is blank (the pages here have 15-55 %)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float = 180):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if requests.get(url, timeout=5).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} did not come up within {seconds:.0f} s")


@contextmanager
def process_group(args: list[str], log: Path, **kwargs):
    """A server in its own process group, stopped with everything it started (uvicorn workers,
    MLflow's job consumers, Chromium's renderers)."""
    with log.open("w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
    try:
        yield proc
    finally:
        for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue


# What is on screen: visible elements, inside the viewport, whose rendered text holds `text` (or
# is exactly `text`), counted once each at the innermost element that holds it.
SHOWN_JS = """(text, exact) => {
  const norm = s => (s || '').replace(/\\s+/g, ' ').trim();
  const visible = el => el.checkVisibility({opacityProperty: true, visibilityProperty: true});
  const hits = [...document.body.querySelectorAll('*')].filter(el => {
    if (['SCRIPT', 'STYLE', 'NOSCRIPT', 'TEMPLATE'].includes(el.tagName)) return false;
    const t = norm(el.innerText ?? el.textContent);
    return (exact ? t === text : t.includes(text)) && visible(el);
  });
  return hits.filter(el => !hits.some(other => other !== el && el.contains(other))).filter(el => {
    const r = el.getBoundingClientRect();
    const left = Math.max(r.left, 0), right = Math.min(r.right, innerWidth);
    const top = Math.max(r.top, 0), bottom = Math.min(r.bottom, innerHeight);
    if (!(r.width > 0 && r.height > 0 && right > left && bottom > top)) return false;
    // Not under a dialog, nor scrolled out of its panel: the page's topmost element there is this one.
    const above = document.elementFromPoint((left + right) / 2, (top + bottom) / 2);
    return !!above && (el.contains(above) || above.contains(el));
  }).length;
}"""

CLICK_TEXT_JS = """(text) => {
  const el = [...document.body.querySelectorAll('*')].find(el => el.children.length === 0
    && (el.innerText || '').trim() === text && el.checkVisibility());
  if (!el) return false;
  el.click();
  return true;
}"""


def counted(texts: list[str]) -> dict[str, int]:
    return {text: texts.count(text) for text in texts}


class Browser:
    """Headless Chromium driven over the DevTools protocol, so a check can wait until the page
    shows something, act on it like a person, and screenshot exactly the page it checked."""

    def __init__(self, profile: Path, log: Path):
        self.profile, self.log, self._id = profile, log, 0

    def __enter__(self):
        browser = shutil.which("chromium") or shutil.which("chromium-browser")
        if browser is None:
            raise RuntimeError("chromium not found: apt-get install chromium")
        self.profile.mkdir(parents=True, exist_ok=True)
        port_file = self.profile / "DevToolsActivePort"
        port_file.unlink(missing_ok=True)
        self._stack = ExitStack()
        self._stack.enter_context(process_group(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
             "--disable-background-networking", "--disable-component-update", "--hide-scrollbars",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             f"--user-data-dir={self.profile}", f"--window-size={WIDTH},1000", "about:blank"], self.log))
        deadline = time.time() + 120
        while not (port_file.is_file() and port_file.read_text().strip()):
            if time.time() > deadline:
                self._stack.close()
                raise RuntimeError(f"chromium did not open its DevTools port within 120 s; see {self.log}")
            time.sleep(0.5)
        port = port_file.read_text().split()[0]
        page = next(t for t in requests.get(f"http://127.0.0.1:{port}/json/list", timeout=30).json()
                    if t["type"] == "page")
        self._ws = self._stack.enter_context(connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=60))
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def call(self, method: str, **params) -> dict:
        self._id += 1
        self._ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv(timeout=120))
            if message.get("id") == self._id:  # anything else is an event
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error'].get('message')}")
                return message["result"]

    def js(self, function: str, *args):
        """The value of `function(*args)` in the page (a JS function expression)."""
        expression = f"({function})(...{json.dumps(list(args))})"
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"].get("exception", {}).get("description", "script error"))
        return result["result"].get("value")

    def open(self, url: str, height: int = 1000):
        """Loads `url` afresh: by way of a blank page, so that nothing the previous page showed
        (MLflow's pages differ only in the URL's #fragment) can pass for this one."""
        self.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=height, deviceScaleFactor=1, mobile=False)
        self.call("Page.navigate", url="about:blank")
        self.call("Page.navigate", url=url)

    def shown(self, text: str, exact: bool = False) -> int:
        try:
            return self.js(SHOWN_JS, text, exact) or 0
        except RuntimeError:  # between documents while the page navigates
            return 0

    def click(self, selector: str) -> bool:
        return bool(self.js("(s) => { const el = document.querySelector(s); if (el) el.click(); return !!el }",
                            selector))

    def click_text(self, text: str) -> bool:
        return bool(self.js(CLICK_TEXT_JS, text))

    def wait(self, expect: dict[str, int], seconds: float = PAGE_SECONDS, exact: bool = False,
             meanwhile=None) -> list[str]:
        """Polls until each text is shown at least its count of times; returns what is missing.
        `meanwhile()` runs on every poll (closing a panel that opened by itself)."""
        deadline = time.time() + seconds
        while True:
            if meanwhile:
                meanwhile()
            missing = {text: count for text, count in expect.items() if self.shown(text, exact) < count}
            if not missing or time.time() > deadline:
                return [f"{text!r} " + (f"shown {self.shown(text, exact)} times, expected {count}" if count > 1
                                        else "not on screen") for text, count in missing.items()]
            time.sleep(1)

    def boxes(self, selector: str) -> list[tuple[int, int, int, int]]:
        """Where the elements matching `selector` are on screen, clipped to the viewport."""
        return [tuple(b) for b in self.js("""(s) => [...document.querySelectorAll(s)].map(el => {
            const r = el.getBoundingClientRect();
            return [Math.max(0, r.left), Math.max(0, r.top), Math.min(innerWidth, r.right),
                    Math.min(innerHeight, r.bottom)].map(Math.round);
          }).filter(([l, t, r, b]) => r > l && b > t)""", selector)]

    def screenshot(self, path: Path):
        for attempt in range(10):
            try:
                path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
                return
            except RuntimeError:  # "not attached to an active page" while a document is replaced
                if attempt == 9:
                    raise
                time.sleep(1)


def ink(png: Path, box=None) -> float:
    """The share of pixels that are not the image's (or the box's) most common colour: a blank
    page, a spinner on an empty page or an undrawn chart is close to 0."""
    with Image.open(png) as image:
        image = image.convert("RGB")
        if box:
            image = image.crop(box)
        pixels = image.width * image.height
        return 1 - max(image.getcolors(pixels))[0] / pixels


@dataclass
class Runs:
    """What the three pipeline runs left, as the servers' REST APIs report it."""
    prefect: str
    mlflow: str
    pipelines: list[dict] = field(default_factory=list)  # Prefect flow runs, oldest first
    subflows: dict[str, list[dict]] = field(default_factory=dict)  # by pipeline flow run id
    experiment_id: str = ""
    mlflow_parents: list[dict] = field(default_factory=list)
    mlflow_children: list[dict] = field(default_factory=list)
    pretrains: list[dict] = field(default_factory=list)  # the two pretrain runs that trained
    models: list[dict] = field(default_factory=list)

    def load(self):
        api = f"{self.prefect}/api"
        self.pipelines = requests.post(f"{api}/flow_runs/filter", timeout=30, json={
            "flow_runs": {"parent_task_run_id": {"is_null_": True}}, "sort": "START_TIME_ASC"}).json()
        for run in self.pipelines:
            self.subflows[run["id"]] = requests.post(f"{api}/flow_runs/filter", timeout=30, json={
                "flow_runs": {"parent_flow_run_id": {"any_": [run["id"]]}}, "sort": "START_TIME_ASC"}).json()
        experiment = requests.get(f"{self.mlflow}/api/2.0/mlflow/experiments/get-by-name", timeout=30,
                                  params={"experiment_name": "gptflow"}).json()["experiment"]
        self.experiment_id = experiment["experiment_id"]
        runs = requests.post(f"{self.mlflow}/api/2.0/mlflow/runs/search", timeout=30, json={
            "experiment_ids": [self.experiment_id], "max_results": 1000}).json()["runs"]
        for run in runs:
            run["tags"] = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
        self.mlflow_parents = [r for r in runs if "mlflow.parentRunId" not in r["tags"]]
        self.mlflow_children = [r for r in runs if "mlflow.parentRunId" in r["tags"]]
        self.pretrains = sorted((r for r in self.mlflow_children if r["tags"].get("gptflow.stage") == "pretrain"
                                 and "gptflow.cached" not in r["tags"]), key=lambda r: r["info"]["start_time"])
        self.models = requests.get(f"{self.mlflow}/api/2.0/mlflow/registered-models/search", timeout=30,
                                   params={"max_results": 100}).json().get("registered_models", [])

    def problems(self) -> list[str]:
        """What the REST APIs say is wrong before any page is opened."""
        found = []
        rerun = self.subflows[self.pipelines[1]["id"]] if len(self.pipelines) == 3 else []
        if len(self.pipelines) != 3:
            found.append(f"Prefect has {len(self.pipelines)} pipeline runs, expected 3")
        elif len(rerun) != len(registry.STAGES) or {s["state"]["name"] for s in rerun} != {"Cached"}:
            found.append("the second pipeline run's subflows are not all Cached: "
                         + ", ".join(f"{s['name']}: {s['state']['name']}" for s in rerun))
        if len(self.pretrains) != 2:
            found.append(f"MLflow has {len(self.pretrains)} pretrain runs that trained, expected 2")
        elif len({r["info"]["run_name"] for r in self.pretrains}) != 2:
            found.append("the two pretrain runs have the same name")
        return found


# The checks: each opens a page, acts on it if a person would, waits for what it should show,
# and returns what it did not show (as lines) and the page regions that must not be blank.

def prefect_runs(b: Browser, runs: Runs):
    b.open(f"{runs.prefect}/runs", height=2900)  # every row, down to the first pipeline run
    names = [r["name"] for r in runs.pipelines]
    names += [s["name"] for p in runs.pipelines for s in runs.subflows[p["id"]] if s["name"].startswith("pretrain ")]
    return b.wait(counted(names), exact=True), {}


def _flow_run_page(b: Browser, runs: Runs, pipeline: dict, state: str):
    b.open(f"{runs.prefect}/runs/flow-run/{pipeline['id']}", height=1500)
    missing = b.wait({"Subflow Runs": 1}, exact=True)
    if not missing:
        b.click_text("Subflow Runs")
        stages = runs.subflows[pipeline["id"]]
        missing = b.wait({pipeline["name"]: 1} | {s["name"]: 1 for s in stages}, exact=True)
        # One badge per subflow, and the pipeline run's own (Completed) in the page header.
        missing += b.wait({state: len(stages) + (state == "Completed")}, exact=True, seconds=10)
    return missing, {"the run graph": ".flow-run-graph canvas"}


def prefect_pipeline_run(b: Browser, runs: Runs):
    return _flow_run_page(b, runs, runs.pipelines[0], "Completed")


def prefect_cached_run(b: Browser, runs: Runs):
    return _flow_run_page(b, runs, runs.pipelines[1], "Cached")


def prefect_artifacts(b: Browser, runs: Runs):
    b.open(f"{runs.prefect}/artifacts", height=1200)
    return b.wait({f"{name}-summary": 1 for name in ["pipeline", *registry.names()]}, exact=True), {}


def _dismiss(b: Browser):
    """Closes what MLflow 3 opens by itself on a first visit: the assistant panel, covering a third
    of every page, and the registry's "new Model Registry UI" dialog, covering the models list."""
    b.click('button[data-component-id="mlflow.assistant.chat_panel.close"]')
    b.click('[role="dialog"] button[aria-label="Close"]')


# Clicks a parent row's expander unless its stage runs already show (MLflow remembers what was
# expanded, and a second click would fold them away again).
EXPAND_JS = """(parent, children) => {
  if (children.some(id => document.querySelector(`a[href$="/runs/${id}"]`))) return;
  document.querySelector(`a[href$="/runs/${parent}"]`).closest('.ag-cell').querySelector('button').click();
}"""

# Drags the right edge of the Run Name column header by `dx` pixels. The grid ignores the
# DevTools protocol's synthetic mouse here, so the same drag is dispatched from inside the page.
WIDEN_JS = """(dx) => {
  const handle = document.querySelector('.ag-header-cell[col-id="attributes.`Run Name`"] .ag-header-cell-resize');
  if (!handle) return;
  const r = handle.getBoundingClientRect(), x = r.x + r.width / 2, y = r.y + r.height / 2;
  const event = (type, at) => new MouseEvent(type, {bubbles: true, cancelable: true, view: window, clientX: at,
                                                    clientY: y, button: 0, buttons: type === 'mouseup' ? 0 : 1});
  handle.dispatchEvent(event('mousedown', x));
  for (let i = 1; i <= 10; i++) document.dispatchEvent(event('mousemove', x + dx * i / 10));
  document.dispatchEvent(event('mouseup', x + dx));
}"""


def mlflow_runs(b: Browser, runs: Runs):
    b.open(f"{runs.mlflow}/#/experiments/{runs.experiment_id}/runs", height=1300)
    missing = b.wait(counted([r["info"]["run_name"] for r in runs.mlflow_parents]), exact=True,
                     meanwhile=lambda: _dismiss(b))
    if missing:
        return missing, {}
    # The parent rows come collapsed (MLflow keeps no expansion in the URL): click each row's
    # expander, as a person would, then widen the name column so the stage run names can be read.
    for parent in runs.mlflow_parents:
        children = [r["info"]["run_id"] for r in runs.mlflow_children
                    if r["tags"]["mlflow.parentRunId"] == parent["info"]["run_id"]]
        b.js(EXPAND_JS, parent["info"]["run_id"], children)
    b.js(WIDEN_JS, 200)
    return b.wait(counted([r["info"]["run_name"] for r in runs.mlflow_children]), exact=True,
                  meanwhile=lambda: _dismiss(b)), {}


def mlflow_metrics(b: Browser, runs: Runs):
    run = runs.pretrains[0]
    b.open(f"{runs.mlflow}/#/experiments/{runs.experiment_id}/runs/{run['info']['run_id']}/model-metrics",
           height=1300)
    search = 'input[placeholder="Search metric charts"]'
    missing = b.wait({"Model metrics": 1}, meanwhile=lambda: _dismiss(b))
    # Select what the box holds (MLflow remembers the last search) and type over it.
    if missing or not b.js("(s) => { const i = document.querySelector(s); if (i) i.select(); return !!i }", search):
        return missing or ["no chart search box"], {}
    b.call("Input.insertText", text="/loss")  # train/loss and val/loss, not the summary/ values
    name = run["info"]["run_name"]
    missing = b.wait({f"{name} (train/loss)": 1, f"{name} (val/loss)": 1}, exact=True,
                     meanwhile=lambda: _dismiss(b))
    lines = b.js("() => [...document.querySelectorAll('.js-plotly-plot path.js-line')]"
                 ".filter(p => (p.getAttribute('d') || '').length > 20).length")
    if lines < 2:
        missing.append(f"{lines} plotted lines, expected 2 (train/loss, val/loss)")
    return missing, {"the charts": ".js-plotly-plot"}


def mlflow_compare(b: Browser, runs: Runs):
    ids = [r["info"]["run_id"] for r in runs.pretrains]
    b.open(f"{runs.mlflow}/#/compare-runs?runs={json.dumps(ids)}&experiments={json.dumps([runs.experiment_id])}",
           height=1300)
    names = [r["info"]["run_name"] for r in runs.pretrains]
    missing = b.wait({name: 1 for name in names}, exact=True, meanwhile=lambda: _dismiss(b))
    if not missing:
        b.click('button[role="switch"][aria-label="Parameters - Show diff only"]')
        lrs = [next(p["value"] for p in r["data"]["params"] if p["key"] == "lr") for r in runs.pretrains]
        missing = b.wait({"lr": 1} | {lr: 1 for lr in lrs}, exact=True)
    return missing, {"the parallel coordinates plot": ".js-plotly-plot"}


def mlflow_models(b: Browser, runs: Runs):
    b.open(f"{runs.mlflow}/#/models")
    missing = b.wait(counted([m["name"] for m in runs.models]), exact=True, meanwhile=lambda: _dismiss(b))
    return missing + b.wait({"newest": len(runs.models)}, seconds=10), {}


def mlflow_model(b: Browser, runs: Runs):
    model = next(m for m in runs.models if m["name"] == "smoke-base")
    version = next(a["version"] for a in model["aliases"] if a["alias"] == "newest")
    b.open(f"{runs.mlflow}/#/models/smoke-base")
    missing = b.wait({"smoke-base": 1, f"Version {version}": 1}, exact=True, meanwhile=lambda: _dismiss(b))
    return missing + b.wait({"newest": 1}, seconds=10), {}


CHECKS = [prefect_runs, prefect_pipeline_run, prefect_cached_run, prefect_artifacts,
          mlflow_runs, mlflow_metrics, mlflow_compare, mlflow_models, mlflow_model]


def look(b: Browser, runs: Runs, check, png: Path) -> list[str]:
    try:
        problems, regions = check(b, runs)
    except Exception as err:  # noqa: BLE001 - a page that broke its check is a failed check, not a crash
        problems, regions = [f"{type(err).__name__}: {err}"], {}
    deadline = time.time() + 30
    while True:  # a chart or graph may still be drawing
        b.screenshot(png)
        blank = []
        if ink(png) < BLANK:
            blank.append("the page is blank")
        for label, selector in regions.items():
            boxes = b.boxes(selector)
            if not boxes:
                blank.append(f"{label} is not on screen")
            elif any(ink(png, box) < BLANK for box in boxes):
                blank.append(f"{label} is blank")
        if not blank or time.time() > deadline:
            return problems + blank
        time.sleep(2)


def smoke_profile(work: Path, judge_url: str) -> Path:
    """configs/smoke.yaml with this run's folders and the judge stub: a file named smoke.yaml, so
    the runs are named `pipeline smoke` and `pipeline smoke pretrain.lr=0.002`, as a user's are."""
    profile = yaml.safe_load(profile_path("smoke").read_text())
    profile.update(data_dir=str(work / "data"), mlflow_config=str(work / "mlflow.yaml"))
    profile["judge"] = {**profile.get("judge", {}), "host": judge_url}
    (work / "mlflow.yaml").write_text(yaml.safe_dump({
        "tracking_uri": f"sqlite:///{work}/mlflow.db", "experiment": "gptflow",
        "artifact_location": str(work / "mlruns"), "model_alias": "newest"}))
    path = work / "profile" / "smoke.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(profile, sort_keys=False))
    return path


def run_pipelines(profile: Path, env: dict, out: Path):
    for number, overrides in enumerate([[], [], ["--set", OVERRIDE]], 1):
        log = out / f"pipeline-{number}.log"
        started = time.time()
        with log.open("w") as output:
            done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", str(profile), *overrides],
                                  env=env, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, timeout=3600,
                                  check=False)
        print(f"pipeline run {number} {' '.join(overrides[1:]) or '(profile as is)':<20} "
              f"exit {done.returncode} in {time.time() - started:4.0f} s  {log}", flush=True)
        if done.returncode != 0:
            print("".join(log.read_text().splitlines(keepends=True)[-30:]), file=sys.stderr)
            raise RuntimeError(f"pipeline run {number} failed; see {log}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("ui-screenshots"), help="screenshots and logs")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT / "tests"))
    from ollama_stub import OllamaStub

    work = Path(tempfile.mkdtemp(prefix="gptflow-ui-"))
    prefect_port, mlflow_port = free_port(), free_port()
    prefect, mlflow = f"http://127.0.0.1:{prefect_port}", f"http://127.0.0.1:{mlflow_port}"
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": f"{prefect}/api", "PREFECT_SERVER_UI_API_URL": f"{prefect}/api",
           "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false"}
    env.setdefault("GPTFLOW_MIRROR", str(ROOT.parent / "shared" / "data" / "mirror"))
    env.pop("MLFLOW_TRACKING_URI", None)
    try:
        with ExitStack() as stack:
            judge = stack.enter_context(OllamaStub(reply="85"))
            profile = smoke_profile(work, judge.url)
            stack.enter_context(process_group(["prefect", "server", "start", "--host", "127.0.0.1", "--port",
                                               str(prefect_port)], out / "prefect-server.log", env=env))
            wait_for(f"{prefect}/api/health")
            run_pipelines(profile, env, out)
            stack.enter_context(process_group(["mlflow", "ui", "--backend-store-uri", f"sqlite:///{work}/mlflow.db",
                                               "--host", "127.0.0.1", "--port", str(mlflow_port)],
                                              out / "mlflow-ui.log", env=env))
            wait_for(f"{mlflow}/health")
            runs = Runs(prefect, mlflow)
            runs.load()
            failures = [f"rest-api: {p}" for p in runs.problems()]
            for line in failures:
                print(f"FAIL {line}")
            browser = stack.enter_context(Browser(work / "chromium", out / "chromium.log"))
            for check in CHECKS:
                name = check.__name__.replace("_", "-")
                png = out / f"{name}.png"
                problems = look(browser, runs, check, png)
                print(f"{'ok  ' if not problems else 'FAIL'} {name:<21} {png}", flush=True)
                for problem in problems:
                    print(f"     {problem}")
                failures += [f"{name}: {p}" for p in problems]
        failed = len({line.split(":")[0] for line in failures})
        verdict = f"all {len(CHECKS)} checks passed" if not failed else f"{failed} check(s) FAILED"
        print(f"{verdict}; screenshots in {out}")
        return 1 if failures else 0
    except RuntimeError as err:  # a server that did not start, a pipeline run that failed
        print(f"FAIL {err}")
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
