"""The KubeRay manifest: valid against the RayService CRD, and its serve config against Ray Serve and ours."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CRD = ROOT.parent / "shared" / "ref" / "kuberay" / "ray.io_rayservices.yaml"


def _rayservice() -> dict:
    docs = [d for d in yaml.safe_load_all((ROOT / "k8s" / "rayservice.yaml").read_text()) if d]
    assert len(docs) == 1 and docs[0]["kind"] == "RayService"
    return docs[0]


def _unknown_fields(value, schema: dict, path: str = "") -> list[str]:
    """Keys the CRD schema does not define (Kubernetes would silently prune them)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(value, dict) and "properties" in schema:
        for key, sub in value.items():
            if key not in schema["properties"]:
                found.append(f"{path}.{key}")
            else:
                found += _unknown_fields(sub, schema["properties"][key], f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            found += _unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


@pytest.mark.skipif(not CRD.exists(), reason="KubeRay CRD reference copy not present beside the checkout")
def test_rayservice_matches_the_crd_schema():
    import jsonschema

    crd = yaml.safe_load(CRD.read_text())
    manifest = _rayservice()
    version = manifest["apiVersion"].split("/")[1]
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]
    jsonschema.validate({k: v for k, v in manifest.items() if k != "metadata"} | {"metadata": {}}, schema)
    assert _unknown_fields(manifest["spec"], schema["properties"]["spec"], "spec") == []


def test_unknown_field_check_catches_typos():
    schema = {"properties": {"a": {"properties": {"b": {}}}}}
    assert _unknown_fields({"a": {"b": 1, "c": 2}}, schema) == [".a.c"]


def test_serve_config_v2_is_a_valid_serve_config_for_this_app():
    from ray.serve.schema import ServeDeploySchema

    from vidgen_serve.serve import deployment_defaults
    from vidgen_serve.serving.settings import ServeSettings

    config = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(config)
    app = schema.applications[0]
    assert app.import_path == "vidgen_serve.serve:build_app"
    settings = ServeSettings.model_validate(app.args)
    profile = settings.model.model_profile
    assert profile.name == "wan2.1-14b-tp8" and profile.tensor_parallel_size == 8
    assert profile.device == "cuda" and profile.dtype == "bfloat16"

    names = {d.name for d in app.deployments}
    assert names == set(deployment_defaults(settings)), names
    for dep in app.deployments:
        if dep.name == "FailoverRouter":
            assert dep.num_replicas == 1
            continue
        auto = dep.autoscaling_config
        assert auto["min_replicas"] >= 1 and auto["max_replicas"] >= auto["min_replicas"], dep.name
        assert dep.max_ongoing_requests and dep.max_queued_requests, dep.name
    standby = next(d for d in app.deployments if d.name == "DenoiserStandby")
    assert standby.autoscaling_config["min_replicas"] >= 1  # a warm standby


def test_gpu_groups_fit_the_tp8_denoisers():
    spec = _rayservice()["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    big = groups["a100x8"]
    gpus = big["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert int(gpus) == 8
    assert big["minReplicas"] >= 2  # primary + standby TP groups stay warm
