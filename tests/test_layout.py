"""The package's layering, read from its source: which folder may import what.

These rules are what lets a person change one layer without reading the others: the handlers and
the logic never see Kafka, the logic never sees Redis or metrics, and a broker's quirks live in its
own profile. A new import that breaks one fails here with the file and the line.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "services" / "datacreator"


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


def _offenders(folder: Path, banned: tuple[str, ...], skip: tuple[str, ...] = ()) -> list[str]:
    found = []
    for path in sorted(folder.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith(skip):
            continue
        for line, module in _imports(path):
            if module.split(".")[0] in banned or module in banned:
                found.append(f"{rel}:{line} imports {module}")
    return found


def test_only_the_bus_package_imports_the_kafka_client() -> None:
    # The embedded broker, too, asks the broker it starts whether it is up through bus.admin.probe.
    assert _offenders(PACKAGE, ("aiokafka",), skip=("bus/",)) == []


def test_logic_is_pure() -> None:
    banned = ("aiokafka", "redis", "prometheus_client", "httpx", "torch", "sentence_transformers", "datacreator.metrics")
    assert _offenders(PACKAGE / "logic", banned) == []


def test_handlers_go_through_the_runtime_not_the_client() -> None:
    assert _offenders(PACKAGE / "handlers", ("aiokafka", "datacreator.bus.factory")) == []


def _files_with(text: str) -> list[str]:
    return sorted(
        path.relative_to(ROOT).as_posix()
        for folder in (PACKAGE, ROOT / "tests", ROOT / "benchmarks")
        for path in folder.rglob("*.py")
        if text in path.read_text() and path != Path(__file__).resolve()
    )


def test_the_embedded_brokers_quirk_is_named_in_its_profile_only() -> None:
    # The profile says it; the bus module that works around it is the only one that reads it.
    assert _files_with('"short_list_offsets"') == ["services/datacreator/bus/ends.py", "services/datacreator/embedded/broker.py"]
    # The flag that once forced single-record batches at every call site is gone.
    assert _files_with("single_record_batches") == []


def test_nothing_edits_the_import_path() -> None:
    edits = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for folder in (PACKAGE, ROOT / "benchmarks")
        for path in folder.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr in {"insert", "append"}
        and isinstance(node.value, ast.Attribute) and node.value.attr == "path"
        and isinstance(node.value.value, ast.Name) and node.value.value.id == "sys"
    ]
    assert edits == []


def test_benchmarks_run_as_a_package_from_a_clone() -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usefulness" in done.stdout
