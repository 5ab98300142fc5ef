"""tcp:// endpoints: one that others can reach needs CurveZMQ (or a setting that says it is
insecure); with it, only clients whose keys are authorized get anything."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from stoker.protocol.client import Client
from stoker.protocol.errors import Unreachable
from stoker.workers.fake_backend import complete as fake_complete
from tests.conftest import FAKE_MODELS, write_config

CLI = [sys.executable, "-m", "stoker.supervisor"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keys(folder: Path, name: str) -> tuple[Path, Path]:
    done = subprocess.run(CLI + ["keys", name, "--dir", str(folder)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    assert public.exists() and secret.exists() and (secret.stat().st_mode & 0o777) == 0o600
    return public, secret


def test_an_exposed_tcp_endpoint_without_keys_is_refused_at_start(short_dir):
    config, _ = write_config(short_dir, FAKE_MODELS, endpoint=f"tcp://0.0.0.0:{free_port()}",
                             state_dir=str(short_dir / "state"))
    done = subprocess.run(CLI + ["serve", "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "allow_insecure_tcp" in done.stderr and "CurveZMQ" in done.stderr and "Traceback" not in done.stderr


def test_only_authorized_keys_get_in_on_an_exposed_tcp_endpoint(start_supervisor, short_dir):
    folder, authorized = short_dir / "keys", short_dir / "authorized"
    authorized.mkdir()
    server_public, server_secret = keys(folder, "server")
    alice_public, alice_secret = keys(folder, "alice")
    mallory_public, mallory_secret = keys(folder, "mallory")  # a valid pair, never authorized
    (authorized / "alice.key").write_bytes(alice_public.read_bytes())
    port = free_port()
    sup = start_supervisor(FAKE_MODELS, endpoint=f"tcp://0.0.0.0:{port}", curve_server_key=str(server_secret),
                           curve_authorized_keys=str(authorized), _wait=False)
    local = f"tcp://127.0.0.1:{port}"

    def gets_in(**kw) -> bool:
        try:
            with Client(local, timeout=1.5, **kw) as c:
                return c.ping(timeout=1.5)["pong"]
        except Unreachable:
            return False

    deadline = time.monotonic() + 30
    while not gets_in(server_key=server_public, client_key=alice_secret):
        assert time.monotonic() < deadline and sup.proc.poll() is None, sup.log()
        time.sleep(0.1)
    with Client(local, timeout=10, server_key=server_public, client_key=alice_secret) as c:
        assert c.complete("hi", max_tokens=4).text == "".join(fake_complete("hi", 0, 4)[0])
    assert not gets_in()  # no key: a plain connection fails its handshake
    assert not gets_in(server_key=mallory_public, client_key=alice_secret)  # the wrong server key
    assert not gets_in(server_key=server_public, client_key=mallory_secret)  # a key nobody authorized
    # Nothing at all comes back to a raw plain socket either, not even an error.
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(local)
    raw.send(msgpack.packb({"v": 1, "op": "status", "id": 1}))
    assert not raw.poll(1500)
    raw.close()
    assert "refused a client whose key" in sup.log()
    # Authorizing a key takes effect at its next connection, without a restart.
    (authorized / "mallory.key").write_bytes(mallory_public.read_bytes())
    assert gets_in(server_key=server_public, client_key=mallory_secret)
    # The CLI takes the keys by option (and by STOKER_SERVER_KEY / STOKER_CLIENT_KEY).
    run = subprocess.run(CLI + ["run", "hi", "-n", "4", "--no-start", "-e", local, "--server-key", str(server_public),
                                "--client-key", str(alice_secret)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "".join(fake_complete("hi", 0, 4)[0]).strip(), run.stderr
    bare = subprocess.run(CLI + ["run", "hi", "--no-start", "-e", local, "--timeout", "2"], capture_output=True,
                          text=True, timeout=60)
    assert bare.returncode == 2


def test_a_loopback_tcp_endpoint_without_keys_works_with_a_warning(start_supervisor):
    port = free_port()
    sup = start_supervisor(FAKE_MODELS, endpoint=f"tcp://127.0.0.1:{port}", _wait=False)
    deadline = time.monotonic() + 30
    while True:
        try:
            with Client(f"tcp://127.0.0.1:{port}", timeout=10) as c:
                assert c.complete("hi", max_tokens=3).text == "".join(fake_complete("hi", 0, 3)[0])
            break
        except Unreachable:
            assert time.monotonic() < deadline and sup.proc.poll() is None, sup.log()
    assert "has no authentication" in sup.log()


@pytest.mark.parametrize("endpoint", ["tcp://0.0.0.0:1", "tcp://*:1", "tcp://eth0:1", "tcp://10.1.2.3:1",
                                      "tcp://[::]:1", "tcp://example.com:1"])
def test_endpoints_off_this_machine_are_not_loopback(endpoint):
    from stoker.protocol.endpoint import is_loopback

    assert not is_loopback(endpoint)
    assert is_loopback("tcp://127.0.0.1:1") and is_loopback("tcp://[::1]:1") and is_loopback("tcp://localhost:1")
