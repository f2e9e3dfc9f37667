"""Attention maps on the tiny checkpoint: the capture leaves the transformer's outputs bit-identical,
the raw weights are a softmax over the text positions, maps follow the prompt, the PNG has the
documented size, and `vidgen-serve attention` writes it."""

from __future__ import annotations

import io
import json

import pytest
import torch

from vidgen_serve.attention import AttentionRequest, attention_plan, field_tokens, low_resolution
from vidgen_serve.errors import InvalidRequest
from vidgen_serve.pipeline.attention_maps import (
    CrossAttentionCapture,
    attention_maps,
    capture_maps,
    column_maps,
    grid_layout,
)

FOX = "a red fox running through snow"
PANDA = "主体:熊猫;动作:吃竹子;场景:竹林;风格:3D动画"


def _plan(config, prompt=FOX, **fields):
    return attention_plan(AttentionRequest(prompt=prompt, seed=11, **fields), config)


@pytest.fixture(scope="module")
def stages(pipeline):
    return pipeline.text_encoder, pipeline.denoiser


def _transformer_inputs(transformer, text_encoder, plan):
    """One CFG-batched forward's inputs at a fixed seed (as `Denoiser._predict` builds them)."""
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(1, transformer.config.in_channels, plan.latent_frames, plan.latent_height,
                          plan.latent_width, generator=g)
    emb = text_encoder.encode(plan)
    return dict(hidden_states=torch.cat([latents, latents]), timestep=torch.tensor([700.0, 700.0]),
                encoder_hidden_states=torch.cat([emb.prompt_embeds, emb.negative_prompt_embeds]), return_dict=False)


def test_capture_leaves_outputs_bit_identical(stages, tiny_config):
    text_encoder, denoiser = stages
    transformer = denoiser.transformer
    plan = _plan(tiny_config)
    inputs = _transformer_inputs(transformer, text_encoder, plan)
    with torch.inference_mode():
        plain = transformer(**inputs)[0]
        with CrossAttentionCapture(transformer) as capture:
            captured = transformer(**inputs)[0]
        after = transformer(**inputs)[0]
    assert capture.calls == len(transformer.blocks)
    assert torch.equal(plain, captured) and torch.equal(plain, after)
    assert all(not block.attn2._forward_pre_hooks for block in transformer.blocks)  # hooks removed
    # A whole sampling run too: same latents with and without the capture.
    embeddings = text_encoder.encode(plan)
    reference = denoiser.denoise(plan, embeddings)
    with CrossAttentionCapture(transformer) as capture:
        assert torch.equal(denoiser.denoise(plan, embeddings), reference)
    assert capture.calls == len(transformer.blocks) * plan.num_inference_steps


def test_raw_capture_is_a_softmax_over_all_text_positions(stages, tiny_config):
    text_encoder, denoiser = stages
    transformer = denoiser.transformer
    plan = _plan(tiny_config)
    inputs = _transformer_inputs(transformer, text_encoder, plan)
    with torch.inference_mode(), CrossAttentionCapture(transformer) as capture:
        transformer(**inputs)
    weights = capture.mean()  # (queries, keys)
    patches = plan.latent_frames * (plan.latent_height // 2) * (plan.latent_width // 2)
    assert weights.shape == (patches, tiny_config.model_profile.max_sequence_length)
    assert (weights >= 0).all()
    # Softmax is over the text positions for each query: each row sums to 1 over ALL of them
    # (prompt tokens, end token and padding).
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(patches), atol=1e-5, rtol=0)
    # The prompt's own tokens take only part of it: padding positions are attended too.
    n = len(text_encoder.tokens(plan.prompts[0])["positions"])
    assert 0 < weights[:, :n].sum(dim=1).mean() < 1


def test_maps_shape_and_invariants(stages, tiny_config):
    text_encoder, denoiser = stages
    plan = _plan(tiny_config, frames=3, steps=2)
    maps = capture_maps(denoiser, plan, text_encoder.encode(plan))
    frames, h, w = 3, plan.latent_height // 2, plan.latent_width // 2
    assert maps.shape == (frames, tiny_config.model_profile.max_sequence_length, h, w)
    assert (maps >= 0).all()
    torch.testing.assert_close(maps.sum(dim=1), torch.ones(frames, h, w), atol=1e-5, rtol=0)
    tokens = text_encoder.tokens(plan.prompts[0])
    columns = column_maps(maps, tokens["positions"], [])
    assert columns.shape == (frames, len(tokens["labels"]), h, w)
    assert columns.sum(dim=1).max() < 1  # the end token and the padding hold the rest


def test_tokens_exclude_end_token_and_padding(stages, tiny_config):
    text_encoder, _ = stages
    text = _plan(tiny_config).prompts[0]
    tokens = text_encoder.tokens(text)
    n = text_encoder.count_tokens(text)  # includes </s>
    assert tokens["positions"] == list(range(n - 1))
    assert "</s>" not in tokens["labels"] and "<pad>" not in tokens["labels"]
    assert tokens["labels"][:2] == ["a", "re"] and "photorealistic" in tokens["labels"]


def test_maps_follow_the_prompt_and_the_seed(stages, tiny_config):
    text_encoder, denoiser = stages

    def maps(prompt, seed=11):
        plan = attention_plan(AttentionRequest(prompt=prompt, seed=seed, steps=2, frames=2), tiny_config)
        return capture_maps(denoiser, plan, text_encoder.encode(plan))

    fox = maps(FOX)
    assert torch.equal(fox, maps(FOX))  # same prompt, same seed: same maps
    assert (fox - maps(PANDA)).abs().max() > 1e-3  # another prompt attends elsewhere
    assert (fox - maps(FOX, seed=12)).abs().max() > 1e-4  # another seed renders another video


def test_structured_prompt_fields_and_png_grid(stages, tiny_config):
    from PIL import Image

    text_encoder, denoiser = stages
    plan = _plan(tiny_config, prompt=PANDA, frames=2, steps=2)
    tokens = text_encoder.tokens(plan.prompts[0])
    result = attention_maps(denoiser, plan, text_encoder.encode(plan), tokens, PANDA)
    # The parser recomposes the fields (熊猫在竹林中吃竹子); the style field selected a preset, so it
    # is not in the encoded text and has no column.
    assert [f["name"] for f in result.fields] == ["subject", "scene", "action"]
    for f in result.fields:  # each field's tokens cover its value (a token may reach past it: 在竹|竹林)
        assert f["value"] in "".join(tokens["labels"][i] for i in f["tokens"])
    # The grid: one row per latent frame, one column per token then per field.
    h, w = result.patch_grid
    cols = len(result.tokens) + len(result.fields)
    assert result.grid == grid_layout(2, cols, h, w)
    cell_w, cell_h = result.grid["cell"]
    assert result.grid["width"] == 24 + cols * (cell_w + 2) and result.grid["height"] == 16 + 2 * (cell_h + 2)
    assert max(cell_w, cell_h) >= 64 and cell_w % w == 0 and cell_w // w == cell_h // h
    image = Image.open(io.BytesIO(result.png))
    assert image.format == "PNG" and image.size == (result.grid["width"], result.grid["height"])
    # Each cell is normalised to its own range: its darkest and brightest pixels span the colour map.
    x0, y0 = 24, 16
    cell = image.crop((x0, y0, x0 + cell_w, y0 + cell_h)).convert("L")
    lo, hi = cell.getextrema()
    assert hi - lo > 150
    # A field's weights are the sum of its tokens'.
    weights = torch.tensor(result.token_weights)  # (frames, columns): mean weight per cell
    n = len(result.tokens)
    for k, f in enumerate(result.fields):
        torch.testing.assert_close(weights[:, n + k], weights[:, f["tokens"]].sum(dim=1))


def test_field_tokens_map_values_onto_spans():
    text = "主体:熊猫;动作:吃竹子, photorealistic"
    spans = [(0, 2), (2, 3), (3, 5), (5, 6), (6, 8), (8, 9), (9, 12), (12, 13), (14, 28)]
    assert field_tokens("主体:熊猫;动作:吃竹子", text, spans) == [
        {"name": "subject", "value": "熊猫", "tokens": [2]}, {"name": "action", "value": "吃竹子", "tokens": [6]}]
    assert field_tokens("subject: red  panda ； action: eats", "subject: red panda ; action: eats",
                        [(9, 12), (13, 18), (29, 33)])[0] == {"name": "subject", "value": "red panda", "tokens": [0, 1]}
    assert field_tokens("a red fox running", "a red fox running", [(0, 1)]) == []  # not structured


def test_attention_plan_bounds(tiny_config):
    plan = _plan(tiny_config, frames=4, steps=3)
    assert (plan.latent_frames, plan.num_frames, plan.num_inference_steps) == (4, 13, 3)
    assert [(w.start, w.end) for w in plan.windows] == [(0, 4)] and plan.step_cache == "off"
    assert low_resolution(832, 480) == (512, 288) and low_resolution(112, 64) == (112, 64)
    with pytest.raises(InvalidRequest) as err:
        _plan(tiny_config, style="vaporwave")
    assert err.value.details[0]["field"] == "style"
    with pytest.raises(ValueError):
        AttentionRequest(prompt="x", frames=9)


def test_cli_writes_the_png(tmp_path, capsys, checkpoint):
    from PIL import Image

    from vidgen_serve.cli import main

    out = tmp_path / "maps.png"
    assert main(["attention", FOX, "--output", str(out), "--steps", "2", "--frames", "2", "--seed", "3"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["tokens"][:3] == ["a", "re", "d"] and doc["frames"] == 2 and doc["seed"] == 3
    assert Image.open(out).size == (doc["grid"]["width"], doc["grid"]["height"])
    assert doc["grid"]["rows"] == 2 and doc["grid"]["cols"] == len(doc["tokens"])
    assert main(["attention", FOX, "--output", str(tmp_path / "x.png"), "--steps", "50"]) == 2
    assert "steps=50" in capsys.readouterr().err and not (tmp_path / "x.png").exists()
