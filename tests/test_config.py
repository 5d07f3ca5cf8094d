"""Typed config: YAML + overrides, unknown keys named, required fields fail fast."""

import pytest

from dpo_ray.config import DataConfig, load_config, parse_overrides, save_config


def test_yaml_section_plus_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  source: a.jsonl\n  tokenizer: tok\n  max_length: 128\n")
    cfg = load_config(DataConfig, path, ["data.max_prompt_length=64", "data.on_bad_row=skip"],
                      section="data")
    assert (cfg.source, cfg.max_length, cfg.max_prompt_length, cfg.on_bad_row) == (
        "a.jsonl", 128, 64, "skip")
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(DataConfig, tmp_path / "saved.yaml") == cfg


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ValueError, match="max_lenght"):
        load_config(DataConfig, None, ["data.source=a", "data.tokenizer=t", "data.max_lenght=3"],
                    section="data")


def test_missing_required_field_is_named():
    with pytest.raises(ValueError, match="tokenizer"):
        load_config(DataConfig, None, ["data.source=a"], section="data")


def test_wrong_type_and_bad_values_are_errors():
    with pytest.raises(ValueError, match="on_bad_row"):
        load_config(DataConfig, None, ["source=a", "tokenizer=t", "on_bad_row=ignore"])
    with pytest.raises(ValueError, match="max_prompt_length"):
        DataConfig(source="a", tokenizer="t", max_length=64, max_prompt_length=64)


def test_override_values_are_yaml_scalars():
    assert parse_overrides(["a.b=3", "c=null", "d=x=y"]) == {"a": {"b": 3}, "c": None, "d": "x=y"}
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["novalue"])


def test_sweep_and_recipe_directories_are_paths_every_node_mounts():
    from dpo_ray.config import Placement, local_dir

    assert str(local_dir("file:///shared/runs", "train.output_dir")) == "/shared/runs"
    with pytest.raises(ValueError, match="output_dir='s3://b/runs': sweeps and recipes"):
        local_dir("s3://b/runs", "output_dir")
    assert Placement().ray_data_kwargs() == {}
    assert Placement(resources={"dpo_score": 1}, accelerator_type="L4").ray_data_kwargs() == {
        "resources": {"dpo_score": 1.0}, "accelerator_type": "L4"}


def test_every_actor_pool_is_requested_from_its_stage_config(monkeypatch):
    from dpo_ray import ray_env
    from dpo_ray.config import DataConfig, EvalConfig, Pool, RunConfig, Tasks, load_config
    from dpo_ray.ray_env import actor_pool_kwargs, task_pool_kwargs

    # With Ray up (an earlier test in the session started it), each request is first checked
    # against the cluster, which has no dpo_score nodes: record the checks instead (check_resources
    # has its own tests in test_hardening.py).
    checked = []
    monkeypatch.setattr(ray_env.ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray_env, "check_resources", lambda what, *args: checked.append(what))

    # One Pool sub-config under the same key in every stage, from YAML-style overrides.
    run = load_config(RunConfig, overrides=[
        "data.source=x", "data.tokenizer=t", "data.tasks.max_tasks=2", "reference.model=m",
        "reference.pool.max_actors=3", "reference.pool.num_cpus_per_actor=2",
        "reference.pool.placement.resources={dpo_score: 1}"])
    kwargs = actor_pool_kwargs(run.reference.pool, "reference scorer")
    assert (kwargs["compute"].min_size, kwargs["compute"].max_size) == (1, 3)
    assert (kwargs["num_cpus"], kwargs["num_gpus"], kwargs["resources"]) == (2, 0, {"dpo_score": 1.0})
    assert checked == ["reference scorer actor pool"]
    checked.clear()
    tokenizing = task_pool_kwargs(run.data.tasks, "tokenizer")  # tasks: no actor to start
    assert (tokenizing["compute"].size, tokenizing["num_cpus"]) == (2, 1.0)
    assert task_pool_kwargs(Tasks(), "tokenizer")["compute"].size is None
    # Known work: as many actors as blocks from the start (within min..max), one block each at a time.
    sized = [actor_pool_kwargs(run.reference.pool, "reference scorer", blocks)["compute"] for blocks in (2, 9)]
    assert [(s.initial_size, s.max_tasks_in_flight_per_actor) for s in sized] == [(2, 1), (3, 1)]
    fixed = actor_pool_kwargs(Pool(min_actors=2, max_actors=2), "generation")["compute"]
    assert (fixed.min_size, fixed.max_size) == (2, 2)
    evaluation = load_config(EvalConfig, overrides=[
        "prompts=p", "generation.pool.max_actors=4",
        "judges=[{kind: function, name: vader, pool: {min_actors: 3, max_actors: 3, num_gpus_per_actor: 1}}]"])
    judge = actor_pool_kwargs(evaluation.judges[0].pool, "judge")
    assert (judge["compute"].min_size, judge["compute"].max_size, judge["num_gpus"]) == (3, 3, 1)
    assert evaluation.generation.pool.max_actors == 4 and DataConfig("x", "t").tasks == Tasks()
    with pytest.raises(ValueError, match="max_actors=1 is below min_actors=2"):
        load_config(RunConfig, overrides=["data.source=x", "data.tokenizer=t", "reference.model=m",
                                          "reference.pool.min_actors=2", "reference.pool.max_actors=1"])


def test_home_in_model_and_tokenizer_paths_is_expanded_as_the_shipped_configs_use_it():
    """jobs/hh_smollm2.yaml names ~/.cache/... folders; transformers reads "~" as a hub id."""
    from pathlib import Path

    from dpo_ray.config import RunConfig

    config = load_config(RunConfig, Path(__file__).parents[1] / "jobs" / "hh_smollm2.yaml")
    home = str(Path.home())
    assert config.data.tokenizer.startswith(home) and config.reference.model.startswith(home)
    assert config.eval.reference.startswith(home)
    assert config.eval.baseline == "chosen"  # keywords are left alone
    assert load_config(RunConfig, overrides=["data.source=x", "data.tokenizer=org/model",
                                             "reference.model=~/m"]).data.tokenizer == "org/model"


def test_eval_source_and_eval_fraction_are_one_choice():
    from dpo_ray.config import ReferenceConfig, RunConfig, TrainConfig

    data = DataConfig(source="train.jsonl", tokenizer="t", limit=100, eval_source="Org/held-out",
                      eval_limit=50)
    held = data.held_out()
    assert (held.source, held.limit, held.eval_source, held.max_length) == (
        "Org/held-out", 50, None, data.max_length)
    assert DataConfig(source="a", tokenizer="t").held_out() is None
    run = RunConfig(data=data, reference=ReferenceConfig(model="m"))
    assert run.has_held_out
    with pytest.raises(ValueError, match="both choose the held-out pairs"):
        RunConfig(data=data, reference=ReferenceConfig(model="m"), train=TrainConfig(eval_fraction=0.1))


def test_a_relative_model_folder_is_made_absolute_where_it_was_typed(tmp_path, monkeypatch):
    """Ray workers do not run in the user's working directory: "tiny" typed there must not reach
    them as "tiny" (transformers would then ask the hub for a repo of that name)."""
    from dpo_ray.config import ReferenceConfig

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    assert ReferenceConfig(model="models/tiny").model == str(tmp_path / "models" / "tiny")
    assert DataConfig(source="a", tokenizer="models/tiny").tokenizer == str(tmp_path / "models" / "tiny")
    assert ReferenceConfig(model="HuggingFaceTB/SmolLM2-135M").model == "HuggingFaceTB/SmolLM2-135M"


def test_the_main_job_yaml_lists_every_recipe_field():
    """jobs/sentiment.yaml is the main job's whole knob set: a field added to SentimentConfig
    (or to a config it holds) must appear there too."""
    from pathlib import Path

    import yaml

    from dpo_ray.config import config_dict
    from dpo_ray.recipes.sentiment import SentimentConfig

    def keys(tree, prefix=""):
        return {f"{prefix}{k}" for k in tree} | {
            key for k, v in tree.items() if isinstance(v, dict) and v
            for key in keys(v, f"{prefix}{k}.")}

    listed = yaml.safe_load((Path(__file__).parents[1] / "jobs" / "sentiment.yaml").read_text())
    assert keys(config_dict(SentimentConfig())) - keys(listed) == set()
