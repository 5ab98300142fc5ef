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
