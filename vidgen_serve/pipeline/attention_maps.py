"""Cross-attention maps of the Wan transformer, read without changing its outputs, as a PNG grid.

Every `WanTransformerBlock` attends from the video's patch tokens to the prompt's tokens in
its `attn2` (diffusers' `WanAttnProcessor`). `CrossAttentionCapture` puts a forward pre-hook
on each `attn2` that recomputes, from the same inputs, the same projections and the same
q/k RMSNorms, softmax(q·kᵀ/√d) per head and adds its mean over heads to a running sum; the
processor itself runs untouched and produces the output (bit-identical with and without the
capture). Each query's row of weights sums to 1 over *all* the encoder's positions (the
prompt's tokens, its end token and the padding up to `max_sequence_length`); the maps keep
the prompt's tokens only.

`capture_maps` runs a plan through `Denoiser.denoise` under the capture and returns, per
latent frame and text position, a (h, w) map over the latent patch grid, averaged over heads,
blocks and steps (the conditional pass only, when guidance runs two). `render_grid` draws them
with Pillow: one row per latent frame, one column per token (then per structured field), each
cell normalised to its own min..max.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..attention import field_tokens
from ..plan import GenerationPlan
from .text_encoder import PromptEmbeddings

# Grid geometry (pixels): cells are the latent patch grid scaled up by a whole factor so the long side
# is at least CELL_MIN_PX; a header row holds the column labels, a left column the frame labels.
CELL_MIN_PX = 64
GAP_PX = 2
HEADER_PX = 16
LEFT_PX = 24
LABEL_FONT_PX = 10
_CHUNK_BYTES = 64 << 20  # bound on one block's (heads x queries x keys) float32 scores


class CrossAttentionCapture:
    """Context manager: while active, every `attn2` call of `transformer` adds its head-averaged
    cross-attention weights (batch row `row`: the conditional pass) to `total`.

    Attributes:
        total: (queries, keys) float32 sum of the head-averaged weights over the captured calls.
        calls: how many `attn2` calls were captured (blocks x steps).
    """

    def __init__(self, transformer: Any, row: int = 0):
        self.transformer = transformer
        self.row = row
        self.total: torch.Tensor | None = None
        self.calls = 0
        self._handles: list[Any] = []

    def __enter__(self) -> "CrossAttentionCapture":
        for block in self.transformer.blocks:
            self._handles.append(block.attn2.register_forward_pre_hook(self._hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def mean(self) -> torch.Tensor:
        """(queries, keys): the weights averaged over heads and every captured call."""
        if self.total is None:
            raise RuntimeError("no cross-attention call was captured")
        return self.total / self.calls

    def _hook(self, attn: Any, args: tuple, kwargs: dict) -> None:
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        hidden = args[0] if args else kwargs["hidden_states"]
        context = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
        with torch.no_grad():
            hidden = hidden[self.row : self.row + 1]
            context = context[self.row : self.row + 1]
            if attn.add_k_proj is not None:  # image-conditioned models: the text is the last 512 positions
                context = context[:, context.shape[1] - 512 :]
            # As WanAttnProcessor computes them: projections, RMSNorm across heads, then split into heads.
            query, key, _ = _get_qkv_projections(attn, hidden, context)
            query = attn.norm_q(query).unflatten(2, (attn.heads, -1))[0].transpose(0, 1).float()  # (H, Q, d)
            key = attn.norm_k(key).unflatten(2, (attn.heads, -1))[0].transpose(0, 1).float()  # (H, K, d)
            heads, queries, dim = query.shape
            if self.total is None:
                self.total = torch.zeros(queries, key.shape[1], dtype=torch.float32, device=query.device)
            scale = 1.0 / math.sqrt(dim)
            chunk = max(1, _CHUNK_BYTES // (4 * heads * key.shape[1]))
            for start in range(0, queries, chunk):
                scores = torch.matmul(query[:, start : start + chunk], key.transpose(1, 2)) * scale
                self.total[start : start + chunk] += torch.softmax(scores, dim=-1).mean(dim=0)
        self.calls += 1


def capture_maps(denoiser: Any, plan: GenerationPlan, embeddings: PromptEmbeddings) -> torch.Tensor:
    """Run `plan` (one window) through `denoiser` while capturing its cross-attention.

    Returns:
        (frames, keys, h, w) float32 on CPU: for each latent frame and each text position, the
        weight over the latent patch grid (h = latent_height / 2, w = latent_width / 2), averaged over
        heads, blocks and steps. Summed over all keys, every patch's weights are 1.
    """
    if len(plan.windows) != 1:
        raise ValueError("attention maps are read from a single-window plan")
    transformer = denoiser.transformer
    _, p_h, p_w = transformer.config.patch_size
    frames, h, w = plan.latent_frames, plan.latent_height // p_h, plan.latent_width // p_w
    # A compiled transformer runs eagerly here: the hooks would otherwise recompile its blocks.
    eager = torch.compiler.set_stance("force_eager") if getattr(denoiser.profile, "compile", False) \
        else contextlib.nullcontext()
    with eager, CrossAttentionCapture(transformer) as capture:
        denoiser.denoise(plan, embeddings)
    weights = capture.mean().cpu()  # (frames * h * w, keys), patches in the transformer's (f, h, w) order
    return weights.reshape(frames, h, w, -1).permute(0, 3, 1, 2).contiguous()


@dataclass
class AttentionMaps:
    """The outcome of an attention-map run (what the route and the CLI answer with)."""

    tokens: list[str]
    fields: list[dict[str, Any]]
    frames: int
    patch_grid: tuple[int, int]  # (h, w) of each map
    grid: dict[str, Any]
    png: bytes
    seed: int
    steps: int
    token_weights: list[list[float]] = field(default_factory=list)  # (frames, columns): mean weight of each cell

    def document(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "fields": self.fields, "frames": self.frames,
                "patch_grid": list(self.patch_grid), "grid": self.grid, "seed": self.seed, "steps": self.steps,
                "mean_weights": self.token_weights}


def column_maps(maps: torch.Tensor, positions: list[int], fields: list[dict[str, Any]]) -> torch.Tensor:
    """(frames, columns, h, w): the maps of the token `positions`, then of each field (sum over its tokens)."""
    columns = maps[:, positions]
    if fields:
        summed = [columns[:, f["tokens"]].sum(dim=1) for f in fields]
        columns = torch.cat([columns, torch.stack(summed, dim=1)], dim=1)
    return columns


def grid_layout(rows: int, cols: int, map_h: int, map_w: int) -> dict[str, Any]:
    """Pixel layout of the PNG: `width` x `height`, cells of `cell` = [w, h] with `gap` between them,
    a `header` row of column labels on top and a `left` column of frame labels."""
    scale = max(1, -(-CELL_MIN_PX // max(map_h, map_w)))
    cell_w, cell_h = map_w * scale, map_h * scale
    return {"rows": rows, "cols": cols, "cell": [cell_w, cell_h], "gap": GAP_PX, "header": HEADER_PX,
            "left": LEFT_PX, "width": LEFT_PX + cols * (cell_w + GAP_PX), "height": HEADER_PX + rows * (cell_h + GAP_PX)}


def _printable(label: str) -> bool:
    return bool(label) and all(32 < ord(c) < 127 for c in label)


def render_grid(columns: torch.Tensor, labels: list[str]) -> tuple[bytes, dict[str, Any]]:
    """A PNG heat-map grid of `columns` (frames, cols, h, w): rows = frames, columns = labels.

    Each cell is normalised to its own min..max and coloured dark (low) to yellow (high). Labels the
    default font cannot draw (non-ASCII) are written as their column number (`#3`); the caller returns
    the real labels alongside. Returns (PNG bytes, `grid_layout(...)`).
    """
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    rows, cols, map_h, map_w = columns.shape
    layout = grid_layout(rows, cols, map_h, map_w)
    cell_w, cell_h = layout["cell"]
    canvas = Image.new("RGB", (layout["width"], layout["height"]), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=LABEL_FONT_PX)
    lo = columns.amin(dim=(2, 3), keepdim=True)
    span = columns.amax(dim=(2, 3), keepdim=True) - lo
    normed = torch.where(span > 0, (columns - lo) / span.clamp_min(1e-30), torch.zeros_like(columns))
    pixels = (normed * 255).round().to(torch.uint8).numpy()
    for c in range(cols):
        x = LEFT_PX + c * (cell_w + GAP_PX)
        text = labels[c].strip() if _printable(labels[c].strip()) else f"#{c}"
        while len(text) > 1 and draw.textlength(text, font=font) > cell_w:
            text = text[:-1]
        draw.text((x, 2), text, fill=(0, 0, 0), font=font)
        for r in range(rows):
            y = HEADER_PX + r * (cell_h + GAP_PX)
            gray = Image.fromarray(pixels[r, c]).resize((cell_w, cell_h), Image.Resampling.NEAREST)
            canvas.paste(ImageOps.colorize(gray, black=(0, 0, 4), mid=(188, 55, 84), white=(252, 255, 164)), (x, y))
    for r in range(rows):
        draw.text((2, HEADER_PX + r * (cell_h + GAP_PX) + 2), f"f{r}", fill=(0, 0, 0), font=font)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue(), layout


def attention_maps(denoiser: Any, plan: GenerationPlan, embeddings: PromptEmbeddings, tokens: dict[str, Any],
                   prompt: str) -> AttentionMaps:
    """Capture `plan`'s cross-attention and draw it for the prompt's tokens (and structured fields).

    Args:
        denoiser: a single-process `Denoiser`.
        plan: from `vidgen_serve.attention.attention_plan`.
        embeddings: `TextEncoder.encode(plan)`.
        tokens: `TextEncoder.tokens(plan.prompts[0])`: labels, spans and positions of the prompt's tokens.
        prompt: the user's prompt (its structured fields are mapped onto the tokens).
    """
    maps = capture_maps(denoiser, plan, embeddings)
    fields = field_tokens(prompt, tokens["text"], [tuple(s) for s in tokens["spans"]])
    columns = column_maps(maps, tokens["positions"], fields)
    labels = list(tokens["labels"]) + [f["name"] for f in fields]
    png, grid = render_grid(columns, labels)
    return AttentionMaps(tokens=list(tokens["labels"]), fields=fields, frames=plan.latent_frames,
                         patch_grid=(maps.shape[2], maps.shape[3]), grid=grid, png=png, seed=plan.seed,
                         steps=plan.num_inference_steps,
                         token_weights=columns.mean(dim=(2, 3)).tolist())
