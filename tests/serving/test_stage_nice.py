"""`stage_nice`: a stage replica makes every thread of its process nicer (in a child process: a
niceness cannot be lowered again without privileges)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CHILD = r"""
import json, os, threading, types
from vidgen_serve.serving.stages import lower_cpu_priority
started, stop = threading.Event(), threading.Event()
def idle():
    started.set(); stop.wait()
t = threading.Thread(target=idle, daemon=True); t.start(); started.wait()  # a thread that exists before
before = os.getpriority(os.PRIO_PROCESS, 0)
applied = lower_cpu_priority(types.SimpleNamespace(stage_nice=int(os.environ["STAGE_NICE"])))
late = {}
t2 = threading.Thread(target=lambda: late.update(n=os.getpriority(os.PRIO_PROCESS, 0))); t2.start(); t2.join()
def nice_of(tid):
    try:
        return os.getpriority(os.PRIO_PROCESS, int(tid))
    except ProcessLookupError:  # a thread that has just ended (t2 lingers in /proc a moment after join)
        return None
nices = sorted({n for n in map(nice_of, os.listdir("/proc/self/task")) if n is not None})
print(json.dumps({"before": before, "applied": applied, "threads": nices, "new_thread": late["n"]}))
stop.set()
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="Linux: niceness per thread")
@pytest.mark.parametrize("stage_nice", [0, 3])
def test_every_thread_of_a_stage_process_gets_nicer(stage_nice):
    env = {**os.environ, "STAGE_NICE": str(stage_nice)}
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120,
                         check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    expected = min(19, result["before"] + stage_nice)
    assert result["threads"] == [expected] and result["new_thread"] == expected
    assert result["applied"] == (expected if stage_nice else 0)
