"""Public front door of the Ray Serve application.

`build_app(args)` is the `import_path` of `serve_config.yaml`
(`vidgen_serve.serve:build_app`): it validates the args into `ServeSettings` once and
composes the deployments with `.bind()`. Deployment options below are defaults; the
`deployments:` section of `serve_config.yaml` overrides them per deployment.
"""

from __future__ import annotations

from typing import Any

from .serving.autoscaling import policy_config
from .serving.settings import ServeSettings

__all__ = ["ServeSettings", "build_app", "compose_app", "deployment_defaults"]


def deployment_defaults(settings: ServeSettings) -> dict[str, dict[str, Any]]:
    """Default Serve options per deployment, from the profile (CPU shares or GPUs)."""
    profile = settings.model.model_profile
    gpu = profile.device == "cuda"
    ranks = profile.parallel.size  # the Denoiser's worker group ({tp, ulysses, cfg})

    def stage(cpu: float, max_ongoing: int, max_queued: int, max_replicas: int) -> dict[str, Any]:
        # Queued jobs count as work: see serving/autoscaling.py.
        return {
            "max_ongoing_requests": max_ongoing,
            "max_queued_requests": max_queued,
            "ray_actor_options": {"num_cpus": cpu, **({"num_gpus": 1} if gpu else {})},
            "autoscaling_config": {
                "min_replicas": 1,
                "max_replicas": max_replicas,
                "target_ongoing_requests": max(1, max_ongoing // 2),
                "upscale_delay_s": 10,
                "downscale_delay_s": 120,
                "policy": policy_config(),
            },
            "health_check_period_s": 10,
            "health_check_timeout_s": 60,
            "graceful_shutdown_timeout_s": 30,
        }

    denoiser = stage(1 if gpu else 0.2, 1, 8, 4)
    if ranks > 1:
        from .parallel.group import placement_group_bundles

        # The replica holds bundle 0; its rank workers take bundles 1..N on one node.
        denoiser["ray_actor_options"] = {"num_cpus": 0}
        denoiser["placement_group_bundles"] = placement_group_bundles(profile)
        denoiser["placement_group_strategy"] = "STRICT_PACK"
    return {
        "TextEncoder": stage(1 if gpu else 0.1, 8, 64, 4),
        "Denoiser": denoiser,
        # The standby serves only while failed over: its own requests size it, not the queue.
        "DenoiserStandby": {**denoiser, "autoscaling_config": {
            **{k: v for k, v in denoiser["autoscaling_config"].items() if k != "policy"}, "max_replicas": 2}},
        "Decoder": stage(4 if gpu else 0.2, 2, 16, 4),
        "FailoverRouter": {"num_replicas": 1, "max_ongoing_requests": 1000, "ray_actor_options": {"num_cpus": 0}},
        "Ingress": {
            "max_ongoing_requests": 200,
            "max_queued_requests": 100,
            "ray_actor_options": {"num_cpus": 0.1},
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 50},
        },
    }


def build_app(args: dict[str, Any] | None = None):
    """Compose Ingress -> TextEncoder / FailoverRouter -> Denoiser (+ standby) / Decoder.

    Serve calls an `import_path` builder with exactly one argument; `compose_app` takes
    per-deployment options too.

    Args:
        args: the application's `args` from `serve_config.yaml` (see `ServeSettings`).

    Returns:
        The bound ingress application, ready for `serve.run` / `serve run`.
    """
    return compose_app(args)


def compose_app(args: dict[str, Any] | None = None, deployment_options: dict[str, dict[str, Any]] | None = None):
    """`build_app` with per-deployment Serve options (for `serve.run` callers: tests, benchmarks).

    The Python counterpart of the config's `deployments:` section (Serve requires an
    `import_path` builder to take exactly one argument, hence a function of its own).

    Args:
        args: the application's `args` (see `ServeSettings`).
        deployment_options: per-deployment Serve options replacing the defaults key by key,
            e.g. ``{"Decoder": {"user_config": {"fault_injection": {...}}}}``.

    Returns:
        The bound ingress application, ready for `serve.run` / `serve run`.
    """
    from ray import serve

    from .serving.ingress import IngressApp
    from .serving.router import FailoverRouter
    from .serving.stages import DecoderDeployment, DenoiserDeployment, TextEncoderDeployment

    settings = ServeSettings.model_validate(args or {})
    config = settings.model
    opts = deployment_defaults(settings)
    unknown = set(deployment_options or {}) - set(opts)
    if unknown:
        raise ValueError(f"deployment_options for unknown deployments {sorted(unknown)}; known: {sorted(opts)}")
    for name, options in (deployment_options or {}).items():
        opts[name] = {**opts[name], **options}

    text_encoder = serve.deployment(TextEncoderDeployment, name="TextEncoder", **opts["TextEncoder"]).bind(
        config, settings)
    denoisers = {
        "primary": serve.deployment(DenoiserDeployment, name="Denoiser", **opts["Denoiser"]).bind(
            config, "primary", settings)
    }
    router = None
    if settings.standby:
        denoisers["standby"] = serve.deployment(
            DenoiserDeployment, name="DenoiserStandby", **opts["DenoiserStandby"]
        ).bind(config, "standby", settings)
        router = serve.deployment(FailoverRouter, name="FailoverRouter", **opts["FailoverRouter"]).bind(
            settings, text_encoder, denoisers
        )
    decoder = serve.deployment(DecoderDeployment, name="Decoder", **opts["Decoder"]).bind(config, settings)
    ingress = serve.deployment(IngressApp, name="Ingress", **opts["Ingress"])
    return ingress.bind(settings, text_encoder, denoisers, decoder, router)
