"""The ```python blocks of the README and of each docs/*.md page run as written.

The blocks of one page run in order in one namespace (a page builds on its earlier blocks, as a
reader does), in a scratch directory. A block starting with ``>>>`` is checked as a doctest, printed
output included. ``pycon``/``text``/``bash`` blocks are illustrations and are not run here (the CLI
commands are exercised by their own tests).
"""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


@pytest.mark.parametrize("doc", [d for d in DOCS if BLOCK.search(d.read_text())], ids=lambda d: d.name)
def test_doc_blocks_run(doc, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__doc_example__"}
    for i, match in enumerate(BLOCK.finditer(doc.read_text())):
        code = match.group(1)
        if code.lstrip().startswith(">>>"):
            test = doctest.DocTestParser().get_doctest(code, namespace, f"{doc.name}[{i}]", None, 0)
            runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
            runner.run(test, out=print, clear_globs=False)
            assert runner.failures == 0, f"block {i} of {doc.name}:\n{capsys.readouterr().out}"
        else:
            exec(compile(code, f"{doc.name}[block {i}]", "exec"), namespace)
