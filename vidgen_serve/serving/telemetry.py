"""Tracing (OpenTelemetry) and metrics (Ray Serve's metrics API, exported to Prometheus).

Tracing: one span per HTTP request at the ingress; each stage deployment opens a child
span from the context the ingress passes explicitly with the call (a W3C traceparent
carrier dict). The exporter follows the standard `OTEL_*` variables:
`OTEL_TRACES_EXPORTER=otlp` (endpoint from `OTEL_EXPORTER_OTLP_ENDPOINT`), `console`, or
`none` (default: spans are created and propagated, not exported).
"""

from __future__ import annotations

import asyncio
import os
import resource
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

_setup_lock = threading.Lock()
_configured = False


def configure_tracing(service_name: str = "vidgen-serve") -> None:
    """Install a tracer provider for this process once, with the exporter `OTEL_*` asks for."""
    global _configured
    with _setup_lock:
        if _configured:
            return
        _configured = True
        exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
        resource_attrs = {"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)}
        provider = TracerProvider(resource=Resource.create(resource_attrs))
        if exporter_name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        elif exporter_name == "console":
            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        trace.set_tracer_provider(provider)


def tracer() -> trace.Tracer:
    return trace.get_tracer("vidgen_serve")


def carrier_for_current_span() -> dict[str, str]:
    """The current trace context as a dict to pass along with a deployment call."""
    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier


@contextmanager
def child_span(name: str, carrier: dict[str, str] | None, **attributes: Any) -> Iterator[trace.Span]:
    """A span whose parent is the context in `carrier` (from another process)."""
    token = otel_context.attach(extract(carrier or {}))
    try:
        with tracer().start_as_current_span(name, attributes=attributes) as span:
            yield span
    finally:
        otel_context.detach(token)


def peak_memory_bytes(device_type: str = "cpu") -> int:
    """Peak memory of this process: CUDA allocator peak on GPU, max RSS on CPU."""
    if device_type == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class StageMetrics:
    """Per-stage Prometheus metrics through `ray.serve.metrics` (only inside Ray)."""

    def __init__(self, stage: str):
        from ray.serve import metrics

        self.stage = stage
        self.latency = metrics.Histogram(
            "vidgen_stage_latency_seconds",
            description="Seconds one call of a pipeline stage took.",
            boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600],
            tag_keys=("stage",),
        )
        self.failures = metrics.Counter(
            "vidgen_stage_failures", description="Failed stage calls.", tag_keys=("stage", "reason")
        )
        self.peak_memory = metrics.Gauge(
            "vidgen_stage_peak_memory_bytes", description="Peak memory of a stage replica.", tag_keys=("stage",)
        )
        self.cache = metrics.Counter(
            "vidgen_text_cache", description="Text encoder cache lookups.", tag_keys=("result",)
        )

    def observe(self, seconds: float, device_type: str = "cpu") -> None:
        self.latency.observe(seconds, tags={"stage": self.stage})
        self.peak_memory.set(peak_memory_bytes(device_type), tags={"stage": self.stage})

    def failed(self, reason: str) -> None:
        self.failures.inc(tags={"stage": self.stage, "reason": reason})


@dataclass
class StageTiming:
    """What `stage_call` measured: the span (to add attributes) and the call's seconds."""

    span: Any
    seconds: float = 0.0


@contextmanager
def stage_call(metrics: StageMetrics, carrier: dict[str, str] | None, device_type: str = "cpu",
               **attributes: Any) -> Iterator[StageTiming]:
    """One call of a stage deployment: a child span of the ingress's trace, the latency
    histogram and peak-memory gauge on success, the failure counter (`cancelled` / `error`)
    otherwise. Every stage deployment wraps its work in this, once.
    """
    with child_span(metrics.stage, carrier, **attributes) as span:
        timing = StageTiming(span)
        t0 = time.perf_counter()
        try:
            yield timing
        except (asyncio.CancelledError, GeneratorExit):  # GeneratorExit: a stream the caller closed
            metrics.failed("cancelled")
            raise
        except Exception:
            metrics.failed("error")
            raise
        timing.seconds = time.perf_counter() - t0
    metrics.observe(timing.seconds, device_type)
