"""Loading checkpoint components with `from_pretrained`: one code path for every profile.

A checkpoint is a diffusers Wan 2.1 T2V directory (`model_index.json`, `tokenizer/`,
`text_encoder/`, `transformer/`, `vae/`, `scheduler/`): the built-in tiny one, a local
copy of `Wan-AI/Wan2.1-T2V-*-Diffusers`, or a hub id where the hub is reachable.
Each stage loads only the components it needs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..config import AppConfig, ModelProfile
from ..errors import VidgenError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_checkpoint(config: AppConfig) -> str:
    """Local path (or hub id) of the profile's checkpoint; builds the tiny one on first use."""
    checkpoint = config.model_profile.checkpoint
    if checkpoint == "builtin:tiny":
        from .tiny import ensure_tiny_checkpoint

        return str(ensure_tiny_checkpoint(config.cache_dir))
    return checkpoint


def device_for(profile: ModelProfile, local_rank: int = 0) -> torch.device:
    """The device a stage runs on (cuda:<local_rank> on GPU profiles)."""
    if profile.device == "cuda":
        if not torch.cuda.is_available():
            raise VidgenError(
                503, f"profile {profile.name} needs a CUDA GPU and none is visible", code="no_gpu"
            )
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


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


def load_tokenizer(checkpoint: str) -> Any:
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, checkpoint, "tokenizer")


def load_text_encoder(checkpoint: str, profile: ModelProfile, device: torch.device) -> Any:
    from transformers import UMT5EncoderModel

    model = _from_pretrained(UMT5EncoderModel, checkpoint, "text_encoder", dtype=DTYPES[profile.dtype])
    return model.to(device).eval().requires_grad_(False)


def load_transformer(checkpoint: str, profile: ModelProfile, device: torch.device | None) -> Any:
    """The Wan transformer; `device=None` leaves it on CPU (TP ranks shard before moving)."""
    from diffusers import WanTransformer3DModel

    model = _from_pretrained(
        WanTransformer3DModel, checkpoint, "transformer", torch_dtype=DTYPES[profile.dtype], low_cpu_mem_usage=True
    )
    if device is not None:
        model = model.to(device)
    return model.eval().requires_grad_(False)


def load_vae(checkpoint: str, profile: ModelProfile, device: torch.device) -> Any:
    from diffusers import AutoencoderKLWan

    model = _from_pretrained(
        AutoencoderKLWan, checkpoint, "vae", torch_dtype=DTYPES[profile.vae_dtype], low_cpu_mem_usage=True
    )
    return model.to(device).eval().requires_grad_(False)


def load_scheduler(checkpoint: str) -> Any:
    """The checkpoint's scheduler (FlowMatchEuler for tiny; UniPC flow for the real Wan 2.1)."""
    import diffusers

    index_path = Path(checkpoint) / "model_index.json"
    class_name = "FlowMatchEulerDiscreteScheduler"
    if index_path.exists():
        class_name = json.loads(index_path.read_text())["scheduler"][1]
    return _from_pretrained(getattr(diffusers, class_name), checkpoint, "scheduler")
