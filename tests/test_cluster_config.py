"""cluster.yaml against Ray's own cluster-launcher schema, the KubeRay RayJob against the RayJob
CRD schema of the KubeRay release it targets, and both against our placement and auth rules."""

import copy
import json
from pathlib import Path

import jsonschema
import pytest
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
CRD_SCHEMA = KUBERAY.parent / "crd" / "rayjob-v1.6.2.schema.json"
DOCKERFILE = Path(__file__).resolve().parents[1] / "Dockerfile"


def _strict(schema):
    """The CRD's OpenAPI schema as the API server applies it with strict field validation
    (kubectl's default): a field the schema does not name is an error, except under
    ``x-kubernetes-preserve-unknown-fields``. JSON Schema alone would accept any typo."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crd_validator():
    schema = json.loads(CRD_SCHEMA.read_text())
    return jsonschema.Draft7Validator(_strict(schema))


def _errors(validator, doc):
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_kuberay_rayjob_validates_against_the_crd_schema(crd_validator):
    """The manifest against KubeRay v1.6.2's RayJob CRD (types, enums, required fields, and no
    unknown field anywhere in the pod templates), and the operator's own checks that the schema
    cannot express (ray-operator/controllers/ray/utils/validation.go)."""
    job = yaml.safe_load(KUBERAY.read_text())
    assert _errors(crd_validator, job) == []
    name = job["metadata"]["name"]
    assert len(name) <= 47 and name[0].isalpha() and all(c.isalnum() or c == "-" for c in name)
    assert job["spec"]["submissionMode"] in ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
    cluster = job["spec"]["rayClusterSpec"]
    assert tuple(map(int, cluster["rayVersion"].split("."))) >= (2, 52)  # token auth needs it


@pytest.mark.parametrize("path, value, expected", [
    (("spec", "rayClusterSpec", "headGroupSpec", "serviceTyp"), "ClusterIP", "serviceTyp"),
    (("spec", "rayClusterSpec", "headGroupSpec", "rayStartParams", "num-cpus"), 0, "is not of type"),
    (("spec", "rayClusterSpec", "workerGroupSpecs", 1, "minReplicas"), "0", "is not of type"),
    (("spec", "rayClusterSpec", "authOptions", "mode"), "tokens", "is not one of"),
    (("spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec", "containers", 0,
      "imagePullPolcy"), "IfNotPresent", "imagePullPolcy"),
])
def test_the_crd_schema_check_catches_what_the_api_server_would_refuse(crd_validator, path, value,
                                                                        expected):
    """The check can fail: a typo'd field, a number where KubeRay wants a string, a value outside
    an enum, each one edit away from the shipped manifest."""
    job = copy.deepcopy(yaml.safe_load(KUBERAY.read_text()))
    node = job
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    errors = _errors(crd_validator, job)
    assert errors and any(expected in e for e in errors), errors


def test_kuberay_rayjob_has_what_the_operator_requires():
    """The fields we rely on: an entrypoint, an autoscaling cluster spec whose head runs no work,
    token auth from a named Secret (KubeRay puts RAY_AUTH_TOKEN on head, workers and the submitter),
    a dashboard the head Service can reach but that stays inside the cluster, and worker groups
    with the custom resources the stages' placement selects, scaling from 0, on images the
    Dockerfile builds."""
    job = yaml.safe_load(KUBERAY.read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["entrypoint"].startswith("python -m dpo_ray pipeline --config ")
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": "dpo-ray-auth"}
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    # 127.0.0.1 would hide the job server from KubeRay's operator and submitter (they go through
    # the head Service); the Service itself is ClusterIP, never exposed outside the cluster.
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"gpu-train", "cpu-score"}
    for name, resource in (("gpu-train", "dpo_train"), ("cpu-score", "dpo_score")):
        group = groups[name]
        assert group["minReplicas"] == 0 < group["maxReplicas"]
        assert resource in json.loads(json.loads(group["rayStartParams"]["resources"]))
    images = {}
    for template in [head["template"]] + [g["template"] for g in groups.values()]:
        container = template["spec"]["containers"][0]
        # Auth comes from authOptions only: a hand-set RAY_AUTH_MODE/TOKEN would override it.
        assert not {e["name"] for e in container.get("env", [])} & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}
        assert any(m["mountPath"] == "/shared" for m in container["volumeMounts"])
        images[container["name"], "nvidia.com/gpu" in container["resources"]["limits"]] = container["image"]
    assert set(images.values()) == {"dpo-ray:0.1.0-cpu", "dpo-ray:0.1.0-cuda"}
    assert all(image.endswith("-cuda") == gpu for (_, gpu), image in images.items())


def test_dockerfile_builds_the_images_the_manifest_names():
    """The image comes from this repo's pyproject (pip install .), with torch pinned like
    scripts/setup.sh so the CPU variant never pulls a CUDA build, the Ray the manifest declares,
    and the tag the manifest uses (README gives the two build commands)."""
    text = DOCKERFILE.read_text()
    pyproject = (DOCKERFILE.parent / "pyproject.toml").read_text()
    assert "COPY pyproject.toml" in text and "pip install" in text and '".[' in text
    assert "ARG VARIANT=cpu" in text and "download.pytorch.org/whl/cpu" in text
    setup = (DOCKERFILE.parent / "scripts" / "setup.sh").read_text()
    torch_pin = setup.split("TORCH_SPEC:-torch==")[1].split("}")[0]
    assert f"TORCH_VERSION={torch_pin}" in text
    ray_pin = pyproject.split('"ray[default,train,data]>=')[1].split(",")[0]
    rayjob = yaml.safe_load(KUBERAY.read_text())
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"].startswith(ray_pin)
    readme = (DOCKERFILE.parent / "README.md").read_text()
    for variant in ("cpu", "cuda"):
        assert f"--build-arg VARIANT={variant} -t dpo-ray:0.1.0-{variant} ." in readme
