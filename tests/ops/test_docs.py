"""The operator docs agree with the code: the configuration reference is what the parser
renders, every environment variable the code reads is documented, the metrics tables are
the registered metrics, every `loractl` command shown parses, every link resolves."""

from __future__ import annotations

import ast
import difflib
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

from docs.reference import COMMAND, ENVIRONMENT, OUTPUT, render
from loractl.cli import build_parser
from tests.ops.exposed_metrics import SUFFIXES, families
from tests.ops.schemas import ROOT

DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
WRITTEN = [page for page in PAGES if page != OUTPUT]
"""Pages people write; the generated one is checked whole."""
CODE = ("loractl", "sidecar", "controller", "simulator")
METRIC_SECTIONS = {"## Sidecar metrics": "sidecar", "## Controller metrics": "controller"}


def test_the_configuration_reference_is_current() -> None:
    expected = render()
    if OUTPUT.read_text() != expected:
        diff = difflib.unified_diff(
            OUTPUT.read_text().splitlines(),
            expected.splitlines(),
            "committed",
            "rendered",
            lineterm="",
        )
        pytest.fail(
            f"docs/{OUTPUT.name} is out of date with the loractl command line: run `{COMMAND}` "
            "from the repository root and commit the result.\n" + "\n".join(list(diff)[:40])
        )


def _environment_reads() -> set[str]:
    """Names the code passes to os.environ.get / os.getenv / os.environ[...], and module
    constants named *_ENV (an environment variable's name kept for such a call)."""
    names: set[str] = set()
    for package in CODE:
        for path in (ROOT / package).rglob("*.py"):
            tree = ast.parse(path.read_text())
            constants = {
                target.id: node.value.value
                for node in tree.body
                if isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
                for target in node.targets
                if isinstance(target, ast.Name)
            }
            names |= {value for name, value in constants.items() if name.endswith("_ENV")}
            for node in ast.walk(tree):
                key = _environ_key(node)
                if isinstance(key, ast.Constant) and isinstance(key.value, str):
                    names.add(key.value)
                elif isinstance(key, ast.Name) and key.id in constants:
                    names.add(constants[key.id])
    return names


def _environ_key(node: ast.AST) -> ast.expr | None:
    if isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
        return node.slice
    if (
        isinstance(node, ast.Call)
        and ast.unparse(node.func) in ("os.environ.get", "os.getenv")
        and node.args
    ):
        return node.args[0]
    return None


def test_every_environment_variable_the_code_reads_is_documented() -> None:
    reads = _environment_reads()
    assert {"VLLM_API_KEY", "HF_TOKEN", "KUBECONFIG"} <= reads, "the scan finds nothing"
    documented = set(re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \|", OUTPUT.read_text(), re.M))
    missing = reads - documented
    assert not missing, (
        f"read by the code, not in docs/{OUTPUT.name}: {sorted(missing)}; say `(env NAME)` in "
        f"the flag's help, or add it to ENVIRONMENT in docs/reference.py, then run `{COMMAND}`"
    )
    stale = {e.name for e in ENVIRONMENT if e.by_loractl} - reads
    assert not stale, f"ENVIRONMENT in docs/reference.py lists what no code reads: {stale}"


def _metric_rows() -> Iterator[tuple[str, str, str]]:
    """(process, metric as queried, type) of each row of the metrics tables."""
    process = None
    for line in (DOCS / "metrics.md").read_text().splitlines():
        if line.startswith("## "):
            process = METRIC_SECTIONS.get(line)
        elif process and (row := re.match(r"\| `([a-z_:]+)` \| (\w+) \|", line)):
            yield process, row.group(1), row.group(2)


def test_the_metrics_reference_lists_exactly_what_the_code_registers() -> None:
    documented = {}
    for process, name, kind in _metric_rows():
        suffix = SUFFIXES[kind][0] if kind == "counter" else ""
        assert name.endswith(suffix), f"{name}: a counter is queried with its {suffix}"
        documented[name.removesuffix(suffix)] = (kind, process)
    assert documented == families()


def _fenced_commands(page: Path) -> Iterator[str]:
    """`loractl ...` lines of the page's code blocks, continuation lines joined."""
    in_block, pending = False, ""
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_block = not in_block
            continue
        if not in_block:
            continue
        pending += line.rstrip().removesuffix("\\")
        if line.rstrip().endswith("\\"):
            continue
        command, pending = pending.strip(), ""
        if command.startswith("loractl "):
            yield command


COMMANDS = [(page.name, command) for page in WRITTEN for command in _fenced_commands(page)]


def test_the_docs_show_loractl_commands() -> None:
    assert len(COMMANDS) >= 5


@pytest.mark.parametrize(("page", "command"), COMMANDS)
def test_every_loractl_command_in_the_docs_parses(page: str, command: str) -> None:
    try:
        build_parser().parse_args(shlex.split(command)[1:])
    except SystemExit as error:
        pytest.fail(f"{page}: `{command}` is not a valid loractl command line ({error})")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {
        _slug(line.lstrip("#")) for line in page.read_text().splitlines() if line.startswith("#")
    }


@pytest.mark.parametrize("page", [*PAGES, ROOT / "README.md"], ids=lambda p: p.name)
def test_links_and_repository_paths_resolve(page: Path) -> None:
    text = page.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: link to {target}: no such file"
        if anchor:
            assert anchor in _anchors(resolved), f"{page.name}: link to {target}: no such heading"
    for path in re.findall(r"`((?:manifests|docs|tests)/[\w./-]+)`", text):
        assert (ROOT / path).exists(), f"{page.name}: {path} does not exist"


def test_the_readme_links_the_docs() -> None:
    assert "](docs/README.md)" in (ROOT / "README.md").read_text()
