"""The authorized-keys folder (CurveZMQ's ZAP check): what is in it now is what gets in."""

import os

from stoker.protocol.curve_keys import create_key_pair, load_public
from stoker.supervisor.curve import AuthorizedKeys


def test_a_key_file_rewritten_in_place_takes_effect_at_the_next_connection(tmp_path):
    keys, authorized = tmp_path / "keys", tmp_path / "authorized"
    authorized.mkdir()
    alice, _ = create_key_pair(keys, "alice")
    bob, _ = create_key_pair(keys, "bob")
    slot = authorized / "client.key"
    slot.write_bytes(alice.read_bytes())
    check = AuthorizedKeys(authorized)
    assert check.callback("", load_public(alice)) and not check.callback("", load_public(bob))
    folder_time = authorized.stat().st_mtime_ns
    with slot.open("r+b") as f:  # in place: the folder does not change
        f.write(bob.read_bytes())
        f.truncate()
    os.utime(authorized, ns=(folder_time, folder_time))
    assert check.callback("", load_public(bob)) and not check.callback("", load_public(alice))
    slot.unlink()
    assert not check.callback("", load_public(bob))
