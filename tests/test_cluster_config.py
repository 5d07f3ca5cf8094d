"""cluster.yaml against Ray's own cluster-launcher schema and our placement rules."""

from pathlib import Path

import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


def test_cluster_yaml_passes_rays_validator():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(CLUSTER.read_text())
    validate_config(prepare_config(config))  # raises on any schema violation


def test_head_runs_no_work_and_services_are_private():
    config = yaml.safe_load(CLUSTER.read_text())
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert types["gpu_train"]["min_workers"] == 0 and "dpo_train" in types["gpu_train"]["resources"]
    assert "dpo_score" in types["cpu_score"]["resources"]
    assert config["idle_timeout_minutes"] > 0
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "RAY_AUTH_MODE=token" in start
    assert any("torch==" in c for c in config["setup_commands"])
