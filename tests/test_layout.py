"""The layout checker (tools/check_layout.py) passes on this tree, and finds what it is meant to find."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import ROOT

CHECKER = ROOT / "tools" / "check_layout.py"


def check(root: Path) -> tuple[int, str]:
    r = subprocess.run([sys.executable, str(CHECKER), "--root", str(root)], capture_output=True, text=True)
    return r.returncode, r.stdout


def test_the_repository_passes():
    code, out = check(ROOT)
    assert code == 0, out


def test_each_rule_fails_a_bad_tree(tmp_path):
    pkg = tmp_path / "minigptq"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""See docs/missing.md and cuda/{cpu,gpu}/x.cpp."""\n')
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from . import a  # inside a function\n    return a\n")
    (pkg / "c.py").write_text("from .d import x\n")
    (pkg / "d.py").write_text("from .c import y\n" + "z = 1\n" * 400)
    (tmp_path / "cuda" / "cpu").mkdir(parents=True)
    (tmp_path / "cuda" / "cpu" / "x.cpp").write_text("// see tools/here.py\n")
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "here.py").write_text(textwrap.dedent('''\
        """Cites ../shared/docs/elsewhere.md, which is outside the repository and not checked."""
        HUB_ID = "minigptq/not-a-path"  # a string that is data, not a citation
        '''))
    code, out = check(tmp_path)
    assert code == 1
    assert "minigptq/b.py:2: imports minigptq.a inside a function" in out
    assert "import cycle: minigptq.c -> minigptq.d -> minigptq.c" in out
    assert "minigptq/d.py: 401 lines" in out
    assert "cites docs/missing.md" in out
    assert "cites cuda/gpu/x.cpp" in out and "cites cuda/cpu/x.cpp" not in out
    assert "elsewhere" not in out and "not-a-path" not in out and "tools/here.py, which" not in out
