"""The pretraining recipe in the stage's own process or in every process of a training group.

`python -m flows.pretrain_worker LAUNCH_JSON` is what each rank runs when the pretrain stage's
config asks for more than one process (started by gpt_core.launcher on one node, by torchrun
on several; every other node runs the torchrun command the stage prints). Only rank 0 talks to MLflow, writing into
the stage's run through its id, and only rank 0 writes the model folder and `result.json`.
"""

import json
import sys
from pathlib import Path

import mlflow

from gpt_core.distributed import leave_group
from gpt_core.errors import GptflowError
from gpt_core.files import atomic_write_json
from gpt_core.recipes.pretrain import pretrain

from .tracking import MlflowLogger

RESULT = "result.json"
ERROR = "worker-error.txt"


def train_model(config, shards: dict, folder: Path, run_id: str) -> dict | None:
    """Run the recipe into `folder`; the result record on rank 0 (also written to result.json),
    None on the other ranks."""
    result = pretrain(config, shards, folder, logger=MlflowLogger(run_id), backend=config.distributed.backend)
    if result is None:
        return None
    training = result.training
    record = {"steps": training.steps, "tokens_seen": training.tokens_seen, "history": training.history,
              "best_val_loss": training.best_val_loss, "precision": training.precision,
              "world_size": training.world_size, "device": result.device, "parameters": result.parameters}
    atomic_write_json(folder / RESULT, record)
    return record


def main(argv: list[str] | None = None) -> int:
    from .pretrain import Config
    [spec_path] = argv if argv is not None else sys.argv[1:]
    spec = json.loads(Path(spec_path).read_text())
    folder = Path(spec["folder"])
    mlflow.set_tracking_uri(spec["tracking_uri"])
    try:
        train_model(Config(**spec["config"]), spec["shards"], folder, spec["run_id"])
    except GptflowError as err:
        # The stage's process reads this back, so the user sees the reason, not the launcher's.
        (folder / ERROR).write_text(str(err))
        print(f"gptflow: error: {err}", file=sys.stderr)
        return 2
    finally:
        leave_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
