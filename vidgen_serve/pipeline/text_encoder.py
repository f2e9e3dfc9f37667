"""Stage 1: prompt + negative prompt -> UMT5 embeddings, with an LRU cache keyed by text."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from ..config import AppConfig
from ..models.loading import device_for, load_text_encoder, load_tokenizer, resolve_checkpoint
from ..plan import GenerationPlan


def count_tokens(tokenizer: Any, text: str) -> int:
    """Tokens a Wan encoder sees for `text` before truncation (incl. end-of-sequence).

    The text is cleaned first exactly as `WanPipeline` cleans it before tokenising (ftfy,
    HTML unescape, whitespace collapsed). Used by `TextEncoder.count_tokens` and by
    `vidgen-serve analyze`, which loads only the tokenizer.
    """
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    return len(tokenizer(prompt_clean(text), add_special_tokens=True)["input_ids"])


@dataclass
class PromptEmbeddings:
    """What the text encoder hands the denoiser (CPU tensors: they cross Ray's object store).

    Attributes:
        prompt_embeds: (P, S, D), one row per distinct prompt in `plan.prompts`.
        negative_prompt_embeds: (1, S, D), or None when guidance is off.
        cache_hits: texts served from the cache for this call.
        cache_misses: texts that ran through the encoder.
    """

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None
    cache_hits: int = 0
    cache_misses: int = 0


class TextEncoder:
    """UMT5 text encoder of a Wan checkpoint, encoding exactly as diffusers' `WanPipeline` does.

    Args:
        config: application config (profile, cache dir).
        checkpoint: checkpoint path; default resolves the profile's.
    """

    def __init__(self, config: AppConfig, checkpoint: str | None = None):
        from diffusers import WanPipeline

        self.profile = config.model_profile
        checkpoint = checkpoint or resolve_checkpoint(config)
        self.device = device_for(self.profile)
        self.tokenizer = load_tokenizer(checkpoint)
        text_encoder = load_text_encoder(checkpoint, self.profile, self.device)
        # WanPipeline's own prompt cleaning, tokenisation and padding, without the other components.
        self._pipe = WanPipeline(
            tokenizer=self.tokenizer, text_encoder=text_encoder, vae=None, scheduler=None, transformer=None
        )
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = self.profile.text_cache_size
        self._lock = threading.Lock()  # the cache
        # The fast tokenizer keeps its truncation/padding settings on one shared Rust object
        # and each call re-sets them: concurrent calls with different settings (counting:
        # none; encoding: pad to max_sequence_length) corrupt each other or fail with
        # "Already borrowed". Serve runs these methods on a thread pool, so every use of the
        # tokenizer (and the encoder forward that follows it) takes this lock.
        self._tokenizer_lock = threading.Lock()
        self.max_sequence_length = self.profile.max_sequence_length

    def count_tokens(self, text: str) -> int:
        """Tokens the encoder would see for `text` before truncation (incl. end-of-sequence).

        The text is cleaned first exactly as `WanPipeline` cleans it before tokenising
        (ftfy, HTML unescape, whitespace collapsed), so the count is the encoder's.
        """
        with self._tokenizer_lock:
            return count_tokens(self.tokenizer, text)

    def tokens(self, text: str) -> dict:
        """The tokens of `text` as the encoder sees them (cleaned, truncated to its limit), without
        the end token and padding: {"text": cleaned text, "labels": [...], "spans": [[start, end]]
        (character spans in "text"; [0, 0] where the tokenizer gives none), "positions": [...]
        (each token's index in the embeddings)}."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        cleaned = prompt_clean(text)
        fast = getattr(self.tokenizer, "is_fast", False)
        with self._tokenizer_lock:
            encoded = self.tokenizer(cleaned, truncation=True, max_length=self.max_sequence_length,
                                     add_special_tokens=True, return_offsets_mapping=fast)
            pieces = self.tokenizer.convert_ids_to_tokens(encoded["input_ids"])
        special = set(self.tokenizer.all_special_ids)
        spans = encoded["offset_mapping"] if fast else [(0, 0)] * len(pieces)
        out: dict = {"text": cleaned, "labels": [], "spans": [], "positions": []}
        for i, (token_id, piece, (start, end)) in enumerate(zip(encoded["input_ids"], pieces, spans)):
            if token_id in special:
                continue
            out["labels"].append(cleaned[start:end].strip() or piece if end > start else piece)
            out["spans"].append([start, end])
            out["positions"].append(i)
        return out

    def _encode_text(self, text: str) -> tuple[torch.Tensor, bool]:
        with self._lock:
            cached = self._cache.get(text)
            if cached is not None:
                self._cache.move_to_end(text)
                return cached, True
        with self._tokenizer_lock, torch.inference_mode():
            embeds = self._pipe._get_t5_prompt_embeds(
                prompt=text, max_sequence_length=self.max_sequence_length, device=self.device
            )
        embeds = embeds.to("cpu")
        with self._lock:
            if self._cache_size:
                self._cache[text] = embeds
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return embeds, False

    def encode(self, plan: GenerationPlan) -> PromptEmbeddings:
        """Embeddings for every prompt of the plan and, with guidance, its negative prompt."""
        hits = misses = 0
        rows = []
        guided = plan.classifier_free_guidance
        texts = list(plan.prompts) + ([plan.negative_prompt] if guided else [])
        for text in texts:
            embeds, hit = self._encode_text(text)
            hits += hit
            misses += not hit
            rows.append(embeds)
        positive = torch.cat(rows[: len(plan.prompts)], dim=0)
        negative = rows[len(plan.prompts)] if guided else None
        return PromptEmbeddings(positive, negative, cache_hits=hits, cache_misses=misses)
