"""The installed package imports only its runtime dependencies (never the test extras)."""

from __future__ import annotations

import subprocess
import sys

# (jsonschema is not listed: Ray itself depends on it.)
TEST_ONLY = ("httpx", "pytest", "av", "moto", "locust")


def test_package_modules_import_no_test_extras():
    code = (
        "import importlib, pkgutil, sys, vidgen_serve\n"
        "for m in pkgutil.walk_packages(vidgen_serve.__path__, 'vidgen_serve.'):\n"
        "    importlib.import_module(m.name)\n"
        f"print(','.join(sorted(n for n in {TEST_ONLY!r} if n in sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1:] in ([""], []), f"test extras imported: {result.stdout}"
