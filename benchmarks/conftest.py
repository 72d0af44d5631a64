"""Benchmarks run on demand (`pytest benchmarks/`), never in the default test run.

Benchmark modules are named bench_*.py so the default `test_*.py` pattern skips them even if
someone points pytest at the whole tree; this hook collects them here.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if parent.session.isinitpath(file_path):
        return None  # named on the command line: pytest collects it already
    return pytest.Module.from_parent(parent, path=file_path)
