"""The MLflow pyfunc model of every gptflow model, logged "from code" by flows.tracking.log_model.

MLflow runs this file when it loads the model (mlflow.pyfunc.load_model, `mlflow models serve`);
flows never import it. It needs only gpt_core, which travels with the model as a code path, and
two artifacts: `weights`, the model folder (config.json + model.safetensors, nothing pickled),
and `tokenizer`, a copy of GPT-2's BPE files, so loading needs neither the mirror nor the internet.

What `predict` takes and returns follows from the folder's config.json (gpt_core.weights.model_kind):

- language model: column `prompt`; returns `text` (prompt + continuation) and `completion`;
  params max_new_tokens, temperature, top_k, top_p, seed;
- classifier: column `text`; returns `label` and its `probability`;
- instruction model: columns `instruction` and optional `input`; returns `response`;
  params max_new_tokens, temperature.
"""

import math

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

from gpt_core.classifier import classify_text
from gpt_core.errors import GptflowError
from gpt_core.generate import generate
from gpt_core.instruct import generate_responses
from gpt_core.tokenizer import encode_with_end_of_text, get_tokenizer, seed_bpe_cache
from gpt_core.weights import load_model, model_kind


def _strings(frame: pd.DataFrame, column: str, required: bool = True) -> list[str]:
    if column not in frame:
        if required:
            raise GptflowError(f"the input needs a '{column}' column; it has {', '.join(map(str, frame.columns))}")
        return [""] * len(frame)
    return ["" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)
            for value in frame[column]]


def _positive(params: dict, name: str) -> int:
    value = int(params[name])
    if value < 1:
        raise GptflowError(f"{name} must be at least 1, got {value}")
    return value


class GptflowModel(PythonModel):
    def load_context(self, context):
        seed_bpe_cache(context.artifacts["tokenizer"])
        self.tokenizer = get_tokenizer()
        self.model, self.config = load_model(context.artifacts["weights"])
        self.model.eval()
        self.kind = model_kind(self.config)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        try:
            if self.kind == "classifier":
                return self._classify(frame)
            if self.kind == "instruct":
                return self._answer(frame, params or {})
            return self._complete(frame, params or {})
        except GptflowError as err:
            # MLflow answers an invalid parameter with 400 and the message, not 500.
            raise MlflowException.invalid_parameter_value(str(err)) from None

    def _complete(self, frame: pd.DataFrame, params: dict) -> pd.DataFrame:
        prompts = _strings(frame, "prompt")
        options = {k: params.get(k) for k in ("top_k", "top_p", "seed")}
        new = generate(self.model, [encode_with_end_of_text(self.tokenizer, p) for p in prompts],
                       _positive({"max_new_tokens": 50, **params}, "max_new_tokens"),
                       temperature=float(params.get("temperature") or 0.0), **options)
        completions = [self.tokenizer.decode(tokens) for tokens in new]
        return pd.DataFrame({"text": [p + c for p, c in zip(prompts, completions)], "completion": completions})

    def _classify(self, frame: pd.DataFrame) -> pd.DataFrame:
        labels = self.config.get("labels") or [str(i) for i in range(self.model.cfg.num_classes)]
        max_length = self.config.get("max_length") or self.model.cfg.context_length
        results = [classify_text(self.model, self.tokenizer, text, max_length, labels)
                   for text in _strings(frame, "text")]
        return pd.DataFrame(results, columns=["label", "probability"])

    def _answer(self, frame: pd.DataFrame, params: dict) -> pd.DataFrame:
        entries = [{"instruction": instruction, "input": extra}
                   for instruction, extra in zip(_strings(frame, "instruction"), _strings(frame, "input", False))]
        responses = generate_responses(
            self.model, self.tokenizer, entries, style=self.config.get("style", "alpaca"),
            max_new_tokens=_positive({"max_new_tokens": 256, **params}, "max_new_tokens"),
            temperature=float(params.get("temperature") or 0.0))
        return pd.DataFrame({"response": responses})


mlflow.models.set_model(GptflowModel())
