"""The real Wan 2.1 T2V architectures without downloads: configs in code, random weights on the device.

`weights: random` in a profile builds the checkpoint's architecture with random weights so that
memory, speed and the whole GPU path can be checked on any machine:

- the configs of `Wan-AI/Wan2.1-T2V-1.3B-Diffusers` and `Wan-AI/Wan2.1-T2V-14B-Diffusers` are
  written here (the values of their public `config.json` files; parameter counts 1,418,996,800 and
  14,288,491,584, VAE 126,892,531, checked by the tests);
- `ensure_config_checkpoint` writes them as a *config-only* checkpoint directory (model_index.json,
  one folder per component, the locally trained tokenizer, no weights), so every loader reads
  configs exactly as it would from a real checkpoint;
- `build_random` constructs a model with its parameters on the meta device and materialises each
  one directly on the target device in its target dtype (the checkpoint dtype, float32 for the
  modules diffusers keeps in float32): no float32 copy, no host copy of a GPU model;
- `meta_model` builds an architecture on the meta device (no memory at all) for parameter and FLOP counts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable

from ..config import RANDOM_WEIGHTS_ARCHITECTURES

WAN21_1_3B = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
WAN21_14B = "Wan-AI/Wan2.1-T2V-14B-Diffusers"

_TRANSFORMER_COMMON: dict[str, Any] = dict(
    patch_size=[1, 2, 2],
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    image_dim=None,
    added_kv_proj_dim=None,
    rope_max_seq_len=1024,
)
# google/umt5-xxl (the encoder Wan 2.1 ships as text_encoder/).
UMT5_XXL: dict[str, Any] = dict(
    vocab_size=256384,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_decoder_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6,
    dropout_rate=0.1,
    tie_word_embeddings=False,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)
WAN_VAE: dict[str, Any] = dict(
    base_dim=96,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    dropout=0.0,
    latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                  0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    latents_std=[2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                 3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916],
)
UNIPC_FLOW: dict[str, Any] = dict(
    num_train_timesteps=1000,
    prediction_type="flow_prediction",
    use_flow_sigmas=True,
    flow_shift=3.0,
    solver_order=2,
    solver_type="bh2",
    predict_x0=True,
    lower_order_final=True,
    final_sigmas_type="zero",
    timestep_spacing="linspace",
)

ARCHITECTURES: dict[str, dict[str, dict[str, Any]]] = {
    WAN21_1_3B: {
        "transformer": {**_TRANSFORMER_COMMON, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
        "text_encoder": UMT5_XXL,
        "vae": WAN_VAE,
        "scheduler": UNIPC_FLOW,
    },
    WAN21_14B: {
        "transformer": {**_TRANSFORMER_COMMON, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40},
        "text_encoder": UMT5_XXL,
        "vae": WAN_VAE,
        "scheduler": UNIPC_FLOW,
    },
}
assert set(ARCHITECTURES) == set(RANDOM_WEIGHTS_ARCHITECTURES)
CONFIG_CHECKPOINT_VERSION = 1


def _instantiate(component: str, config: dict[str, Any]) -> Any:
    """The component's model object for `config` (on whatever device/mode is active)."""
    if component == "transformer":
        from diffusers import WanTransformer3DModel

        return WanTransformer3DModel.from_config(config)
    if component == "vae":
        from diffusers import AutoencoderKLWan

        return AutoencoderKLWan.from_config(config)
    if component == "text_encoder":
        from transformers import UMT5Config, UMT5EncoderModel

        cfg = config if isinstance(config, UMT5Config) else UMT5Config(**config)
        return UMT5EncoderModel(cfg)
    raise ValueError(f"unknown component {component!r}; valid: transformer, text_encoder, vae")


def meta_model(checkpoint_id: str, component: str) -> Any:
    """A built-in architecture's component on the meta device (shapes only, no memory)."""
    return _instantiate_meta(component, ARCHITECTURES[checkpoint_id][component])


def ensure_config_checkpoint(checkpoint_id: str, cache_dir: Path) -> Path:
    """A config-only checkpoint directory for a built-in architecture (built once, atomically).

    Same layout as the real checkpoint, without weight files: loaders with `weights: random` read
    the component configs from it; the scheduler and tokenizer load from it with `from_pretrained`.
    """
    import hashlib

    from .tiny import RECIPE_VERSION, build_once

    arch = ARCHITECTURES[checkpoint_id]
    recipe = json.dumps([arch, CONFIG_CHECKPOINT_VERSION, RECIPE_VERSION], sort_keys=True, default=list)
    slug = checkpoint_id.split("/")[-1].lower()
    target = Path(cache_dir) / f"{slug}-config-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
    return build_once(target, lambda tmp: _write_config_checkpoint(arch, tmp))


def _write_config_checkpoint(arch: dict[str, dict[str, Any]], target: Path) -> None:
    import diffusers
    from diffusers import UniPCMultistepScheduler
    from transformers import UMT5Config

    from .tiny import _train_tokenizer

    for component in ("transformer", "vae"):
        meta = _instantiate_meta(component, arch[component])
        meta.save_config(target / component)
    UMT5Config(**arch["text_encoder"]).save_pretrained(target / "text_encoder")
    UniPCMultistepScheduler(**arch["scheduler"]).save_config(target / "scheduler")
    _train_tokenizer().save_pretrained(target / "tokenizer")
    index = {
        "_class_name": "WanPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
        # Not a usable checkpoint by itself: there are no weights (vidgen-serve builds random ones).
        "_vidgen_weights": "random",
    }
    (target / "model_index.json").write_text(json.dumps(index, indent=2))


def _instantiate_meta(component: str, config: dict[str, Any]) -> Any:
    import torch

    with torch.device("meta"):
        return _instantiate(component, dict(config))


def _kept(name: str, keep_fp32: Iterable[str]) -> bool:
    """diffusers' rule: a parameter stays float32 when a keep-module name is one of its dotted parts."""
    parts = name.split(".")
    return any(k in parts for k in keep_fp32)


def keep_fp32_modules(model: Any, dtype: Any) -> list[str]:
    """Modules a checkpoint load keeps in float32 at `dtype`, as diffusers / transformers decide it.

    diffusers keeps `_keep_in_fp32_modules` in float32 for any reduced dtype; transformers keeps
    `_keep_in_fp32_modules` only for float16 and `_keep_in_fp32_modules_strict` for float16 and bfloat16.
    """
    import torch

    if dtype == torch.float32:
        return []
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    if hasattr(model, "_keep_in_fp32_modules_strict"):  # a transformers model
        if dtype != torch.float16:
            keep = []
        keep += list(model._keep_in_fp32_modules_strict or [])
    return keep


def build_random(factory: Callable[[], Any], device: Any, dtype: Any, seed: int = 0) -> Any:
    """`factory()`'s model with random weights created directly on `device` in `dtype`.

    Parameters are constructed on the meta device (accelerate's `init_empty_weights`; buffers such
    as rotary tables are computed as usual, they are small), then each one is allocated on `device`
    in its target dtype and initialised there: `reset_parameters` where the module has one (linear,
    conv, embedding, norms), ones for the remaining norm scales, zeros for biases, N(0, 1/fan_in)
    otherwise. Tied parameters stay tied. Deterministic for a given seed and device.

    Args:
        factory: builds the model (e.g. `lambda: WanTransformer3DModel.from_config(cfg)`).
        device: where the weights live.
        dtype: the compute dtype; modules the library keeps in float32 stay float32.
        seed: initialisation seed (the caller's RNG state is left untouched).
    """
    import torch
    from accelerate import init_empty_weights

    device = torch.device(device)
    with init_empty_weights(include_buffers=False):
        model = factory()
    keep = keep_fp32_modules(model, dtype)
    fresh: dict[int, torch.nn.Parameter] = {}
    for module_name, module in model.named_modules():
        persistent = {n for n in module._buffers if n not in module._non_persistent_buffers_set}
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in fresh:  # tied weights: one new tensor for all their names
                full = f"{module_name}.{name}" if module_name else name
                target = param.dtype
                if param.is_floating_point():
                    target = torch.float32 if _kept(full, keep) else dtype
                fresh[id(param)] = torch.nn.Parameter(
                    torch.empty(param.shape, dtype=target, device=device), requires_grad=False
                )
            module._parameters[name] = fresh[id(param)]
        for name, buf in list(module._buffers.items()):
            if buf is None:
                continue
            # Loading casts persistent floating buffers like parameters; computed (non-persistent) ones
            # keep the dtype they were computed in, as after `from_pretrained`.
            full = f"{module_name}.{name}" if module_name else name
            target = buf.dtype
            if name in persistent and buf.is_floating_point():
                target = torch.float32 if _kept(full, keep) else dtype
            module._buffers[name] = buf.to(device=device, dtype=target)
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()  # transformers ties shared embeddings when loading, not when constructing
    _initialise(model, device, seed)
    return model.eval().requires_grad_(False)


def _initialise(model: Any, device: Any, seed: int) -> None:
    import torch

    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        done: set[int] = set()
        for module in model.modules():
            own = list(module.parameters(recurse=False))
            if own and callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
                done.update(id(p) for p in own)
        for module_name, module in model.named_modules():
            for name, param in module.named_parameters(recurse=False):
                if id(param) in done:
                    continue
                done.add(id(param))
                if name in ("bias", "beta"):
                    param.zero_()
                elif name == "gamma" or (name in ("weight", "scale") and "norm" in type(module).__name__.lower()):
                    param.fill_(1.0)
                else:
                    fan_in = param.shape[-1] if param.dim() >= 2 else param.numel()
                    param.normal_(0.0, fan_in ** -0.5)
