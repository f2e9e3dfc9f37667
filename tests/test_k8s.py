"""KubeRay manifests: rendered from serve_config.yaml without drift, built with kustomize, and
valid against the KubeRay CRD (unknown fields are errors), Kubernetes' own schemas, Ray
Serve's config schema and this application's settings. No cluster needed."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vidgen_serve.deploy import k8s

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
# The reference copy lives beside the checkout (../shared/...), never inside it;
# VIDGEN_KUBERAY_CRD points elsewhere for checkouts that sit deeper (git worktrees).
CRD = Path(os.environ.get("VIDGEN_KUBERAY_CRD") or ROOT.parent / "shared" / "ref" / "kuberay" / "ray.io_rayservices.yaml")
OVERLAYS = k8s.overlay_names(K8S)


@pytest.fixture(scope="module")
def crd() -> Path:
    if not CRD.is_file():
        pytest.fail(f"KubeRay CRD reference copy missing at {CRD} (needed to validate the RayService)")
    return CRD


@pytest.fixture(scope="module")
def built() -> dict[str, list[dict]]:
    return {name: k8s.build_overlay(K8S / "overlays" / name) for name in OVERLAYS}


def _one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, [d["kind"] for d in docs]
    return found[0]


def _serve_config(docs: list[dict]) -> dict:
    return yaml.safe_load(_one(docs, "RayService")["spec"]["serveConfigV2"])


def _groups(docs: list[dict]) -> dict[str, dict]:
    return {g["groupName"]: g for g in _one(docs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


def _containers(docs: list[dict]):
    cluster = _one(docs, "RayService")["spec"]["rayClusterConfig"]
    yield "head", cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    for group in cluster["workerGroupSpecs"]:
        yield group["groupName"], group["template"]["spec"]["containers"][0]


# ---- the merge that builds each overlay's serve config ----------------------------------------


def test_merge_config_merges_mappings_and_named_lists():
    base = {"a": {"x": 1, "y": 2}, "keep": [1, 2],
            "deployments": [{"name": "A", "opts": {"cpu": 1, "gpu": 0}}, {"name": "B", "n": 1}]}
    override = {"a": {"y": 3, "x": None}, "keep": [9],
                "deployments": [{"name": "B", "n": 2}, {"name": "C", "n": 3}, {"name": "A", "opts": {"gpu": 1}}]}
    before = copy.deepcopy(base)
    merged = k8s.merge_config(base, override)
    assert merged == {"a": {"y": 3}, "keep": [9],
                      "deployments": [{"name": "A", "opts": {"cpu": 1, "gpu": 1}}, {"name": "B", "n": 2},
                                      {"name": "C", "n": 3}]}
    assert base == before  # inputs untouched
    merged["deployments"][0]["opts"]["cpu"] = 99
    assert override["deployments"][2]["opts"] == {"gpu": 1}


# ---- one source: the rendered serveConfigV2 ----------------------------------------------------


def test_layout_has_both_overlays():
    assert set(OVERLAYS) == {"dev-cpu", "prod-a100"}
    assert (K8S / "base" / "kustomization.yaml").is_file()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_committed_patch_matches_a_fresh_render(overlay):
    result = k8s.render_overlay(K8S, overlay, ROOT / "serve_config.yaml", write=False)
    assert not result.changed, f"{result.path} drifted from serve_config.yaml: run `vidgen-serve k8s render`"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_built_rayservice_carries_the_rendered_serve_config(overlay, built):
    expected = k8s.overlay_serve_config(K8S, overlay, ROOT / "serve_config.yaml")
    assert _serve_config(built[overlay]) == expected
    # ... and that is serve_config.yaml with only the overlay's overrides changed.
    base = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    assert expected["proxy_location"] == base["proxy_location"]
    assert [d["name"] for d in expected["applications"][0]["deployments"]] == \
        [d["name"] for d in base["applications"][0]["deployments"]]


def test_render_detects_drift_and_rewrites(tmp_path):
    shutil.copytree(K8S, tmp_path / "k8s")
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["applications"][0]["args"]["max_queued_jobs"] = 7
    changed = tmp_path / "serve_config.yaml"
    changed.write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [sys.executable, "-m", "vidgen_serve.cli", "k8s", "render", "--config", str(changed),
           "--k8s-dir", str(tmp_path / "k8s"), "--overlay", "dev-cpu"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    stale = subprocess.run([*cmd, "--check"], capture_output=True, text=True, env=env, timeout=120)
    assert stale.returncode == 1 and "out of date" in stale.stderr, stale.stderr
    assert subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120).returncode == 0
    patch = yaml.safe_load((tmp_path / "k8s/overlays/dev-cpu/serve-config.patch.yaml").read_text())
    assert yaml.safe_load(patch["spec"]["serveConfigV2"])["applications"][0]["args"]["max_queued_jobs"] == 7
    again = subprocess.run([*cmd, "--check"], capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 0, again.stderr


def _render_with(tmp_path: Path, mutate) -> Path:
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    mutate(config)
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    shutil.copytree(K8S, tmp_path / "k8s")
    return path


@pytest.mark.parametrize(("mutate", "field"), [
    (lambda c: c["applications"][0]["args"].update(max_inflight_sync=0), "applications[0].args.max_inflight_sync"),
    (lambda c: c["applications"][0]["args"]["model"].update(profile_overrides={"tensor_parallel_size": 3}),
     "applications[0].args.model"),
    (lambda c: c["applications"][0]["deployments"][1]["autoscaling_config"].update(min_replicas=-1),
     "applications[0].deployments[1].autoscaling_config.min_replicas"),
    (lambda c: c["applications"][0]["deployments"].append({"name": "Upscaler", "num_replicas": 1}),
     "applications[0].deployments[6].name"),
    (lambda c: c["applications"][0]["deployments"][0].update(max_ongoing_requets=1),
     "applications[0].deployments[0].max_ongoing_requets"),
    (lambda c: c["applications"][0]["deployments"][2]["ray_actor_options"].update(num_gpu=1),
     "applications[0].deployments[2].ray_actor_options.num_gpu"),
])
def test_render_of_an_invalid_serve_config_names_the_field(tmp_path, mutate, field):
    bad = _render_with(tmp_path, mutate)
    with pytest.raises(k8s.ManifestError) as info:
        k8s.render_overlay(tmp_path / "k8s", "dev-cpu", bad)
    assert field in info.value.message, info.value.message
    # nothing was written for a config that does not validate
    assert (tmp_path / "k8s/overlays/dev-cpu/serve-config.patch.yaml").read_text() == \
        (K8S / "overlays/dev-cpu/serve-config.patch.yaml").read_text()


def test_cli_render_of_an_invalid_serve_config_exits_2_naming_the_field(tmp_path):
    bad = _render_with(tmp_path, lambda c: c["applications"][0]["args"].update(max_inflight_sync=0))
    result = subprocess.run(
        [sys.executable, "-m", "vidgen_serve.cli", "k8s", "render", "--config", str(bad),
         "--k8s-dir", str(tmp_path / "k8s")],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert result.returncode == 2, result.stderr
    assert "applications[0].args.max_inflight_sync: Input should be greater than or equal to 1 (got 0)" \
        in result.stderr
    assert "Traceback" not in result.stderr


def test_cluster_state_keys_are_validated_once_settings_define_them():
    from vidgen_serve.serving.settings import ServeSettings

    config = k8s.overlay_serve_config(K8S, "prod-a100", ROOT / "serve_config.yaml")
    notes = k8s.check_serve_config(config)
    missing = [key for key in k8s.CLUSTER_STATE_KEYS if key not in ServeSettings.model_fields]
    used = [key for key in missing if key in config["applications"][0]["args"]]
    assert bool(notes) == bool(used)
    for key in used:
        assert key in notes[0]
    # Any other unknown key is still an error.
    config["applications"][0]["args"]["job_stor"] = "redis://x"
    with pytest.raises(k8s.ManifestError, match=r"applications\[0\]\.args\.job_stor"):
        k8s.check_serve_config(config)


# ---- validation without a cluster -----------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_built_manifest_validates(overlay, built, crd):
    problems, _notes = k8s.validate_manifests(built[overlay], crd)
    assert problems == []
    kinds = sorted(d["kind"] for d in built[overlay])
    assert {"RayService", "StatefulSet", "Service", "PodDisruptionBudget", "ConfigMap", "NetworkPolicy"} <= set(kinds)


def test_validation_reports_fields_kubernetes_would_prune(built, crd):
    docs = copy.deepcopy(built["prod-a100"])
    service = _one(docs, "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    cluster["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["resourcez"] = {}
    cluster["workerGroupSpecs"][0]["minReplica"] = 3
    cluster["gcsFaultToleranceOptions"]["redisAdress"] = "x:6379"
    service["metadata"]["labelz"] = {}
    cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string
    statefulset = _one(docs, "StatefulSet")
    statefulset["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    problems, _ = k8s.validate_manifests(docs, crd)
    text = "\n".join(problems)
    for expected in ("workerGroupSpecs[1].template.spec.containers[0]: Additional properties are not allowed "
                     "('resourcez'", "workerGroupSpecs[0]: Additional properties are not allowed ('minReplica'",
                     "gcsFaultToleranceOptions: Additional properties are not allowed ('redisAdress'",
                     "RayService/vidgen: metadata: Additional properties are not allowed ('labelz'",
                     "rayStartParams.num-cpus: 0 is not of type 'string'",
                     "StatefulSet/vidgen-redis: spec.template.spec.containers[0]: Additional properties are not "
                     "allowed ('imagePullPolicyy'"):
        assert expected in text, text
    assert len(problems) == 6, text


def test_validation_checks_the_embedded_serve_config(built, crd):
    docs = copy.deepcopy(built["dev-cpu"])
    service = _one(docs, "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    config["applications"][0]["deployments"][2]["max_ongoing_requets"] = 1
    service["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    problems, _ = k8s.validate_manifests(docs, crd)
    assert len(problems) == 1 and "spec.serveConfigV2" in problems[0]
    assert "applications[0].deployments[2].max_ongoing_requets" in problems[0], problems


def test_a_missing_crd_is_an_error_not_a_skip(built, tmp_path):
    with pytest.raises(k8s.ManifestError, match="no such file"):
        k8s.validate_manifests(built["dev-cpu"], tmp_path / "missing.yaml")


# ---- what the overlays promise -------------------------------------------------------------


def test_prod_a100_cluster_shape(built):
    docs = built["prod-a100"]
    service = _one(docs, "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    settings_args = _serve_config(docs)["applications"][0]["args"]
    assert settings_args["model"]["profile"] == "wan2.1-14b-tp8"

    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    head_resources = head["template"]["spec"]["containers"][0]["resources"]
    assert not any("gpu" in key for part in head_resources.values() for key in part)

    groups = _groups(docs)
    assert set(groups) == {"ingress", "denoise", "aux", "decode"}
    denoise = groups["denoise"]
    limits = denoise["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "8"
    assert denoise["minReplicas"] >= 2  # primary + standby TP groups stay warm
    assert "A100" in denoise["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"]
    for name in ("denoise", "aux", "decode"):
        spec = groups[name]["template"]["spec"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        assert spec["nodeSelector"]
    assert "A100" in groups["aux"]["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"]
    assert groups["decode"]["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-L4"

    # Autoscaler v2, in tree; incremental upgrades with Gateway API options.
    assert cluster["enableInTreeAutoscaling"] is True and cluster["autoscalerOptions"]["version"] == "v2"
    strategy = service["spec"]["upgradeStrategy"]
    assert strategy["type"] == "NewClusterWithIncrementalUpgrade"
    assert {"gatewayClassName", "stepSizePercent", "intervalSeconds"} <= set(strategy["clusterUpgradeOptions"])


def test_prod_deployments_fit_their_worker_groups(built):
    from vidgen_serve.serve import deployment_defaults
    from vidgen_serve.serving.settings import ServeSettings

    docs = built["prod-a100"]
    app = _serve_config(docs)["applications"][0]
    groups = _groups(docs)
    group_labels = {name: g.get("labels", {}) for name, g in groups.items()}
    deployments = {d["name"]: d for d in app["deployments"]}
    for name, dep in deployments.items():
        selector = dep.get("ray_actor_options", {}).get("label_selector")
        if selector is None:
            continue
        hosts = [g for g, labels in group_labels.items() if all(labels.get(k) == v for k, v in selector.items())]
        assert len(hosts) == 1, (name, selector, group_labels)
        gpus = int(groups[hosts[0]]["template"]["spec"]["containers"][0]["resources"]["limits"].get(
            "nvidia.com/gpu", 0))
        assert dep["ray_actor_options"].get("num_gpus", 0) <= gpus, name
    assert deployments["Ingress"]["max_replicas_per_node"] == 1
    assert groups["ingress"]["minReplicas"] == deployments["Ingress"]["autoscaling_config"]["min_replicas"]

    # The TP=8 denoiser's placement group (8 one-GPU bundles, STRICT_PACK) fits one denoise pod.
    args = {k: v for k, v in app["args"].items() if k not in k8s.CLUSTER_STATE_KEYS or k in ServeSettings.model_fields}
    settings = ServeSettings.model_validate(args)
    assert settings.model.model_profile.tensor_parallel_size == 8
    denoiser = deployment_defaults(settings)["Denoiser"]
    assert denoiser["placement_group_strategy"] == "STRICT_PACK"
    bundle_gpus = sum(b.get("GPU", 0) for b in denoiser["placement_group_bundles"])
    assert bundle_gpus == int(groups["denoise"]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"])
    assert deployments["DenoiserStandby"]["autoscaling_config"].get("min_replicas", 1) >= 1


def test_dev_cpu_runs_the_tiny_profile_without_gpus(built):
    docs = built["dev-cpu"]
    assert _serve_config(docs)["applications"][0]["args"]["model"]["profile"] == "tiny"
    text = yaml.safe_dump_all(docs)
    assert "nvidia.com/gpu" not in text and "num_gpus" not in text
    assert _one(docs, "RayService")["spec"]["upgradeStrategy"]["type"] == "NewCluster"  # no Gateway in kind


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_state_secrets_probes_and_resources(overlay, built):
    docs = built[overlay]
    service = _one(docs, "RayService")
    config = _serve_config(docs)
    args = config["applications"][0]["args"]

    # Jobs in Redis, GCS fault tolerance on the same Redis, artifacts in S3.
    redis_host = args["job_store"].removeprefix("redis://").split("/")[0]
    assert service["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]["redisAddress"] == redis_host
    redis_service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == redis_host.split(":")[0])
    assert redis_service["spec"]["ports"][0]["port"] == int(redis_host.split(":")[1])
    assert args["artifact_store"].startswith("s3://")

    # The serve port's Service is the one the config serves on.
    ports = service["spec"]["serveService"]["spec"]["ports"]
    assert [p["port"] for p in ports] == [config["http_options"]["port"]]

    entry_probes = 0
    for group, container in _containers(docs):
        refs = [ref for ref in container["envFrom"]]
        assert {"secretRef": {"name": "vidgen-api-keys"}} in refs, group  # API keys from a Secret
        assert {"secretRef": {"name": "vidgen-s3", "optional": True}} in refs, group  # AWS_* from a Secret
        resources = container["resources"]
        assert set(resources) == {"requests", "limits"} and {"cpu", "memory"} <= set(resources["limits"]), group
        if "readinessProbe" in container:
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", group
            assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", group
            assert container["startupProbe"]["httpGet"]["path"] == "/healthz", group
            entry_probes += 1
    assert entry_probes >= 1
    assert "readinessProbe" not in service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"][
        "containers"][0]  # KubeRay deploys the app only once the head is Ready

    # The PodDisruptionBudget selects the worker pods the templates label.
    pdb = _one(docs, "PodDisruptionBudget")
    selector = dict(pdb["spec"]["selector"]["matchLabels"])
    assert selector.pop("ray.io/node-type") == "worker"  # set by KubeRay on worker pods
    for group in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        assert selector.items() <= group["template"]["metadata"]["labels"].items(), group["groupName"]
