"""The README's Python example runs as it is written."""

from __future__ import annotations

import re

from conftest import REPO


def test_the_readme_example_runs() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## From Python", 1)[1]
    example = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert example is not None, "no python example under 'From Python'"
    exec(compile(example.group(1), "README.md", "exec"), {})
