"""The text encoder under concurrency: Serve runs its sync methods on a thread pool."""

from __future__ import annotations

import threading

import pytest
import torch

from vidgen_serve.config import AppConfig
from vidgen_serve.pipeline import TextEncoder
from vidgen_serve.plan import build_plan
from vidgen_serve.request import VideoRequest


@pytest.fixture(scope="module")
def uncached_encoder(checkpoint):
    # No cache: every encode tokenizes (padded to the limit).
    config = AppConfig(profile_overrides={"text_cache_size": 0})
    return config, TextEncoder(config, checkpoint)


def test_concurrent_encode_and_count_tokens_all_succeed(uncached_encoder):
    # Encodes tokenize padded to the limit while counts tokenize unpadded, untruncated text
    # far past the limit, on the same tokenizer.
    config, encoder = uncached_encoder
    plans = [build_plan(VideoRequest(prompt=f"scene {i}: " + "a fox in deep snow " * 6, seed=1), config)
             for i in range(4)]
    texts = [f"text {i} " + "long words repeated " * 20 for i in range(4)]
    expected_embeds = [encoder.encode(p) for p in plans]
    expected_counts = [encoder.count_tokens(t) for t in texts]
    assert all(n > encoder.max_sequence_length for n in expected_counts)

    start = threading.Barrier(8)
    encoding = threading.Semaphore(0)  # released once per finished encode thread
    errors: list[str] = []
    mismatches: list[str] = []

    def encode(i: int) -> None:
        start.wait()
        try:
            encode_some(i)
        finally:
            encoding.release()

    def encode_some(i: int) -> None:
        for _ in range(3):
            try:
                got = encoder.encode(plans[i])
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(f"encode: {exc!r}")
                continue
            want = expected_embeds[i]
            if not (torch.equal(got.prompt_embeds, want.prompt_embeds)
                    and torch.equal(got.negative_prompt_embeds, want.negative_prompt_embeds)):
                mismatches.append(f"encode {i}")

    encoders_done = threading.Event()

    def count(i: int) -> None:
        start.wait()
        # Count for as long as the encodes run (bounded), so the two always overlap.
        for _ in range(100):
            if encoders_done.is_set():
                break
            try:
                n = encoder.count_tokens(texts[i])
            except Exception as exc:  # noqa: BLE001
                errors.append(f"count_tokens: {exc!r}")
                continue
            if n != expected_counts[i]:
                mismatches.append(f"count {i}: {n} != {expected_counts[i]}")

    threads = [threading.Thread(target=encode, args=(i,)) for i in range(4)]
    threads += [threading.Thread(target=count, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for _ in range(4):
        encoding.acquire()
    encoders_done.set()
    for t in threads:
        t.join()
    assert errors == [], sorted(set(errors))[:5]
    assert mismatches == [], mismatches[:5]
