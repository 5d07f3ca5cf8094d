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


KUBERAY = Path(__file__).resolve().parents[1] / "jobs" / "kuberay" / "rayjob.yaml"


def test_kuberay_rayjob_has_what_the_operator_requires():
    """The fields KubeRay's RayJob CRD (ray.io/v1) requires or we rely on: an entrypoint, an
    autoscaling cluster spec whose head runs no work, and worker groups with the custom resources
    the stages' placement selects, scaling from 0."""
    job = yaml.safe_load(KUBERAY.read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["metadata"]["name"]
    spec = job["spec"]
    assert spec["entrypoint"].startswith("python -m dpo_ray pipeline --config ")
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "InteractiveMode")
    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"  # not exposed outside the cluster
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"gpu-train", "cpu-score"}
    for name, resource in (("gpu-train", "dpo_train"), ("cpu-score", "dpo_score")):
        group = groups[name]
        assert group["minReplicas"] == 0 < group["maxReplicas"]
        assert "rayStartParams" in group and resource in group["rayStartParams"]["resources"]
        containers = group["template"]["spec"]["containers"]
        assert containers and all(c["image"] and c["name"] for c in containers)
        assert {"name": "RAY_AUTH_MODE", "value": "token"} in containers[0]["env"]
    for template in [head["template"]] + [g["template"] for g in groups.values()]:
        mounts = template["spec"]["containers"][0]["volumeMounts"]
        assert any(m["mountPath"] == "/shared" for m in mounts)  # storage every pod sees
