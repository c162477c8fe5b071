"""The dependency rule: the pure packages never pull in an engine."""

import subprocess
import sys

import pytest

HEAVY = ("vllm", "deepspeed", "ray")


@pytest.mark.parametrize("package", ["algorithms", "buffer", "rewards"])
def test_pure_package_imports_no_engine(package):
    code = (
        "import sys, pkgutil, importlib\n"
        f"import {package}\n"
        f"for m in pkgutil.walk_packages({package}.__path__, '{package}.'):\n"
        "    importlib.import_module(m.name)\n"
        f"print(sorted(k for k in sys.modules if k.split('.')[0] in {HEAVY!r}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_all_five_packages_import():
    out = subprocess.run([sys.executable, "-c", "import rollout, trainer, algorithms, buffer, rewards"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
