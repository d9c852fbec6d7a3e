"""The whole pipeline through Prefect on the smoke profile: caching, partial re-runs, lineage."""

from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from ollama_stub import OllamaStub

from flows import registry
from flows.settings import load_profile
from flows.stage import run_stage
from gpt_core import metrics
from gpt_core.errors import GptflowError

ROOT = Path(__file__).resolve().parents[1]
STAGES = registry.names()
TRAINING_STAGES = ("pretrain", "spam", "lora", "instruct")


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory):
    """One data folder for the smoke pipeline tests: a later test reuses what an earlier one ran."""
    return tmp_path_factory.mktemp("smoke") / "data"


def _overrides(data_dir, tracking, stub_url):
    return [f"data_dir={data_dir}", f"mlflow_config={tracking}", f"judge.host={stub_url}"]


def test_smoke_pipeline_caches_and_reruns_only_what_changed(prefect_server, smoke_data, tmp_path, tracking, mirror):
    from flows.pipeline import pipeline_flow
    config = "smoke"
    with OllamaStub(reply="73") as stub:
        overrides = _overrides(smoke_data, tracking, stub.url)
        first = pipeline_flow(config=config, overrides=overrides)
        assert [r["stage"] for r in first] == STAGES
        assert {r["status"] for r in first} == {"done"}
        # The smoke model's answers may all be empty (scored 0 without asking), but the judge
        # stage must have checked the server before scoring.
        assert next(r for r in first if r["stage"] == "judge")["value"] in (0, 73)
        assert any(r["path"] == "/api/tags" for r in stub.requests)
        chats = len(stub.chats)

        second_state = pipeline_flow(config=config, overrides=overrides, return_state=True)
        second = second_state.result()
        assert {r["status"] for r in second} == {"cached"}
        assert len(stub.chats) == chats
        # The Prefect UI tells reused stages apart: each subflow ends in a Completed state named Cached.
        subflows = prefect_children(second_state.state_details.flow_run_id)
        assert sorted(run.name.split(" ")[0] for run in subflows) == sorted(STAGES)
        for run in subflows:
            assert (run.state.name, run.state.type.value) == ("Cached", "COMPLETED"), run.name
            assert "reused output" in run.state.message

        third = pipeline_flow(config=config, overrides=overrides + ["instruct.lr=0.002"])
        statuses = {r["stage"]: r["status"] for r in third}
        assert statuses == {**{s: "cached" for s in STAGES}, "instruct": "done", "judge": "done", "export": "done"}

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id], max_results=100)
    parents = sorted((r for r in runs if r.data.tags.get("gptflow.stage") == "pipeline"),
                     key=lambda r: r.info.start_time)
    assert len(parents) == 3
    first_parent, second_parent, third_parent = parents
    # Runs that differ in their overrides are told apart by name; each parent carries every headline.
    assert first_parent.info.run_name == second_parent.info.run_name != third_parent.info.run_name
    assert "instruct.lr=0.002" in third_parent.info.run_name
    assert {f"{s}.{registry.get(s).headline}" for s in STAGES} <= set(first_parent.data.metrics)
    assert first_parent.data.tags["gptflow.code_version"]
    # Every name logged anywhere is in the metric vocabulary.
    undeclared = {name for run in runs for name in run.data.metrics if not metrics.declared(name)}
    assert not undeclared
    children = {r.data.tags["gptflow.stage"]: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == first_parent.info.run_id}
    assert sorted(children) == sorted(STAGES)
    for run in children.values():
        assert run.data.tags.get("prefect.flow_run_id")
        assert run.info.status == "FINISHED"
        assert any(a.path == "manifest.json" for a in client.list_artifacts(run.info.run_id))
    # Lineage: the judge score leads back to the instruct model, its base model, the shards, the sources.
    chain = [("judge", "instruct"), ("instruct", "pretrain"), ("pretrain", "tokenize"), ("tokenize", "download")]
    for stage, upstream in chain:
        assert children[stage].data.tags[f"upstream.{upstream}.mlflow_run_id"] == children[upstream].info.run_id
    assert "summary/mean_score" in children["judge"].data.metrics
    # MFU counts the FLOPs each stage really does against a peak measured before any training.
    for stage in TRAINING_STAGES:
        mfu = [m.value for m in client.get_metric_history(children[stage].info.run_id, "mfu")]
        assert mfu and all(0 < value <= 1 for value in mfu), (stage, max(mfu, default=None))
    assert "summary/test_accuracy" in children["spam"].data.metrics
    assert any(k.startswith("source.") for k in children["tokenize"].data.params)
    # The fully cached run still has a nested run per stage: tagged cached, linking the producing run.
    reused = {r.data.tags["gptflow.stage"]: r for r in runs
              if r.data.tags.get("mlflow.parentRunId") == second_parent.info.run_id}
    assert sorted(reused) == sorted(STAGES)
    for stage, run in reused.items():
        assert run.data.tags["gptflow.cached"] == "true"
        assert run.data.tags["gptflow.produced_by"] == children[stage].info.run_id
        assert children[stage].info.run_id in run.data.tags["mlflow.note.content"]
        assert run.info.run_name.startswith(stage) and run.info.run_name.endswith("(cached)")
    assert reused["spam"].data.metrics["summary/test_accuracy"] == children["spam"].data.metrics["summary/test_accuracy"]
    summary = client.download_artifacts(first_parent.info.run_id, "summary.txt")
    assert "judge" in Path(summary).read_text()


def prefect_children(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))


def test_a_run_with_nothing_to_run_starts_no_prefect_flow_but_logs_to_mlflow(prefect_server, smoke_data, tracking,
                                                                            mirror, run_cli):
    from prefect.client.orchestration import get_client

    from flows.run_all import nothing_to_run
    # An unreachable judge: the optional judge is skipped, every other stage reuses the first test's output.
    overrides = _overrides(smoke_data, tracking, "http://127.0.0.1:9")
    profile = load_profile("smoke", overrides)
    for name in STAGES:
        run_stage(name, profile)
    assert nothing_to_run(profile, [])
    assert not nothing_to_run(profile, ["pretrain"])
    assert not nothing_to_run(load_profile("smoke", overrides + ["instruct.lr=0.003"]), [])

    def flow_runs():
        with get_client(sync_client=True) as client:
            return len(client.read_flow_runs(limit=200))

    before = flow_runs()
    code, out, err = run_cli("run", "--config", "smoke", *[arg for o in overrides for arg in ("--set", o)])
    assert code == 0, err
    assert "no Prefect server is started" in out
    rows = [line.split() for line in out.splitlines()]
    statuses = {row[0]: row[1] for row in rows if row and row[0] in STAGES}
    assert statuses == {**{s: "cached" for s in STAGES}, "judge": "skipped"}
    assert flow_runs() == before
    client = MlflowClient()
    [latest] = client.search_runs([client.get_experiment_by_name("test").experiment_id],
                                  "tags.`gptflow.stage` = 'pipeline'", order_by=["attributes.start_time DESC"],
                                  max_results=1)
    assert latest.data.tags["stage.pretrain"] == "cached" and latest.data.tags["stage.judge"] == "skipped"
    assert "prefect.flow_run_id" not in latest.data.tags


def test_force_trains_from_scratch(prefect_server, smoke_data, tracking, mirror):
    """--force sets the earlier output and its checkpoints aside: the stage trains again from step 1."""
    config = "smoke"
    profile = load_profile(config, _overrides(smoke_data, tracking, "http://127.0.0.1:9"))
    before = run_stage("pretrain", profile)
    forced = run_stage("pretrain", profile, force=True)
    assert forced["cached"] is False and forced["key"] == before["key"]
    assert forced["mlflow_run_id"] != before["mlflow_run_id"]
    losses = MlflowClient().get_metric_history(forced["mlflow_run_id"], "train/loss")
    assert [m.step for m in losses] == list(range(1, forced["metrics"]["steps"] + 1))
    assert list((smoke_data / "pretrain").glob(f"{before['key']}.replaced-*/manifest.json"))
    # Training is deterministic: from scratch it reaches the same weights, which are registered once.
    assert forced["outputs"]["model_sha256"] == before["outputs"]["model_sha256"]
    assert forced["outputs"]["model_version"] == before["outputs"]["model_version"]


def test_a_flow_run_whose_process_died_is_marked_crashed(prefect_server, tmp_path):
    import json
    import socket
    import subprocess
    import sys

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    from flows.crashes import NOTES, mark_dead_runs_crashed

    @flow(name="killed-pipeline")
    def killed():
        pass

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(killed, state=Running())
        (tmp_path / NOTES).mkdir()
        (tmp_path / NOTES / f"{run.id}.json").write_text(
            json.dumps({"flow_run_id": str(run.id), "pid": gone.pid, "host": socket.gethostname()}))
        assert mark_dead_runs_crashed(tmp_path) == [str(run.id)]
        state = client.read_flow_run(run.id).state
    assert state.type.value == "CRASHED" and str(gone.pid) in state.message
    assert not list((tmp_path / NOTES).iterdir())


TOY_STAGE = '''
"""A stage that reads the tokenize stage's manifest and reports a figure from it."""

from dataclasses import dataclass

from flows.settings import stage_config
from gpt_core.settings import Settings, setting


@stage_config
@dataclass(frozen=True)
class Config(Settings):
    factor: int = setting(2, gt=0, doc="what the token count is multiplied by")


def run(ctx):
    tokens = ctx.upstream["tokenize"]["metrics"]["train_tokens"]
    (ctx.folder / "count.txt").write_text(str(tokens * ctx.config.factor))
    return {"count": str(ctx.folder / "count.txt")}, {"scaled_tokens": tokens * ctx.config.factor}
'''


def test_a_new_stage_is_one_file_and_one_registry_entry(prefect_server, smoke_data, tracking, mirror, tmp_path,
                                                        monkeypatch):
    from flows.pipeline import pipeline_flow
    (tmp_path / "toy_stage.py").write_text(TOY_STAGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "STAGES", [*registry.STAGES, registry.Stage(
        "toy", "toy_stage", ("tokenize",), "scaled_tokens", "a stage added by a test")])
    config = "smoke"
    overrides = _overrides(smoke_data, tracking, "http://127.0.0.1:9") + ["toy.factor=3"]
    rows = {r["stage"]: r for r in pipeline_flow(config=config, overrides=overrides)}
    assert list(rows) == [*STAGES, "toy"]
    assert rows["toy"]["status"] == "done" and rows["tokenize"]["status"] == "cached"
    tokenize = run_stage("tokenize", load_profile(config, overrides))
    assert rows["toy"]["value"] == 3 * tokenize["metrics"]["train_tokens"]
    # Everything that reads the stage list sees it: `--force` names, `gptflow stage` choices.
    assert registry.check_names(["toy"]) == {"toy"}
    with pytest.raises(GptflowError, match="toy.bogus: unknown key"):
        load_profile(config, overrides + ["toy.bogus=1"])
    with pytest.raises(GptflowError, match="unknown stage.*toys"):
        registry.check_names(["toys"])


def test_judge_unreachable_fails_the_run_but_keeps_earlier_stages(prefect_server, smoke_data, tracking, mirror):
    from flows.pipeline import pipeline_flow
    config = "smoke"
    overrides = _overrides(smoke_data, tracking, "http://127.0.0.1:9")
    with pytest.raises(GptflowError, match="ollama serve"):
        pipeline_flow(config=config, overrides=overrides + ["judge.optional=false"])
    # Earlier stages left their outputs: with the judge optional (the smoke profile's), the re-run reuses them.
    rows = pipeline_flow(config=config, overrides=overrides)
    statuses = {r["stage"]: r["status"] for r in rows}
    assert statuses == {**{s: "cached" for s in STAGES}, "judge": "skipped"}
    assert "ollama serve" in next(r for r in rows if r["stage"] == "judge")["note"]


def test_deploy_registers_the_pipeline_with_its_cron_schedule(prefect_server):
    import asyncio

    from prefect.client.orchestration import get_client

    from flows.deploy import build_deployment

    config = "smoke"
    deployment_id = build_deployment("nightly", "0 3 * * *", config, ["pretrain.max_steps=5"],
                                     timezone="Europe/Paris").apply()

    async def read():
        async with get_client() as client:
            return await client.read_deployment(deployment_id)

    deployment = asyncio.run(read())
    assert deployment.name == "nightly"
    assert [(s.schedule.cron, s.schedule.timezone) for s in deployment.schedules] == [("0 3 * * *", "Europe/Paris")]
    assert deployment.parameters == {"config": config, "overrides": ["pretrain.max_steps=5"]}
    with pytest.raises(GptflowError, match="cron"):
        build_deployment("nightly", "every night", config, [])
    with pytest.raises(GptflowError, match="--timezone: 'Mars/Olympus' is not an IANA time zone"):
        build_deployment("nightly", "0 3 * * *", config, [], timezone="Mars/Olympus")


def test_tokenize_fans_segments_out_as_tasks_on_a_dask_cluster(prefect_server, tmp_path, tracking, mirror):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    from flows.settings import load_profile
    from gpt_core.shards import read_shard

    overrides = [f"data_dir={tmp_path / 'data'}", f"mlflow_config={tracking}", "tokenize.segment_bytes=5000"]
    config = "smoke"
    local = load_profile(config, overrides)
    download = run_stage("download", local)
    # A folder of its own: in the same one the local run's shards would be reused.
    on_dask = load_profile(config, [*overrides, f"data_dir={tmp_path / 'dask'}", "tokenize.task_runner=dask",
                                    "tokenize.dask_workers=2"])
    manifests = {name: run_stage("tokenize", profile, {"download": download}) for name, profile in (("local", local), ("dask", on_dask))}
    assert not any(m["cached"] for m in manifests.values())
    results = {name: m["outputs"]["pretrain"] for name, m in manifests.items()}

    assert results["dask"]["segments"] == results["local"]["segments"] == 5
    for split in ("train", "val"):
        streams = [[t for s in result[split]["shards"] for t in read_shard(s["path"]).tolist()]
                   for result in results.values()]
        assert streams[0] == streams[1] and len(streams[0]) == results["dask"][split]["tokens"]

    async def segment_runs():
        async with get_client() as client:
            return await client.read_task_runs(task_run_filter=TaskRunFilter(
                name=TaskRunFilterName(like_="tokenize-segment")))
    runs = asyncio.run(segment_runs())
    assert len(runs) == 5 and all(run.state.is_completed() for run in runs)
