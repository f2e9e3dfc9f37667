"""Loading checkpoint components with `from_pretrained`: one code path for every profile.

A checkpoint is a diffusers Wan 2.1 T2V directory (`model_index.json`, `tokenizer/`,
`text_encoder/`, `transformer/`, `vae/`, `scheduler/`): the built-in tiny one, a local
copy of `Wan-AI/Wan2.1-T2V-*-Diffusers`, or a hub id where the hub is reachable.
Each stage loads only the components it needs.

With `weights: random` the same loaders build each component from the checkpoint's config
with random weights directly on the device (`architectures.build_random`); for the built-in
Wan 2.1 ids the configs come from a config-only directory written locally, so nothing is
downloaded either way. Reduced precision is what diffusers does: the model in the profile's
dtype except the modules the library keeps in float32; the stages cast their inputs to the
model's compute dtype (`model.dtype`).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch

from ..config import AppConfig, ModelProfile
from ..errors import VidgenError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_checkpoint(config: AppConfig) -> str:
    """Local path (or hub id) of the profile's checkpoint; builds the tiny one on first use.

    With `weights: random` and a built-in architecture id that is not a local directory, the
    path of its config-only checkpoint (written on first use).
    """
    profile = config.model_profile
    checkpoint = profile.checkpoint
    if checkpoint == "builtin:tiny":
        from .tiny import ensure_tiny_checkpoint

        return str(ensure_tiny_checkpoint(config.cache_dir))
    if profile.weights == "random" and not Path(checkpoint).is_dir():
        from .architectures import ensure_config_checkpoint

        return str(ensure_config_checkpoint(checkpoint, config.cache_dir))
    return checkpoint


def device_for(profile: ModelProfile, local_rank: int = 0) -> torch.device:
    """The device a stage runs on (cuda:<local_rank> on GPU profiles), after `check_runtime`."""
    if profile.device == "cuda":
        if not torch.cuda.is_available():
            raise VidgenError(
                503, f"profile {profile.name} needs a CUDA GPU and none is visible", code="no_gpu"
            )
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    check_runtime(profile, device)
    return device


@functools.cache
def _dtype_failure(device: str, dtype_name: str) -> str | None:
    """Why `device` cannot compute in `dtype_name` (None when it can): a small probe of the ops Wan uses."""
    dtype = DTYPES[dtype_name]
    if device.startswith("cuda") and dtype == torch.bfloat16:
        index = torch.device(device).index or 0
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            return f"{torch.cuda.get_device_name(index)} has no bfloat16 support"
    try:
        x = torch.ones(1, 4, 3, 8, 8, dtype=dtype, device=device)
        torch.nn.functional.conv3d(x, torch.ones(4, 4, 1, 3, 3, dtype=dtype, device=device), padding=(0, 1, 1))
        q = torch.ones(1, 2, 8, 16, dtype=dtype, device=device)
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
        torch.nn.functional.layer_norm(q, (16,))
    except RuntimeError as exc:
        return str(exc).splitlines()[0]
    return None


def runtime_problems(profile: ModelProfile, device: torch.device, dtype_failure=_dtype_failure) -> list[str]:
    """Settings of `profile` this machine cannot run, each naming the field and the valid values.

    `dtype_failure(device, dtype_name) -> reason | None` probes a dtype (parameter for tests of
    hardware this machine does not have).
    """
    problems = []
    for field in ("dtype", "vae_dtype"):
        value = getattr(profile, field)
        reason = dtype_failure(str(device), value)
        if reason:
            valid = [d for d in DTYPES if not dtype_failure(str(device), d)]
            problems.append(f"{field}={value!r} cannot run on {device}: {reason}; valid values here: {valid}")
    needs_torchao = [f for f in ("quantization", "text_encoder_quantization") if getattr(profile, f) != "none"]
    if needs_torchao:
        try:
            import torchao  # noqa: F401
        except ImportError:
            problems.append(f"{needs_torchao[0]}={getattr(profile, needs_torchao[0])!r} needs torchao "
                            "(pip install torchao); valid values without it: ['none']")
    if profile.quantization == "float8_dynamic":
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        if capability is None or capability < (8, 9):
            where = f"compute capability {capability[0]}.{capability[1]}" if capability else device.type
            problems.append(f"quantization='float8_dynamic' needs a CUDA GPU of compute capability >= 8.9 "
                            f"(H100, L40S, L4), not {where}; valid values here: ['none', 'int8_weight_only']")
    backend = profile.attention_backend
    if backend in ("_native_cudnn", "_native_flash", "_native_efficient") and device.type != "cuda":
        problems.append(f"attention_backend={backend!r} is a CUDA SDPA kernel; valid values on {device.type}: "
                        "['native', '_native_math']")
    elif backend in ("flash", "_flash_3", "sage", "xformers"):
        from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

        try:
            _check_attention_backend_requirements(AttentionBackendName(backend))
        except (RuntimeError, ImportError) as exc:
            problems.append(f"attention_backend={backend!r}: {exc}; the SDPA backends need nothing more: "
                            "['native', '_native_math', '_native_cudnn', '_native_flash', '_native_efficient']")
    return problems


def check_runtime(profile: ModelProfile, device: torch.device | None = None) -> None:
    """Raise a `VidgenError` naming every profile field this machine can't run, before any model loads."""
    if device is None:
        device = torch.device("cuda", 0) if profile.device == "cuda" else torch.device("cpu")
    problems = runtime_problems(profile, device)
    if problems:
        raise VidgenError(422, f"profile {profile.name!r}: " + "; ".join(problems), code="invalid_profile")


def _from_pretrained(cls: Any, checkpoint: str, subfolder: str, **kwargs: Any) -> Any:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-load progress bar is noise in service logs
    try:
        return cls.from_pretrained(checkpoint, subfolder=subfolder, **kwargs)
    except (OSError, ValueError) as exc:
        raise VidgenError(
            503,
            f"could not load {subfolder} from checkpoint {checkpoint!r}: {exc}",
            code="checkpoint_unavailable",
        ) from exc


def _device_map(device: torch.device | None) -> dict[str, Any]:
    # On a GPU, load straight into its memory (no host copy of the weights).
    return {"device_map": {"": str(device)}} if device is not None and device.type == "cuda" else {}


def torchao_quant_type(name: str) -> Any:
    """The torchao config of a profile's `quantization` value (None for 'none')."""
    if name == "none":
        return None
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Int8WeightOnlyConfig

    return {"int8_weight_only": Int8WeightOnlyConfig, "float8_dynamic": Float8DynamicActivationFloat8WeightConfig}[
        name
    ]()


def _quantize_random(model: Any, name: str, skip: list[str]) -> None:
    """Quantise the linear layers of a randomly initialised model as the TorchAoConfig loaders do.

    The loaders quantise every `nn.Linear` weight except modules kept in float32; random weights
    have no loader, so the same torchao config is applied with the same filter.
    """
    from torchao.quantization import quantize_

    from .architectures import _kept

    quantize_(model, torchao_quant_type(name),
              filter_fn=lambda module, fqn: isinstance(module, torch.nn.Linear) and not _kept(fqn, skip))


def load_tokenizer(checkpoint: str) -> Any:
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, checkpoint, "tokenizer")


def load_text_encoder(checkpoint: str, profile: ModelProfile, device: torch.device) -> Any:
    from transformers import UMT5Config, UMT5EncoderModel

    dtype = DTYPES[profile.dtype]
    quant = profile.text_encoder_quantization
    if profile.weights == "random":
        from .architectures import build_random, keep_fp32_modules

        config = _from_pretrained(UMT5Config, checkpoint, "text_encoder")
        model = build_random(lambda: UMT5EncoderModel(config), device, dtype)
        if quant != "none":
            _quantize_random(model, quant, keep_fp32_modules(model, dtype))
        return model
    kwargs: dict[str, Any] = {"dtype": dtype, **_device_map(device)}
    if quant != "none":
        from transformers import TorchAoConfig

        kwargs["quantization_config"] = TorchAoConfig(torchao_quant_type(quant))
    model = _from_pretrained(UMT5EncoderModel, checkpoint, "text_encoder", **kwargs)
    return model.to(device).eval().requires_grad_(False)


def load_transformer(checkpoint: str, profile: ModelProfile, device: torch.device | None) -> Any:
    """The Wan transformer; `device=None` leaves it on CPU (TP ranks shard before moving)."""
    from diffusers import WanTransformer3DModel

    dtype = DTYPES[profile.dtype]
    if profile.weights == "random":
        from .architectures import build_random, keep_fp32_modules

        config = WanTransformer3DModel.load_config(checkpoint, subfolder="transformer")
        model = build_random(lambda: WanTransformer3DModel.from_config(config), device or "cpu", dtype)
        if profile.quantization != "none":
            _quantize_random(model, profile.quantization, keep_fp32_modules(model, dtype))
        return model
    kwargs: dict[str, Any] = {"torch_dtype": dtype, "low_cpu_mem_usage": True, **_device_map(device)}
    if profile.quantization != "none":
        from diffusers import TorchAoConfig

        kwargs["quantization_config"] = TorchAoConfig(torchao_quant_type(profile.quantization))
    model = _from_pretrained(WanTransformer3DModel, checkpoint, "transformer", **kwargs)
    if device is not None:
        model = model.to(device)
    return model.eval().requires_grad_(False)


def load_vae(checkpoint: str, profile: ModelProfile, device: torch.device) -> Any:
    from diffusers import AutoencoderKLWan

    dtype = DTYPES[profile.vae_dtype]
    if profile.weights == "random":
        from .architectures import build_random

        config = AutoencoderKLWan.load_config(checkpoint, subfolder="vae")
        return build_random(lambda: AutoencoderKLWan.from_config(config), device, dtype)
    model = _from_pretrained(AutoencoderKLWan, checkpoint, "vae", torch_dtype=dtype, low_cpu_mem_usage=True,
                             **_device_map(device))
    return model.to(device).eval().requires_grad_(False)


def load_scheduler(checkpoint: str) -> Any:
    """The checkpoint's scheduler (FlowMatchEuler for tiny; UniPC flow for the real Wan 2.1)."""
    import diffusers

    index_path = Path(checkpoint) / "model_index.json"
    class_name = "FlowMatchEulerDiscreteScheduler"
    if index_path.exists():
        class_name = json.loads(index_path.read_text())["scheduler"][1]
    return _from_pretrained(getattr(diffusers, class_name), checkpoint, "scheduler")
