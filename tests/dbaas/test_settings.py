"""Settings declared once (dbaas.settings): the options, load(env) and the README table."""

import stat
import sys
import threading
from pathlib import Path

import pytest

from dbaas import settings
from dbaas.settings import OPTIONS, SettingError

NUMERIC = [option for option in OPTIONS if option.type in (int, float)]


def load(tmp_path, **env):
    return settings.load({"DBAAS_VAR_DIR": str(tmp_path / "var"), **env})


# --- the declarations ----------------------------------------------------------------------

@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_every_option_has_env_type_and_help(option):
    assert option.env.startswith("DBAAS_") and option.env == option.env.upper()
    assert option.type in (str, int, float, bool)
    assert isinstance(option.help, str) and option.help.strip()
    assert option.used_by.strip()
    assert callable(option.default) or isinstance(option.default, str)


def test_booleans_and_choices(tmp_path):
    assert load(tmp_path, DBAAS_REQUIRE_GUEST_USER_ID="false").require_guest_user_id is False
    assert load(tmp_path, DBAAS_REQUIRE_GUEST_USER_ID="YES").require_guest_user_id is True
    with pytest.raises(SettingError, match="DBAAS_REQUIRE_GUEST_USER_ID.*true or false"):
        load(tmp_path, DBAAS_REQUIRE_GUEST_USER_ID="maybe")
    assert load(tmp_path, DBAAS_QUEUE_TYPE="quorum").queue_type == "quorum"
    with pytest.raises(SettingError, match="DBAAS_QUEUE_TYPE.*classic, quorum"):
        load(tmp_path, DBAAS_QUEUE_TYPE="lazy")


def test_names_and_variables_are_unique_and_make_the_settings():
    assert len({o.name for o in OPTIONS}) == len({o.env for o in OPTIONS}) == len(OPTIONS)
    assert tuple(settings.Settings.__dataclass_fields__) == tuple(o.name for o in OPTIONS)


def test_defaults_load_as_their_declared_types(tmp_path):
    config = load(tmp_path)
    for option in OPTIONS:
        assert type(getattr(config, option.name)) is option.type, option.name


# --- load(env) -----------------------------------------------------------------------------

def test_load_types_values(tmp_path):
    config = load(tmp_path, DBAAS_HEARTBEAT_BATCH_SIZE="17", DBAAS_CALL_TIMEOUT="2.5",
                  DBAAS_MAX_MESSAGE_BYTES="1024", DBAAS_USAGE_TIMEOUT="60",
                  DBAAS_CONDUCTOR_QUEUE="q1", DBAAS_SERVICE_KEY="k")
    assert (config.heartbeat_batch_size, config.call_timeout, config.max_message_bytes) == (17, 2.5, 1024)
    assert type(config.heartbeat_batch_size) is int and type(config.max_message_bytes) is int
    assert type(config.usage_timeout) is float and config.usage_timeout == 60.0
    assert (config.conductor_queue, config.service_key) == ("q1", "k")


def test_unset_or_empty_variable_takes_the_default(tmp_path):
    assert load(tmp_path, DBAAS_CALL_TIMEOUT="").call_timeout == 10.0
    assert load(tmp_path).heartbeat_batch_size == 200


def test_load_reads_only_the_mapping_it_is_given(tmp_path, monkeypatch):
    monkeypatch.setenv("DBAAS_CALL_TIMEOUT", "99")
    monkeypatch.setenv("DBAAS_VAR_DIR", str(tmp_path / "from-environment"))
    monkeypatch.setenv("DBAAS_SERVICE_KEY", "k")
    assert load(tmp_path).call_timeout == 10.0
    assert settings.load().call_timeout == 99.0  # None: the process environment


def test_computed_defaults_follow_var_dir(tmp_path):
    config = load(tmp_path)
    var = Path(config.var_dir)
    assert var == (tmp_path / "var").resolve() and var.is_dir()
    assert config.database_url == f"sqlite:///{var / 'dbaas.sqlite3'}"
    assert str(var / "broker") in config.broker_url
    assert config.guest_command.startswith(sys.executable)
    explicit = load(tmp_path, DBAAS_DATABASE_URL="postgresql://db/x")
    assert explicit.database_url == "postgresql://db/x"


@pytest.mark.parametrize("option", NUMERIC, ids=lambda o: o.env)
@pytest.mark.parametrize("text", ["abc", "12 seconds", "1,5", "0x10", "0", "-1", "nan", "inf"])
def test_a_bad_number_is_a_setting_error_naming_the_variable(tmp_path, option, text):
    with pytest.raises(SettingError, match=option.env) as info:
        load(tmp_path, **{option.env: text})
    assert repr(text) in str(info.value)


@pytest.mark.parametrize("option", [o for o in NUMERIC if o.type is int], ids=lambda o: o.env)
def test_a_fraction_for_an_integer_is_a_setting_error(tmp_path, option):
    with pytest.raises(SettingError, match=f"{option.env}.*integer"):
        load(tmp_path, **{option.env: "1.5"})


def test_setting_error_is_a_value_error():
    assert issubclass(SettingError, ValueError)


# --- the README's table --------------------------------------------------------------------

def test_markdown_table_lists_every_variable_once():
    table = settings.markdown_table()
    lines = table.splitlines()
    assert lines[0].startswith("| variable |") and set(lines[1]) <= {"|", "-"}
    rows = lines[2:]
    assert len(rows) == len(OPTIONS)
    for option, row in zip(OPTIONS, rows):
        assert row.startswith(f"| `{option.env}` |") and row.endswith("|")
        assert option.help in row and option.used_by in row
        assert row.count(" | ") == 3, row  # four columns: no help text breaks the table
    for option in OPTIONS:
        assert table.count(f"`{option.env}`") == 1


def test_markdown_table_shows_plain_defaults_and_texts_for_computed_ones():
    table = settings.markdown_table()
    for option in OPTIONS:
        shown = option.default_text or f"`{option.default}`"
        assert f"| `{option.env}` | {shown} |" in table
        if callable(option.default):
            assert option.default_text, f"{option.env}: a computed default needs a text"


# --- the generated service key (embedded setup, no DBAAS_SERVICE_KEY) ----------------------

def load_key(var_dir) -> str | Exception:
    try:
        return settings.load({"DBAAS_VAR_DIR": str(var_dir)}).service_key
    except Exception as exc:  # refusing to start is an acceptable answer, an empty key is not
        return exc


def test_generated_service_key_is_private_and_stable(tmp_path):
    key = load_key(tmp_path)
    assert isinstance(key, str) and len(key) == 64
    assert stat.S_IMODE((tmp_path / "service.key").stat().st_mode) == 0o600
    assert load_key(tmp_path) == key
    assert settings.load({"DBAAS_VAR_DIR": str(tmp_path), "DBAAS_SERVICE_KEY": "configured"}).service_key == "configured"


def test_a_key_file_still_being_written_is_never_an_empty_key(tmp_path):
    (tmp_path / "service.key").write_text("")  # what a reader sees between O_EXCL create and write
    assert load_key(tmp_path) != ""


def test_processes_starting_together_agree_on_one_service_key(tmp_path):
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # make the threads interleave as separate processes would
    try:
        for attempt in range(30):
            var_dir = tmp_path / str(attempt)
            barrier, keys = threading.Barrier(8), []

            def start():
                barrier.wait(timeout=10)
                keys.append(load_key(var_dir))
            threads = [threading.Thread(target=start) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=30)
            assert len(set(map(repr, keys))) == 1 and isinstance(keys[0], str) and keys[0], keys
    finally:
        sys.setswitchinterval(interval)
