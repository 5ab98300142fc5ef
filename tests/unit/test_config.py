import pytest

from stoker.supervisor.config import ConfigError, resolve_config


def write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_defaults_without_a_file(tmp_path):
    cfg = resolve_config(environ={"HOME": str(tmp_path), "XDG_RUNTIME_DIR": "/run/user/7"})
    assert cfg.supervisor.endpoint == "ipc:///run/user/7/stoker/stoker.sock"
    assert cfg.supervisor.idle_timeout == 300 and cfg.supervisor.max_queue == 256
    assert cfg.supervisor.default_model == "gemma-3-270m"


def test_default_endpoint_without_runtime_dir(tmp_path):
    import os

    cfg = resolve_config(environ={"HOME": str(tmp_path)})
    assert cfg.supervisor.endpoint == f"ipc:///tmp/stoker-{os.getuid()}/stoker.sock"


def test_file_then_env_then_flags(tmp_path):
    p = write(tmp_path, '[supervisor]\nidle_timeout = 30\nmax_queue = 8\n[models.echo]\nbackend = "fake"\n')
    env = {"HOME": str(tmp_path), "STOKER_IDLE_TIMEOUT": "12", "STOKER_ENDPOINT": "tcp://127.0.0.1:5555"}
    cfg = resolve_config(p, env, overrides={"endpoint": "ipc:///tmp/x.sock", "max_queue": None})
    assert cfg.supervisor.idle_timeout == 12.0
    assert cfg.supervisor.max_queue == 8
    assert cfg.supervisor.endpoint == "ipc:///tmp/x.sock"
    assert cfg.models["echo"].backend == "fake"


def test_models_dir_adds_every_gguf(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "tiny-llama.gguf").write_bytes(b"x")
    (tmp_path / "m" / "notes.txt").write_text("x")
    p = write(tmp_path, f'[supervisor]\nmodels_dir = "{tmp_path / "m"}"\n')
    cfg = resolve_config(p, {"HOME": str(tmp_path)})
    assert cfg.models["tiny-llama"].path == str(tmp_path / "m" / "tiny-llama.gguf")
    assert "notes" not in cfg.models


@pytest.mark.parametrize("text, fragment", [
    ("[supervisor]\nidle_timout = 3\n", "idle_timout"),
    ("[supervisor]\nidle_timeout = \"soon\"\n", "idle_timeout"),
    ("[supervisor]\nmax_queue = 0\n", "max_queue"),
    ("[supervisor]\nmax_queue = 1.5\n", "whole number"),
    ("[supervisor]\nendpoint = \"http://x\"\n", "endpoint"),
    ("[models.x]\nbackend = \"llama\"\n", "path"),
    ("[models.x]\nbackend = \"gpt\"\n", "backend"),
    ("[models.x]\nbackend = \"fake\"\ndemo = true\n", "demo"),
    ("[models.x]\nbackend = \"fake\"\nparallel = 0\n", "parallel must be from 1 to 64"),
    ("[models.x]\nbackend = \"fake\"\nparallel = 65\n", "parallel must be from 1 to 64"),
    ("[models.x]\nbackend = \"fake\"\nprefix_cache = -1\n", "prefix_cache"),
    ("[models.x]\nbackend = \"fake\"\nbatch_cost = -0.5\n", "batch_cost"),
    ("[server]\n", "unknown section"),
    ("not toml [", "TOML"),
])
def test_bad_configuration_is_a_clear_error(tmp_path, text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        resolve_config(write(tmp_path, text), {"HOME": str(tmp_path)})


def test_env_value_of_the_wrong_type(tmp_path):
    with pytest.raises(ConfigError, match="STOKER|idle_timeout"):
        resolve_config(None, {"HOME": str(tmp_path), "STOKER_IDLE_TIMEOUT": "soon"})


def test_explicit_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config(tmp_path / "nope.toml", {"HOME": str(tmp_path)})


# Every STOKER_* variable the README names for the supervisor: a value, and what it must become.
_ENV_CASES = {
    "STOKER_ENDPOINT": ("ipc:///tmp/stk-env/s.sock", "endpoint", "ipc:///tmp/stk-env/s.sock"),
    "STOKER_IDLE_TIMEOUT": ("12.5", "idle_timeout", 12.5),
    "STOKER_MAX_QUEUE": ("7", "max_queue", 7),
    "STOKER_DEFAULT_MODEL": ("other", "default_model", "other"),
    "STOKER_RAM_BUDGET": ("1GiB", "ram_budget", 1024**3),
    "STOKER_VRAM_BUDGET": ("0", "vram_budget", 0),
    "STOKER_SOCKET_MODE": ("0o660", "socket_mode", 0o660),
    "STOKER_LOG_LEVEL": ("DEBUG", "log_level", "DEBUG"),
    "STOKER_METRICS": ("127.0.0.1:9999", "metrics", "127.0.0.1:9999"),
    "STOKER_STALL_TIMEOUT": ("99", "stall_timeout", 99.0),
    "STOKER_MAX_CLIENTS": ("50", "max_clients", 50),
}


@pytest.mark.parametrize("var", sorted(_ENV_CASES))
def test_each_stoker_variable_sets_its_key_over_the_file(tmp_path, var):
    value, key, expected = _ENV_CASES[var]
    path = tmp_path / "c.toml"
    path.write_text('[supervisor]\nmax_queue = 3\nidle_timeout = 1\nlog_level = "INFO"\n\n[models.other]\nbackend = "fake"\n')
    cfg = resolve_config(path, environ={"HOME": str(tmp_path), var: value})
    assert getattr(cfg.supervisor, key) == expected
    assert cfg.sources[f"supervisor.{key}"] == f"env {var}"


def test_folder_variables_set_the_folders(tmp_path):
    env = {"HOME": str(tmp_path), "STOKER_MODELS_DIR": str(tmp_path / "models"),
           "STOKER_STATE_DIR": str(tmp_path / "state")}
    (tmp_path / "models").mkdir()
    cfg = resolve_config(environ=env)
    assert cfg.supervisor.models_dir == str(tmp_path / "models")
    assert cfg.supervisor.state_dir == str(tmp_path / "state")
    assert cfg.sources["supervisor.state_dir"] == "env STOKER_STATE_DIR"


def test_the_readme_names_only_variables_that_exist():
    import re
    from pathlib import Path

    from stoker.supervisor.config import _ENV_KEYS

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    named = set(re.findall(r"STOKER_[A-Z_]+[A-Z]", readme))
    client_side = {"STOKER_CONFIG", "STOKER_SERVER_KEY", "STOKER_CLIENT_KEY"}
    assert named - client_side <= set(_ENV_KEYS), named - client_side - set(_ENV_KEYS)
    assert set(_ENV_KEYS) <= named  # and every one is documented
