"""The README's quickstart prints exactly the output shown under it."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def test_quickstart_runs_as_printed(capsys):
    code, expected = re.search(r"```python\n(.*?)```\n.*?```text\n(.*?)```", README.read_text(), re.S).groups()
    exec(compile(code, str(README), "exec"), {"__name__": "quickstart"})
    assert capsys.readouterr().out == expected
