"""Style LoRA adapters on the denoiser's transformer: resolve, load, activate, evict (LRU).

A style preset may carry a LoRA adapter (`AppConfig.style_adapters`: the style's `lora`, else
the profile's `style_loras`). `StyleAdapters` keeps at most `max_loaded` of them loaded in one
transformer, evicting the least recently used, and activates exactly the adapter of the style a
run uses (none for a plain style: then the transformer runs as if no adapter had ever been
loaded, bit for bit).

Two backends, one interface:

* `PeftBackend` (a whole transformer, tp = 1): diffusers' loader (`WanLoraLoaderMixin`'s
  `lora_state_dict` + `load_lora_into_transformer`, i.e. `load_lora_adapter` into the
  `WanTransformer3DModel`: peft layers), `set_adapter` / `disable_lora` to switch, and
  `delete_adapters` to unload.
* `ShardedBackend` (a DeepSpeed tensor-parallel shard): peft cannot wrap DeepSpeed's sharded
  linears, so the adapter's state dict is read with diffusers' `lora_state_dict` and each rank
  keeps its slice of every LoRA factor: for a column-parallel linear (output features split) the
  rows of B, for a row-parallel one (input features split) the columns of A. While the style is
  active a forward hook adds ``scale * B(A(x))`` to the shard's output; on a row-parallel linear
  the rank's partial ``A_shard(x_shard)`` is all-reduced over the TP group first (a rank-r
  tensor), so every rank adds exactly the unsharded LoRA term. Plain styles remove the hooks.

Serving (serving/stages.py) puts Ray Serve's model multiplexing on top: a replica's
`@serve.multiplexed` loader calls `load`, and the handle it caches unloads the adapter when
Serve evicts it.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from ..config import BUILTIN_TINY_LORA, AppConfig
from ..errors import VidgenError, field_error

logger = logging.getLogger(__name__)

DEFAULT_MAX_STYLES = 4


class StyleUnavailable(VidgenError):
    """503: a style's LoRA adapter cannot be loaded (missing or corrupt file); other styles still work."""

    def __init__(self, style: str, reason: str, retry_after_s: int | None = None):
        headers = {"Retry-After": str(retry_after_s)} if retry_after_s else None
        super().__init__(503, f"style {style!r} is unavailable: its LoRA adapter could not be loaded ({reason})",
                         code="style_unavailable", details=[field_error("style", style, f"LoRA adapter unavailable: {reason}")],
                         headers=headers)
        self.style = style


def adapter_source(config: AppConfig, style: str) -> str | None:
    """Where `style`'s adapter is read from (a local path or hub id); None for a plain style."""
    ref = config.style_adapters.get(style)
    if ref is None:
        return None
    if ref.startswith(BUILTIN_TINY_LORA):
        from ..models.tiny import TINY_LORAS, ensure_tiny_loras

        name = ref[len(BUILTIN_TINY_LORA):]
        if name not in TINY_LORAS:
            raise StyleUnavailable(style, f"{ref!r} is not a built-in adapter; built-in: {list(TINY_LORAS)}")
        return str(ensure_tiny_loras(config.cache_dir) / name)
    return ref


def adapter_name(style: str) -> str:
    """The adapter's name inside the transformer (peft module keys take no dots)."""
    return "style_" + re.sub(r"[^A-Za-z0-9_]", "_", style)


def read_adapter(source: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The adapter's state dict and LoRA metadata through diffusers' Wan LoRA reader (which also converts
    the original-Wan and musubi/kohya key layouts to diffusers')."""
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    return WanLoraLoaderMixin.lora_state_dict(source, return_lora_metadata=True, use_safetensors=True)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


class PeftBackend:
    """LoRA adapters on a whole transformer through diffusers' peft integration."""

    def __init__(self, transformer: Any):
        self.transformer = transformer
        self.active: str | None = None

    def load(self, name: str, source: str) -> None:
        try:
            from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

            state_dict, metadata = read_adapter(source)
            with warnings.catch_warnings():  # several adapters in one model is the point here
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                WanLoraLoaderMixin.load_lora_into_transformer(state_dict, self.transformer, adapter_name=name,
                                                              metadata=metadata)  # -> load_lora_adapter
        except BaseException:
            try:  # a failure after peft injected layers must leave nothing behind
                if name in getattr(self.transformer, "peft_config", {}):
                    self.transformer.delete_adapters(name)
            except Exception as exc:  # noqa: BLE001
                logger.debug("cleaning up adapter %s failed: %r", name, exc)
            raise
        self.active = None  # loading activates the new adapter in peft: re-select on the next activate
        self.transformer.disable_lora()

    def unload(self, name: str) -> None:
        with warnings.catch_warnings():  # peft announces the adapter it falls back to: re-selected below
            warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
            self.transformer.delete_adapters(name)
        if self.active == name:
            self.active = None
        if not getattr(self.transformer, "peft_config", None):
            return
        # peft makes another adapter active when the active one goes: put back what was selected.
        if self.active is None:
            self.transformer.disable_lora()
        else:
            self.transformer.set_adapter(self.active)
            self.transformer.enable_lora()

    def activate(self, name: str | None) -> None:
        if name == self.active:
            return
        if name is None:
            self.transformer.disable_lora()
        else:
            self.transformer.set_adapter(name)
            self.transformer.enable_lora()
        self.active = name


class _ShardedLora:
    """One linear's slice of one adapter: ``out += scale * B_rank(allreduce?(A_rank(x)))``."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, scale: float, group: Any | None):
        self.down, self.up, self.scale, self.group = down, up, scale, group

    def __call__(self, module: Any, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        low = torch.nn.functional.linear(x.to(self.down.dtype), self.down)
        if self.group is not None:  # row-parallel: sum the ranks' partial products
            import torch.distributed as dist

            dist.all_reduce(low, op=dist.ReduceOp.SUM, group=self.group)
        return output + (torch.nn.functional.linear(low, self.up) * self.scale).to(output.dtype)


class ShardedBackend:
    """LoRA adapters on a DeepSpeed tensor-parallel shard of the transformer (forward hooks)."""

    def __init__(self, transformer: Any):
        self.transformer = transformer
        self.adapters: dict[str, dict[str, _ShardedLora]] = {}
        self.active: str | None = None
        self._hooks: list[Any] = []

    def load(self, name: str, source: str) -> None:
        from ..parallel.transformer import _shard_slice

        state_dict, metadata = read_adapter(source)
        metadata = {k.removeprefix("transformer."): v for k, v in (metadata or {}).items()}
        prefix = "transformer."
        downs = {k[len(prefix):-len(".lora_A.weight")]: v for k, v in state_dict.items()
                 if k.startswith(prefix) and k.endswith(".lora_A.weight")}
        if not downs:
            raise ValueError("no transformer LoRA weights (lora_A/lora_B) in the adapter")
        modules = dict(self.transformer.named_modules())
        layers: dict[str, _ShardedLora] = {}
        for module_name, down in downs.items():
            up = state_dict.get(f"{prefix}{module_name}.lora_B.weight")
            module = modules.get(module_name)
            if up is None or module is None:
                raise ValueError(f"adapter targets {module_name!r}, which it lacks lora_B for or the model lacks")
            rank = down.shape[0]
            scale = float(metadata.get("lora_alpha", rank)) / float(metadata.get("r", rank))
            weight = module.weight
            where = _shard_slice(module, "weight")
            group = None
            if where is not None:
                dim, start = where
                width = weight.shape[dim]
                if dim == 0:  # column-parallel: this rank's output features
                    up = up[start:start + width]
                else:  # row-parallel: this rank's input features; the partial products are summed
                    down = down[:, start:start + width]
                    group = module.mp_group
            if down.shape[1] != weight.shape[1] or up.shape[0] != weight.shape[0]:
                raise ValueError(f"{module_name}: adapter shapes {tuple(up.shape)}x{tuple(down.shape)} do not fit "
                                 f"the weight {tuple(weight.shape)}")
            dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
            layers[module_name] = _ShardedLora(down.to(weight.device, dtype).contiguous(),
                                               up.to(weight.device, dtype).contiguous(), scale, group)
        self.adapters[name] = layers

    def unload(self, name: str) -> None:
        if self.active == name:
            self.activate(None)
        self.adapters.pop(name, None)

    def activate(self, name: str | None) -> None:
        if name == self.active:
            return
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if name is not None:
            modules = dict(self.transformer.named_modules())
            self._hooks = [modules[m].register_forward_hook(layer) for m, layer in self.adapters[name].items()]
        self.active = name


class StyleAdapters:
    """The adapters of one transformer: LRU of at most `max_loaded`, one active per run.

    Args:
        config: the application config (which styles carry which adapter).
        transformer: the denoiser's transformer (whole, or a tensor-parallel shard).
        max_loaded: most adapters kept loaded; loading one more unloads the least recently used.
    """

    def __init__(self, config: AppConfig, transformer: Any, max_loaded: int = DEFAULT_MAX_STYLES):
        if max_loaded < 1:
            raise ValueError(f"max_loaded={max_loaded} must be >= 1")
        self.config = config
        self.max_loaded = int(max_loaded)
        sharded = int(getattr(transformer, "_tp_size", 1) or 1) > 1
        self.backend: Any = ShardedBackend(transformer) if sharded else PeftBackend(transformer)
        self.loaded: OrderedDict[str, str] = OrderedDict()  # style -> adapter name, least recent first
        self.loads = 0  # adapters read from disk into the transformer since start
        self.load_counts: dict[str, int] = {}
        self.evictions: list[str] = []  # styles unloaded, oldest first

    def has_adapter(self, style: str) -> bool:
        return style in self.config.style_adapters

    def load(self, style: str) -> bool:
        """Make sure `style`'s adapter is loaded (most recently used now); True if it was read now.

        Raises:
            StyleUnavailable: the adapter is missing or corrupt (nothing of it stays loaded).
        """
        if style in self.loaded:
            self.loaded.move_to_end(style)
            return False
        source = adapter_source(self.config, style)
        if source is None:
            return False
        while len(self.loaded) >= self.max_loaded:
            self.unload(next(iter(self.loaded)))
        name = adapter_name(style)
        if source.startswith(("/", ".", "~")) and not Path(source).expanduser().exists():
            raise StyleUnavailable(style, f"adapter file {source} does not exist")  # not a hub id: don't ask one
        try:
            self.backend.load(name, source)
        except Exception as exc:  # noqa: BLE001 - any failure to read it: the style is unavailable
            logger.error("loading the LoRA adapter of style %r from %s failed: %r", style, source, exc)
            raise StyleUnavailable(style, _short(exc)) from exc
        self.loaded[style] = name
        self.loads += 1
        self.load_counts[style] = self.load_counts.get(style, 0) + 1
        logger.info("loaded the LoRA adapter of style %r (%d loaded)", style, len(self.loaded))
        return True

    def unload(self, style: str) -> bool:
        """Unload `style`'s adapter if loaded; True if it was."""
        name = self.loaded.pop(style, None)
        if name is None:
            return False
        self.backend.unload(name)
        self.evictions.append(style)
        logger.info("unloaded the LoRA adapter of style %r", style)
        return True

    def is_active(self, style: str) -> bool:
        """Whether the transformer already runs as `style` wants it, so `activate(style)` would change
        nothing: its adapter active and the most recently used one, or (a plain style) no adapter active.
        Cheap (no loading, no walk over the model's modules)."""
        if not self.has_adapter(style):
            return self.backend.active is None
        name = self.loaded.get(style)
        return name is not None and self.backend.active == name and next(reversed(self.loaded)) == style

    def activate(self, style: str) -> None:
        """Run the transformer as `style` wants it: its adapter (loaded if needed) or none at all.

        Returns at once when it already does (`is_active`): the denoiser calls this at every
        (step, window) unit, since another run may have switched or evicted the adapter meanwhile."""
        if self.is_active(style):
            return
        if not self.has_adapter(style):
            self.backend.activate(None)
            return
        self.load(style)
        self.backend.activate(self.loaded[style])

    def stats(self) -> dict[str, Any]:
        """Loaded styles (least recent first), load counts, evictions, the active one."""
        active = next((s for s, n in self.loaded.items() if n == self.backend.active), None)
        return {"loaded": list(self.loaded), "loads": self.loads, "load_counts": dict(self.load_counts),
                "evictions": list(self.evictions), "active": active, "max_loaded": self.max_loaded}
