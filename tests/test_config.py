from __future__ import annotations

import pytest
import yaml

from llamaduo_nb.config import ConfigError, load_config, read_params, table5_lora


def test_shipped_params_load(project_root):
    demo = load_config(project_root / "params" / "demo.yaml")
    assert demo.providers[0].kind == "embedded"
    paper = load_config(project_root / "params" / "paper_gemma7b.yaml")
    assert paper.inference.k == 4 and paper.evaluate.m == 10
    assert paper.evaluate.zetas == [50.0, 70.0]
    assert {p.kind for p in paper.providers} == {"openai", "anthropic", "google"}


def test_unknown_key_names_the_key_and_shows_an_example(make_params):
    path = make_params({"inference": {"kk": 4}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "'inference.kk'" in msg and "unknown key" in msg
    assert "k: 4" in msg  # the example of the right shape
    assert str(path) in msg


def test_unknown_top_level_key(make_params):
    with pytest.raises(ConfigError, match="'judge_model'.*unknown key"):
        load_config(make_params({"judge_model": "gpt-4o"}))


@pytest.mark.parametrize(
    ("extra", "key", "problem"),
    [
        ({"coverage": {"train_ratio": 1.2}}, "coverage.train_ratio", "between 0 and 1"),
        ({"coverage": {"train_ratio": 0}}, "coverage.train_ratio", "between 0 and 1"),
        ({"inference": {"k": 0}}, "inference.k", ">= 1"),
        ({"evaluate": {"m": 0}}, "evaluate.m", ">= 1"),
        ({"inference": {"k": "4"}}, "inference.k", "expected an integer"),
        ({"inference": {"k": True}}, "inference.k", "expected an integer"),
        ({"evaluate": {"judges": ["gpt4o"]}}, "evaluate.judges", "not a declared provider"),
        (
            {"evaluate": {"decision_statistic": "coverage@60"}},
            "evaluate.decision_statistic",
            "listed in zetas",
        ),
        ({"coverage": {"strictness": "loose"}}, "coverage.strictness", "not one of"),
        ({"loop": {"max_cycles": 0}}, "loop.max_cycles", ">= 1"),
        ({"deploy": {"parity_judges": ["nope"]}}, "deploy.parity_judges", "not one of evaluate.judges"),
        (
            {"providers": [{"name": "x", "kind": "openai", "model": "m", "api_key_env": "sk-abc"}]},
            "providers[0].api_key_env",
            "NAME of an environment variable",
        ),
    ],
)
def test_impossible_values_are_errors(make_params, extra, key, problem):
    with pytest.raises(ConfigError) as err:
        load_config(make_params(extra))
    assert f"'{key}'" in str(err.value)
    assert problem in str(err.value)


def test_missing_required_section(make_params, tmp_path):
    path = make_params()
    text = path.read_text().replace("coverage:", "coverage_old:")
    path.write_text(text)
    with pytest.raises(ConfigError, match="coverage"):
        load_config(path)


def test_overrides_use_dotted_keys(make_params):
    cfg = load_config(make_params(), {"loop.max_cycles": 5, "inference.k": 3})
    assert cfg.loop.max_cycles == 5 and cfg.inference.k == 3


def test_ints_are_accepted_for_floats(make_params):
    cfg = load_config(make_params({"evaluate": {"epsilon": 60}}))
    assert cfg.evaluate.epsilon == 60.0 and isinstance(cfg.evaluate.epsilon, float)


def test_table5_schedule():
    assert table5_lora(1_000) == (8, 16)
    assert table5_lora(16_000) == (8, 16)
    assert table5_lora(32_000) == (16, 32)
    assert table5_lora(64_000) == (32, 64)
    assert table5_lora(256_000) == (32, 64)


def test_parity_is_judged_by_the_chosen_and_every_deciding_llm_judge(make_params):
    from llamaduo_nb.deploy.parity import parity_evaluate_config

    metrics_only = load_config(make_params({"deploy": {"parity_judges": []}}))
    assert parity_evaluate_config(metrics_only).judges == []  # the demo decides on ROUGE-L
    deciding = load_config(
        make_params(
            {
                "evaluate": {"decision_judges": ["smollm2-service"]},
                "deploy": {"parity_judges": [], "parity_m": 2},
            }
        )
    )
    parity = parity_evaluate_config(deciding)
    assert parity.judges == ["smollm2-service"] and parity.m == 2


def test_a_params_file_extends_another_and_states_only_what_differs(tmp_path, project_root):
    ROOT = project_root
    base = yaml.safe_load((ROOT / "params" / "demo.yaml").read_text())
    base["coverage"]["source"] = str(ROOT / "data" / "sample_coverage.jsonl")
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    first = base["providers"][0]["name"]
    variant = {
        "extends": "base.yaml",
        "run_name": "variant",
        "evaluate": {"m": 3},  # one key of a section: the section's other keys stay
        "providers": [{"name": first, "rpm": 7}, {"name": "extra", "kind": "embedded", "model": "x"}],
    }
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "variant.yaml").write_text(yaml.safe_dump({**variant, "extends": "../base.yaml"}))
    data = read_params(tmp_path / "sub" / "variant.yaml")
    assert data["run_name"] == "variant" and data["evaluate"]["m"] == 3
    assert data["evaluate"]["judges"] == base["evaluate"]["judges"]
    assert [p["name"] for p in data["providers"]] == [p["name"] for p in base["providers"]] + ["extra"]
    merged_first = data["providers"][0]
    assert merged_first["rpm"] == 7 and merged_first["kind"] == base["providers"][0]["kind"]
    assert load_config(tmp_path / "sub" / "variant.yaml").evaluate.m == 3

    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="extend each other in a circle"):
        read_params(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"c.yaml, key 'extends': 'missing.yaml' not found"):
        read_params(tmp_path / "c.yaml")


def test_llamacpp_gguf_and_kv_cache_take_the_offered_types_only(tmp_path):
    import yaml

    from llamaduo_nb.config import KV_CACHE_TYPES, ConfigError, load_config
    from llamaduo_nb.runlayout import project_file

    params = yaml.safe_load(project_file("params/demo.yaml").read_text())
    path = tmp_path / "p.yaml"
    for key, bad in (("llamacpp_kv_cache", "q4_0"), ("llamacpp_gguf", "q4_k_m")):
        params["inference"][key] = bad
        path.write_text(yaml.safe_dump(params))
        with pytest.raises(ConfigError, match=rf"inference.{key}': '{bad}' is not one of"):
            load_config(path)
        params["inference"][key] = "f16"
    path.write_text(yaml.safe_dump(params))
    inf = load_config(path).inference
    assert (inf.llamacpp_gguf, inf.llamacpp_kv_cache) == ("f16", "f16") and set(KV_CACHE_TYPES) == {
        "q8_0",
        "f16",
    }
