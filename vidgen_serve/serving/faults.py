"""Fault injection for drills and tests, applied live through a deployment's `user_config`.

The Denoiser, DenoiserStandby and Decoder deployments accept
``user_config: {fault_injection: {...}}`` (see `FaultInjection`); Ray Serve's
`reconfigure` applies it without restarting the replica, as a `serve deploy` of an edited
`serve_config.yaml` does. Everything is off by default.

`hold_at_gate` names a `FaultGate` actor: every call of the stage waits at the gate
while it is closed. A drill (or a test) holds work deterministically that way, e.g. to
kill a decoder replica while decodes are certainly in it, instead of guessing how long
a decode takes.
"""

from __future__ import annotations

import asyncio
import random

from pydantic import BaseModel, ConfigDict, Field

from ..errors import VidgenError

#: Ray namespace of `FaultGate` actors.
GATE_NAMESPACE = "vidgen-faults"


class FaultInjection(BaseModel):
    """Drill settings of one stage deployment (its `user_config.fault_injection`)."""

    model_config = ConfigDict(extra="forbid")

    extra_latency_s: float = Field(0.0, ge=0, le=600, description="Seconds added to every call.")
    error_rate: float = Field(0.0, ge=0, le=1, description="Fraction of calls that fail (503).")
    hold_at_gate: str | None = Field(
        None, min_length=1, max_length=128,
        description=f"Name of a FaultGate actor (namespace {GATE_NAMESPACE!r}); every call waits at it while "
        "it is closed.",
    )


async def inject_faults(faults: FaultInjection, stage: str) -> None:
    """Apply `faults` before a stage call: wait at the gate, add latency, maybe fail.

    Raises:
        VidgenError: 503 ``injected_fault`` for the calls `error_rate` picks.
    """
    if faults.hold_at_gate is not None:
        import ray

        gate = await asyncio.to_thread(ray.get_actor, faults.hold_at_gate, namespace=GATE_NAMESPACE)
        await gate.wait.remote()
    if faults.extra_latency_s:
        await asyncio.sleep(faults.extra_latency_s)
    if faults.error_rate and random.random() < faults.error_rate:
        raise VidgenError(503, f"injected fault in the {stage}", code="injected_fault")


class FaultGate:
    """A gate that holds stage calls while closed (run it as a named Ray actor).

    Start one with `start_gate`; name it in a stage's ``fault_injection.hold_at_gate``.

    Args:
        closed: whether calls are held from the start.
    """

    def __init__(self, closed: bool = False) -> None:
        self._open = asyncio.Event()
        if not closed:
            self._open.set()
        self._arrived = 0
        self._waiting = 0

    async def wait(self) -> None:
        """Called by a stage before its work: returns at once while open, else when opened."""
        self._arrived += 1
        self._waiting += 1
        try:
            await self._open.wait()
        finally:
            self._waiting -= 1

    async def close(self) -> None:
        """Hold the calls that arrive from now on."""
        self._open.clear()

    async def open(self) -> None:
        """Release the held calls and let new ones pass."""
        self._open.set()

    async def state(self) -> dict[str, int | bool]:
        """``{"open", "arrived", "waiting"}``: calls seen in all, calls held right now."""
        return {"open": self._open.is_set(), "arrived": self._arrived, "waiting": self._waiting}


def start_gate(name: str, closed: bool = False):
    """Start a `FaultGate` actor called `name` (owned by the caller: it ends with the caller's job)."""
    import ray

    return ray.remote(FaultGate).options(name=name, namespace=GATE_NAMESPACE, num_cpus=0).remote(closed)
