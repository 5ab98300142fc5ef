import os

import pytest

from stoker.protocol.endpoint import default_endpoint, ipc_path, prepare_ipc_folder


def test_default_endpoint():
    assert default_endpoint({"XDG_RUNTIME_DIR": "/run/user/5"}) == "ipc:///run/user/5/stoker/stoker.sock"
    assert default_endpoint({}) == f"ipc:///tmp/stoker-{os.getuid()}/stoker.sock"
    assert ipc_path("tcp://127.0.0.1:5") is None


def test_folder_is_created_private(tmp_path):
    prepare_ipc_folder(f"ipc://{tmp_path}/new/s.sock")
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700


def test_a_folder_others_can_write_is_refused(tmp_path):
    folder = tmp_path / "open"
    folder.mkdir()
    folder.chmod(0o777)
    with pytest.raises(PermissionError, match="written by others.*folder of its own"):
        prepare_ipc_folder(f"ipc://{folder}/s.sock")


def test_a_symlinked_folder_is_refused(tmp_path):
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(PermissionError, match="not a directory"):
        prepare_ipc_folder(f"ipc://{tmp_path}/link/s.sock")
