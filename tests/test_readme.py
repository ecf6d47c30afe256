"""The README says what the system does: its settings table is the generated one."""

import re

from dbaas import settings
from tests.support.services import ROOT


def test_the_settings_table_is_the_generated_one():
    readme = (ROOT / "README.md").read_text()
    table = re.search(r"<!-- settings:start -->\n(.*?)\n<!-- settings:end -->", readme, re.S)
    assert table, "the README has no generated settings table"
    assert table.group(1) == settings.markdown_table(), "run: python manage.py settings"
