"""The README says what the system does: its settings table is the generated one."""

import re

from dbaas import settings
from tests.support.services import ROOT


def test_the_settings_table_is_the_generated_one():
    readme = (ROOT / "README.md").read_text()
    table = re.search(r"<!-- settings:start -->\n(.*?)\n<!-- settings:end -->", readme, re.S)
    assert table, "the README has no generated settings table"
    assert table.group(1) == settings.markdown_table(), "run: python manage.py settings"


def test_commands_in_the_readme_run_python_from_the_virtualenv():
    """scripts/run installs everything into .venv: a bare `python` lacks the packages (or
    does not exist). `manage.py …` alone is the README's short form, said so above it."""
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    commands = [line.strip() for block in blocks for line in block.splitlines()]
    assert commands
    assert [c for c in commands if re.match(r"(python3?|pip) ", c)] == []
