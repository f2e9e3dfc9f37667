"""Styles as LoRA adapters on the denoiser (tiny profile, CPU, fixed seed, in-process).

The tiny profile gives `ink-wash` and `cinematic` seeded random adapters built next to the
checkpoint; every other style is plain.
"""

from __future__ import annotations


import pytest
import torch

from vidgen_serve.config import AppConfig, StylePreset
from vidgen_serve.errors import VidgenError
from vidgen_serve.models.tiny import TINY_LORAS, ensure_tiny_loras
from vidgen_serve.pipeline.denoiser import Denoiser
from vidgen_serve.pipeline.styles import StyleUnavailable
from vidgen_serve.pipeline.text_encoder import TextEncoder
from vidgen_serve.plan import build_plan
from vidgen_serve.request import VideoRequest

PLAIN = "realistic"
LORA_A, LORA_B = "ink-wash", "cinematic"


def _plan(config: AppConfig, style: str):
    request = VideoRequest(prompt="a red fox running through snow", style=style, duration=1, resolution="480p",
                           num_inference_steps=2, seed=11)
    return build_plan(request, config)


@pytest.fixture(scope="module")
def encoder(tiny_config, checkpoint):
    return TextEncoder(tiny_config, checkpoint)


@pytest.fixture(scope="module")
def same_conditioning(tiny_config, encoder):
    """One set of embeddings for every style, so only the adapter differs between runs."""
    return encoder.encode(_plan(tiny_config, PLAIN))


def _run(denoiser: Denoiser, config: AppConfig, style: str, embeddings) -> torch.Tensor:
    return denoiser.denoise(_plan(config, style), embeddings)


@pytest.fixture(scope="module")
def reference(tiny_config, checkpoint, same_conditioning):
    """Latents of the plain style on a transformer that never saw an adapter."""
    return _run(Denoiser(tiny_config, checkpoint), tiny_config, PLAIN, same_conditioning)


def test_tiny_adapters_built_once_in_diffusers_format(tiny_config):
    root = ensure_tiny_loras(tiny_config.cache_dir)
    assert ensure_tiny_loras(tiny_config.cache_dir) == root
    for name in TINY_LORAS:
        assert (root / name / "pytorch_lora_weights.safetensors").is_file()
    assert tiny_config.style_adapters == {LORA_A: f"builtin:tiny-lora/{LORA_A}",
                                          LORA_B: f"builtin:tiny-lora/{LORA_B}"}


def test_real_profiles_cannot_use_tiny_adapters():
    with pytest.raises(ValueError, match="builtin:tiny"):
        AppConfig(profile="wan2.1-1.3b", styles={"x": StylePreset(lora="builtin:tiny-lora/ink-wash")})
    assert AppConfig(profile="wan2.1-1.3b").style_adapters == {}


def test_switching_styles(tiny_config, checkpoint, same_conditioning, reference):
    denoiser = Denoiser(tiny_config, checkpoint)
    a1 = _run(denoiser, tiny_config, LORA_A, same_conditioning)
    b = _run(denoiser, tiny_config, LORA_B, same_conditioning)
    a2 = _run(denoiser, tiny_config, LORA_A, same_conditioning)
    # Unloading another adapter (as an eviction does) leaves the active one in place.
    assert denoiser.unload_style(LORA_B) is True
    assert torch.equal(_run(denoiser, tiny_config, LORA_A, same_conditioning), a1)
    assert denoiser.load_style(LORA_B) is True
    plain = _run(denoiser, tiny_config, PLAIN, same_conditioning)
    # An adapter changes the output clearly, each its own way; the same style twice is identical.
    assert (a1 - reference).abs().mean() > 0.05
    assert (b - reference).abs().mean() > 0.05
    assert (a1 - b).abs().mean() > 0.05
    assert torch.equal(a1, a2)
    # A plain style after LoRA styles runs the plain transformer: bit for bit the never-adapted output.
    assert torch.equal(plain, reference)
    # ink-wash was read once (its later runs were cache hits); cinematic again after its unload.
    stats = denoiser.style_stats()
    assert stats["loads"] == 3 and stats["load_counts"] == {LORA_A: 1, LORA_B: 2}
    assert stats["loaded"] == [LORA_A, LORA_B]


def test_lora_style_on_bfloat16_transformer(tiny_config, checkpoint, same_conditioning, reference):
    """The real profiles run bf16: the adapter must act there as in float32, and leave no trace when off."""
    bf16_config = AppConfig(profile="tiny", cache_dir=tiny_config.cache_dir, profile_overrides={"dtype": "bfloat16"})
    denoiser = Denoiser(bf16_config, checkpoint)
    assert denoiser.transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    plain = _run(denoiser, bf16_config, PLAIN, same_conditioning)  # never adapted
    styled = _run(denoiser, bf16_config, LORA_A, same_conditioning)
    other = _run(denoiser, bf16_config, LORA_B, same_conditioning)
    plain_after_switch = _run(denoiser, bf16_config, PLAIN, same_conditioning)
    assert denoiser.unload_style(LORA_A) and denoiser.unload_style(LORA_B)
    assert not getattr(denoiser.transformer, "peft_config", None)
    plain_after_unload = _run(denoiser, bf16_config, PLAIN, same_conditioning)
    styled_fp32 = _run(Denoiser(tiny_config, checkpoint), tiny_config, LORA_A, same_conditioning)
    # bf16 noise: the plain style in bf16 against float32.
    noise = (plain - reference).abs()
    assert noise.max() > 0  # really a bf16 computation
    # The adapter changes the bf16 output by far more than bf16 rounding does...
    assert (styled - plain).abs().mean() > 10 * noise.mean()
    assert (other - styled).abs().mean() > 10 * noise.mean()
    # ...and the styled bf16 output is the styled float32 one up to that same rounding.
    styled_diff = (styled - styled_fp32).abs()
    assert styled_diff.max() <= 2 * noise.max(), (styled_diff.max().item(), noise.max().item())
    assert styled_diff.mean() <= 2 * noise.mean(), (styled_diff.mean().item(), noise.mean().item())
    # Switching back to a plain style, or unloading every adapter, gives the never-adapted bf16 output.
    assert torch.equal(plain_after_switch, plain)
    assert torch.equal(plain_after_unload, plain)


def _spy_activations(transformer) -> list[tuple]:
    """Record every call of the diffusers methods that (de)activate adapters on `transformer` (each walks
    every module of the model); the real methods still run."""
    calls: list[tuple] = []
    for method in ("set_adapter", "set_adapters", "enable_lora", "disable_lora"):
        real = getattr(transformer, method)

        def spy(*args, _real=real, _method=method, **kwargs):
            calls.append((_method, *args))
            return _real(*args, **kwargs)

        setattr(transformer, method, spy)  # an instance attribute: shadows the class's method
    return calls


def test_adapter_activated_only_when_it_must_change(tiny_config, checkpoint, encoder):
    """A run activates its style once, not at every (step, window) unit; only a change of style switches."""

    def long_plan(style: str):
        request = VideoRequest(prompt="a red fox running through snow", style=style, duration=6,
                               resolution="480p", aspect="1:1", num_inference_steps=2, seed=11)
        return build_plan(request, tiny_config)

    plans = {style: long_plan(style) for style in (LORA_A, LORA_B, PLAIN)}
    windows = len(plans[LORA_A].windows)
    assert windows >= 2
    embeddings = encoder.encode(plans[PLAIN])
    denoiser = Denoiser(tiny_config, checkpoint)
    assert denoiser.load_style(LORA_A) and denoiser.load_style(LORA_B)  # loads happen before counting
    calls = _spy_activations(denoiser.transformer)
    set_a, set_b = ("set_adapter", "style_ink_wash"), ("set_adapter", "style_cinematic")

    events: list[dict] = []
    sequential_a = denoiser.denoise(plans[LORA_A], embeddings, progress=events.append)
    assert len(events) == 2 * windows  # 2 steps x the windows: that many units...
    assert calls == [set_a, ("enable_lora",)]  # ...and one activation
    calls.clear()
    sequential_b = denoiser.denoise(plans[LORA_B], embeddings)  # the next request, another style
    assert calls == [set_b, ("enable_lora",)]
    calls.clear()
    denoiser.denoise(plans[LORA_B], embeddings)  # the same style again: nothing to change
    assert calls == []
    denoiser.denoise(plans[PLAIN], embeddings)
    assert calls == [("disable_lora",)]
    calls.clear()

    # Two runs advanced unit by unit in turn (as a replica interleaves requests): every unit must switch,
    # and each run still gets exactly its own output.
    run_a, run_b = denoiser.start(plans[LORA_A], embeddings), denoiser.start(plans[LORA_B], embeddings)
    calls.clear()
    while not run_a.done:
        run_a.advance()
        run_b.advance()
    assert calls == [set_a, ("enable_lora",), set_b, ("enable_lora",)] * (2 * windows)
    assert torch.equal(run_a.latents(), sequential_a) and torch.equal(run_b.latents(), sequential_b)

    # The run's adapter evicted between two of its units: the next unit reads it again and activates it.
    run_a = denoiser.start(plans[LORA_A], embeddings)
    run_a.advance()
    assert denoiser.unload_style(LORA_A) is True
    calls.clear()
    while not run_a.done:
        run_a.advance()
    assert calls == [("disable_lora",), set_a, ("enable_lora",)]  # (the load's disable_lora, then the switch)
    assert torch.equal(run_a.latents(), sequential_a)
    assert denoiser.style_stats()["load_counts"][LORA_A] == 2


def test_cache_hit_does_not_reload_and_eviction_is_lru(tiny_config, checkpoint):
    styles = dict(tiny_config.styles)
    # A third adapter: the ink-wash file under another style name.
    styles["sketch"] = StylePreset(lora=str(ensure_tiny_loras(tiny_config.cache_dir) / LORA_A))
    config = AppConfig(profile="tiny", cache_dir=tiny_config.cache_dir, styles=styles)
    denoiser = Denoiser(config, checkpoint, max_styles=2)
    assert denoiser.load_style(LORA_A) is True
    assert denoiser.load_style(LORA_B) is True
    assert denoiser.load_style(LORA_A) is False  # a hit: not read again, now the most recent
    assert denoiser.load_style(PLAIN) is False  # plain styles load nothing
    assert denoiser.style_stats()["loads"] == 2
    assert denoiser.load_style("sketch") is True  # over the limit: the least recently used (cinematic) goes
    stats = denoiser.style_stats()
    assert stats["evictions"] == [LORA_B]
    assert stats["loaded"] == [LORA_A, "sketch"]
    assert stats["loads"] == 3
    # The evicted adapter is gone from the transformer too; peft holds exactly the two loaded ones.
    assert set(denoiser.transformer.peft_config) == {"style_ink_wash", "style_sketch"}
    assert denoiser.load_style(LORA_B) is True  # read again after its eviction
    assert denoiser.style_stats()["evictions"] == [LORA_B, LORA_A]


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_bad_adapter_makes_only_its_style_unavailable(tiny_config, checkpoint, same_conditioning, reference,
                                                      tmp_path, damage):
    good = ensure_tiny_loras(tiny_config.cache_dir) / LORA_B / "pytorch_lora_weights.safetensors"
    bad = tmp_path / "broken" / "pytorch_lora_weights.safetensors"
    if damage == "corrupt":
        bad.parent.mkdir()
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # truncated
    styles = dict(tiny_config.styles)
    styles["broken"] = StylePreset(lora=str(bad))
    config = AppConfig(profile="tiny", cache_dir=tiny_config.cache_dir, styles=styles)
    denoiser = Denoiser(config, checkpoint)
    expected_b = _run(Denoiser(tiny_config, checkpoint), tiny_config, LORA_B, same_conditioning)
    b = _run(denoiser, config, LORA_B, same_conditioning)
    with pytest.raises(StyleUnavailable) as info:
        denoiser.start(_plan(config, "broken"), same_conditioning)
    err = info.value
    assert isinstance(err, VidgenError) and err.status_code == 503 and err.code == "style_unavailable"
    assert "'broken'" in err.message
    assert "broken" not in denoiser.style_stats()["loaded"]
    # The same denoiser still serves the other styles, plain and LoRA, exactly as before.
    assert torch.equal(_run(denoiser, config, PLAIN, same_conditioning), reference)
    assert torch.equal(_run(denoiser, config, LORA_B, same_conditioning), b)
    assert torch.equal(b, expected_b)


def test_multiplexed_handle_teardown_unloads_once(tiny_config, checkpoint):
    """Serve calls the cached object's `__del__` on eviction and Python calls it again on collection."""
    import gc
    from concurrent.futures import ThreadPoolExecutor

    from vidgen_serve.serving.style_multiplex import StyleAdapterHandle

    denoiser = Denoiser(tiny_config, checkpoint)
    executor = ThreadPoolExecutor(max_workers=1)
    try:
        assert denoiser.load_style(LORA_A) is True
        handle = StyleAdapterHandle(LORA_A, denoiser, executor)
        handle.__del__()  # Serve's eviction
        executor.submit(lambda: None).result()  # the queued unload has run
        stats = denoiser.style_stats()
        assert stats["loaded"] == [] and stats["evictions"] == [LORA_A]
        assert not getattr(denoiser.transformer, "peft_config", None)
        assert denoiser.load_style(LORA_A) is True  # requested again: a new load (and a new handle)
        del handle  # the evicted handle is collected later: it must not unload the new load
        gc.collect()
        executor.submit(lambda: None).result()
        assert denoiser.style_stats()["loaded"] == [LORA_A]
    finally:
        executor.shutdown()
