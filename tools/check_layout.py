"""Checks that the package's layout stays readable (run in CI by tests/test_layout.py; exit 1 on any finding):

1. no import cycle among minigptq's modules;
2. no module of the package imports another module of the package inside a function (function-local imports are
   for optional dependencies only);
3. no file under minigptq/ over MAX_LINES lines;
4. every repository path cited in a comment, docstring or document (minigptq/..., cuda/..., tools/..., tests/...,
   docs/..., bench/...) exists; `{a,b}` alternatives and `*` globs are expanded, and must match something.

    python tools/check_layout.py [--root DIR]
"""
from __future__ import annotations

import argparse
import ast
import glob
import io
import re
import sys
import tokenize
from pathlib import Path

MAX_LINES = 400
PKG = "minigptq"
# A cited path: starts at one of the repository's top-level folders and not inside a longer path (a path of the
# project's surroundings, ../shared/..., is not read as one of its own), made of path characters, globs and {a,b}.
CITED = re.compile(r"(?<![\w./\-{}*])((?:minigptq|cuda|tools|tests|docs|bench)/[\w./\-{},*]*[\w*}])")
SOURCES = ("*.py", "*.cpp", "*.h", "*.cu", "*.inc", "*.md", "*.txt", "*.toml", "*.sh")
SKIP_DIRS = {".git", ".venv", ".venv-peer", "build", "models", "__pycache__", ".pytest_cache", "node_modules"}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_imports(root: Path, path: Path, tree: ast.Module) -> list[tuple[str, int, bool]]:
    """(imported package module, line, inside a function?) for every import of a minigptq module in the file."""
    me = module_name(root, path)
    pkg = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative: resolve against this module's package
                    base = pkg.split(".")[: len(pkg.split(".")) - (child.level - 1)]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                # `from . import x` may import a submodule x: count it as such when the file exists
                names = [mod] + [f"{mod}.{a.name}" for a in child.names]
            for n in names:
                if n == PKG or n.startswith(PKG + "."):
                    found.append((n, child.lineno, in_function))
            visit(child, inside)
    visit(tree, False)
    return found


def existing_module(root: Path, name: str) -> str | None:
    """The module a dotted name refers to (a file or a package), or None (an attribute such as minigptq.Error)."""
    p = root.joinpath(*name.split("."))
    if p.with_suffix(".py").is_file() or (p / "__init__.py").is_file():
        return name
    return None


def check_imports(root: Path) -> list[str]:
    problems, graph = [], {}
    for path in sorted((root / PKG).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        me = module_name(root, path)
        edges = graph.setdefault(me, set())
        for name, line, in_function in package_imports(root, path, tree):
            mod = existing_module(root, name)
            if mod is None or mod == me:
                continue
            if in_function:
                problems.append(f"{path.relative_to(root)}:{line}: imports {mod} inside a function "
                                f"(imports of the package's own modules belong at the top of the file)")
            # A package's __init__ is imported with any of its submodules: an edge to a package is an edge to its
            # __init__ only, which is the module of that name.
            if mod != PKG and not me.startswith(mod + "."):  # a submodule importing its own package is not a cycle
                edges.add(mod)
    # cycles: depth-first search, reporting each cycle once
    state, stack, cycles = {}, [], set()

    def dfs(u: str) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                cyc = stack[stack.index(v):]
                k = cyc.index(min(cyc))
                cycles.add(tuple(cyc[k:] + cyc[:k]))
            elif v not in state:
                dfs(v)
        stack.pop()
        state[u] = 2
    for u in sorted(graph):
        if u not in state:
            dfs(u)
    problems += [f"import cycle: {' -> '.join(c + (c[0],))}" for c in sorted(cycles)]
    return problems


def check_sizes(root: Path) -> list[str]:
    out = []
    for path in sorted((root / PKG).rglob("*.py")):
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_LINES:
            out.append(f"{path.relative_to(root)}: {n} lines (at most {MAX_LINES})")
    return out


def expand_braces(s: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", s)
    if not m:
        return [s]
    return [x for alt in m.group(1).split(",") for x in expand_braces(s[:m.start()] + alt + s[m.end():])]


def cited_text(path: Path) -> str:
    """What a file says to a reader: the comments and docstrings of Python files, the whole of other files.
    (Other string literals are data: a hub id such as "org/name" or a file-name prefix is not a citation.)"""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix != ".py":
        return text
    parts = [tok.string for tok in tokenize.generate_tokens(io.StringIO(text).readline) if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            parts.append(ast.get_docstring(node, clean=False) or "")
    return "\n".join(parts)


def check_citations(root: Path) -> list[str]:
    out = []
    files = [p for pat in SOURCES for p in root.rglob(pat)
             if not SKIP_DIRS & set(p.relative_to(root).parts[:-1])
             and not any(d.startswith(".venv") for d in p.relative_to(root).parts[:-1])]  # any local venv
    for path in sorted(set(files)):
        for m in CITED.finditer(cited_text(path)):
            cited = m.group(1).rstrip(".,")
            for alt in expand_braces(cited):
                alt = alt.rstrip("/")
                ok = glob.glob(str(root / alt)) if "*" in alt else (root / alt).exists()
                if not ok:
                    out.append(f"{path.relative_to(root)}: cites {alt}, which does not exist")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1],
                   help="repository root (default: the one holding this script)")
    root = p.parse_args(argv).root.resolve()
    problems = check_imports(root) + check_sizes(root) + check_citations(root)
    for line in problems:
        print(line)
    print(f"{len(problems)} finding(s)" if problems else "layout: no findings", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
