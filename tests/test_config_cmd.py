from pathlib import Path

import yaml

from flows.config_reference import reference, rows
from flows.settings import load_profile

DOCS = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_the_key_reference_in_the_docs_is_current():
    assert DOCS.read_text() == reference(), "docs/config.md is stale: run `gptflow config reference > docs/config.md`"


def test_the_reference_names_every_key_a_profile_holds_with_its_meaning():
    def keys(values, prefix=""):
        for name, value in values.items():
            yield prefix + name
            if isinstance(value, dict):
                yield from keys(value, f"{prefix}{name}.")

    shown = load_profile("default", ["instruct.lora.rank=4"]).model_dump(mode="json")
    documented = {key: meaning for key, meaning, *_ in rows()}
    top = {"data_dir", "sources_manifest", "mlflow_config"}
    assert {key for key in keys(shown) if "." in key or key in top} == set(documented)
    assert [key for key, meaning in documented.items() if not meaning] == []


def test_validate_catches_a_bad_key_and_a_bad_value(run_cli):
    code, out, err = run_cli("config", "validate", "--config", "smoke")
    assert code == 0 and out.strip() == "ok: smoke", err
    code, out, err = run_cli("config", "validate", "--config", "smoke", "--set", "pretrain.lerning_rate=1")
    assert code == 2 and err.strip().endswith("pretrain.lerning_rate: unknown key") and len(err.splitlines()) == 1
    code, out, err = run_cli("config", "validate", "--set", "lora.scaling=paper")
    assert code == 2 and "lora.scaling" in err and len(err.splitlines()) == 1


def test_a_bad_value_for_a_union_key_is_one_problem_naming_its_options(run_cli):
    # pydantic reports each branch of `bool | Literal['auto']` apart, with the branch in the key.
    code, out, err = run_cli("config", "validate", "--config", "smoke", "--set", "pretrain.compile=maybe",
                             "--set", "instruct.generation_compile=3", "--set", "pretrain.stride=x")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.strip().endswith(
        "pretrain.compile: must be bool or one of 'auto', got 'maybe'; "
        "pretrain.stride: Input should be a valid integer, unable to parse string as an integer; "
        "instruct.generation_compile: must be bool or one of 'auto', got 3")


def test_show_prints_the_resolved_values_overrides_included(run_cli):
    code, out, err = run_cli("config", "show", "--config", "book", "--set", "pretrain.lr=0.002")
    assert code == 0, err
    values = yaml.safe_load(out)
    assert values["pretrain"]["lr"] == 0.002 and values["lora"]["scaling"] == "book"
    assert load_profile("book", ["pretrain.lr=0.002"]).model_dump(mode="json") == values
