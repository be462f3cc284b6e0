"""The README's Python block runs as it is."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_block_runs(capsys, recwarn) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python block"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "readme"})
    assert "rounds: 2" in capsys.readouterr().out
    assert not [w for w in recwarn if "graft" in str(w.message)], [str(w.message) for w in recwarn]
