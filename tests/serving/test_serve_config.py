"""`serve_config.yaml` itself: its shape, and a real deployment of it the way `serve run` does it.

The deployment path is the one `serve run serve_config.yaml` takes (ray/serve/scripts.py):
validate the YAML into `ServeDeploySchema`, `serve_start(http_options=..., proxy_location=...)`
from the config, then `client.deploy_apps(config)`, so the `deployments:` section
(autoscaling, queue limits, actor options, health checks, user_config) is applied by
Serve's controller exactly as in production. Only the port (a free one) and `state_dir`
(a tmp dir) are changed.
"""

from __future__ import annotations

import copy
from pathlib import Path

import httpx
import pytest
import yaml
from live_app import api_keys_env, wait_until_ready

from vidgen_serve.net import find_free_port

pytestmark = pytest.mark.slow

CONFIG_PATH = Path(__file__).resolve().parents[2] / "serve_config.yaml"
STAGE_DEPLOYMENTS = ("TextEncoder", "Denoiser", "DenoiserStandby", "Decoder")
API_KEY = "configkey"


def _load() -> dict:
    return yaml.safe_load(CONFIG_PATH.read_text(encoding="utf-8"))


def _deployments(config: dict) -> dict[str, dict]:
    (app,) = config["applications"]
    return {d["name"]: d for d in app["deployments"]}


def test_yaml_validates_and_names_the_built_deployments():
    from ray.serve.schema import ServeDeploySchema

    from vidgen_serve.serve import build_app

    config = _load()
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == "vidgen_serve.serve:build_app"
    assert app.route_prefix == "/"
    # Every deployment the YAML configures exists in the built app (Serve rejects unknown names).
    built = build_app(app.args)
    names = {built._bound_deployment.name}
    stack = [built._bound_deployment]
    while stack:
        node = stack.pop()
        for arg in [*node.init_args, *node.init_kwargs.values()]:
            for value in (arg.values() if isinstance(arg, dict) else [arg]):
                inner = getattr(value, "_bound_deployment", None)
                if inner is not None and inner.name not in names:
                    names.add(inner.name)
                    stack.append(inner)
    assert set(_deployments(config)) == names == {"Ingress", "FailoverRouter", *STAGE_DEPLOYMENTS}


@pytest.mark.parametrize("name", STAGE_DEPLOYMENTS)
def test_stage_deployments_are_fully_configured(name):
    d = _deployments(_load())[name]
    auto = d["autoscaling_config"]
    for key in ("min_replicas", "max_replicas", "target_ongoing_requests", "upscale_delay_s", "downscale_delay_s"):
        assert key in auto, (name, key)
    assert 1 <= auto["min_replicas"] <= auto["max_replicas"]
    assert auto["target_ongoing_requests"] <= d["max_ongoing_requests"]
    assert d["max_ongoing_requests"] >= 1 and d["max_queued_requests"] >= 1
    assert "num_cpus" in d["ray_actor_options"]
    assert d["health_check_period_s"] > 0 and d["health_check_timeout_s"] > d["health_check_period_s"]
    assert "num_replicas" not in d  # autoscaled, not fixed


def test_deployment_defaults_for_tp8_profile():
    from vidgen_serve.serve import ServeSettings, deployment_defaults

    settings = ServeSettings.model_validate({"model": {"profile": "wan2.1-14b-tp8"}})
    try:
        import vidgen_serve.parallel.group as group  # noqa: F401
    except ImportError as exc:  # pragma: no cover - being written elsewhere
        pytest.skip(f"vidgen_serve.parallel.group.placement_group_bundles not importable yet: {exc}")
    if not hasattr(group, "placement_group_bundles"):  # pragma: no cover
        pytest.skip("vidgen_serve.parallel.group has no placement_group_bundles yet")
    opts = deployment_defaults(settings)
    for name in ("Denoiser", "DenoiserStandby"):
        d = opts[name]
        assert d["placement_group_strategy"] == "STRICT_PACK"
        bundles = d["placement_group_bundles"]
        assert len(bundles) == 1 + 8
        assert bundles[0].get("GPU", 0) == 0  # bundle 0: the replica itself
        assert all(b.get("GPU") == 1 for b in bundles[1:])
        # The replica actor must fit bundle 0.
        assert d["ray_actor_options"].get("num_cpus", 1) <= bundles[0].get("CPU", 0)
        assert "num_gpus" not in d["ray_actor_options"]
    for name in ("TextEncoder", "Decoder"):
        assert opts[name]["ray_actor_options"]["num_gpus"] == 1
        assert "placement_group_bundles" not in opts[name]


def test_deployment_defaults_for_tiny_profile():
    from vidgen_serve.serve import ServeSettings, deployment_defaults

    opts = deployment_defaults(ServeSettings())
    for name in STAGE_DEPLOYMENTS:
        assert "placement_group_bundles" not in opts[name]
        assert "num_gpus" not in opts[name]["ray_actor_options"]
        assert 0 < opts[name]["ray_actor_options"]["num_cpus"] < 1
        assert opts[name]["autoscaling_config"]["min_replicas"] == 1
    assert opts["FailoverRouter"]["num_replicas"] == 1




@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    import ray
    from ray import serve
    from ray.serve._private import api as _private_api
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    config = copy.deepcopy(_load())
    port = find_free_port()
    config["http_options"]["port"] = port
    config["applications"][0]["args"]["state_dir"] = str(tmp_path_factory.mktemp("serve-config-state"))
    schema = ServeDeploySchema.model_validate(config)

    with api_keys_env(API_KEY):  # replicas inherit it from the process that starts Ray
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="serve")
        try:
            # What `serve run serve_config.yaml` does with a config file.
            client = _private_api.serve_start(
                http_options=schema.http_options.model_dump(),
                proxy_location=schema.proxy_location,
                grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
                controller_options=schema.controller_options,
            )
            client.deploy_apps(schema, _blocking=False)
            http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300, trust_env=False)
            wait_until_ready(http, timeout_s=300, describe=serve.status)
            yield http, client
            http.close()
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()


def test_serve_config_deploys_and_generates(deployed):
    http, client = deployed
    ready = http.get("/readyz").json()
    assert set(ready["deployments"]) == {"Ingress", "FailoverRouter", *STAGE_DEPLOYMENTS}
    r = http.post("/v1/video/generate", headers={"Authorization": f"Bearer {API_KEY}"},
                  json={"prompt": "a paper boat on a pond", "duration": 1, "resolution": "480p",
                        "num_inference_steps": 2, "seed": 1})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "video/mp4" and r.content[4:8] == b"ftyp"
    assert r.headers["x-vidgen-denoiser"] == "primary"

    # The YAML's deployments section is what the controller runs.
    details = client.get_serve_details()
    deployments = details["applications"]["vidgen"]["deployments"]
    yaml_deployments = _deployments(_load())
    for name in STAGE_DEPLOYMENTS:
        want, got = yaml_deployments[name], deployments[name]["deployment_config"]
        assert got["max_ongoing_requests"] == want["max_ongoing_requests"], name
        assert got["max_queued_requests"] == want["max_queued_requests"], name
        for key, value in want["autoscaling_config"].items():
            if key == "policy":  # the controller adds the (empty) policy_kwargs
                assert got["autoscaling_config"]["policy"]["policy_function"] == value["policy_function"], name
                continue
            assert got["autoscaling_config"][key] == value, (name, key)
        assert got["health_check_period_s"] == want["health_check_period_s"], name
        assert got["ray_actor_options"]["num_cpus"] == want["ray_actor_options"]["num_cpus"], name
    assert deployments["Denoiser"]["deployment_config"]["user_config"] == {
        "fault_injection": {"extra_latency_s": 0.0, "error_rate": 0.0}}
