"""The package's structure, measured from its own source: layers that point one way (no import cycle between its
files, counting function-local imports), few function-local imports, a CLI that loads torch only for commands that
need a model, and the linter's rules held."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "evalkit"
MAX_FUNCTION_LOCAL_IMPORTS = 40


def _modules() -> dict[Path, str]:
    return {p: ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__") for p in PKG.rglob("*.py")}


def _import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """Each module's evalkit imports (anywhere in the file), and where the function-local imports are."""
    files = _modules()
    names = set(files.values())

    def resolve(name: str) -> str | None:
        while name and name not in names:
            name = name.rpartition(".")[0]
        return name or None

    graph, local = {m: set() for m in names}, []
    for path, mod in files.items():
        tree = ast.parse(path.read_text("utf-8"))
        inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            if id(node) in inner:
                local.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            for t in targets:
                r = resolve(t)
                if r and r not in (mod, "evalkit"):
                    graph[mod].add(r)
    return graph, local


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a path that returns to its start), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = 2
        stack.pop()
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_no_import_cycle_between_the_package_files():
    graph, _ = _import_graph()
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_function_local_imports_stay_few():
    _, local = _import_graph()
    assert len(local) <= MAX_FUNCTION_LOCAL_IMPORTS, "\n".join(local)


@pytest.mark.parametrize("argv", [["--help"], ["data", "show", "tldr", "-n", "1"], ["study", "--help"]])
def test_commands_without_a_model_do_not_load_torch(argv):
    code = ("import sys\nfrom evalkit.cli import cli\ntry:\n    cli.main(args=%r, standalone_mode=False)\nexcept SystemExit:\n    pass\n"
            "print('TORCH', 'torch' in sys.modules)" % (argv,))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "TORCH False" in out.stdout, out.stdout[-500:]


def test_import_evalkit_is_light_until_a_model_is_needed():
    code = "import sys, evalkit\nassert 'torch' not in sys.modules\nevalkit.Decoding\nassert 'torch' not in sys.modules\nevalkit.generate\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


@pytest.mark.skipif(shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").is_file(), reason="ruff is not installed")
def test_the_package_holds_to_its_linter_rules():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    out = subprocess.run([ruff, "check", "evalkit"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:]


def test_the_spec_reference_page_is_made_from_the_config_dataclasses():
    from evalkit.config import spec_reference

    page = (ROOT / "docs/study-spec.md").read_text("utf-8")
    assert page == spec_reference(), "docs/study-spec.md is stale: run `python -m evalkit.config > docs/study-spec.md`"
    for key in ("| `n_items` |", "| `simulate` |", "## [[train]]", "## [report]"):
        assert key in page
