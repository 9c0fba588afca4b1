"""One file API for local folders and URIs: the same calls on a folder and on a file:// URI."""
import pytest

from cnd_ray import storage


@pytest.mark.parametrize("uri", [False, True])
def test_the_same_calls_serve_a_folder_and_a_uri(tmp_path, uri):
    base = f"file://{tmp_path}/s" if uri else str(tmp_path / "s")
    path = storage.join(base, "a", "b.txt")
    assert storage.is_uri(path) == uri and not storage.is_file(path)
    assert storage.subfolders(base) == []  # not there yet: nothing, no error
    storage.write_text(path, "hello\n")
    assert storage.is_file(path) and storage.read_text(path) == "hello\n"
    storage.download(path, str(tmp_path / "local" / "c.txt"))
    storage.upload(str(tmp_path / "local" / "c.txt"), storage.join(base, "d", "c.txt"))
    assert (tmp_path / "s" / "d" / "c.txt").read_text() == "hello\n"
    storage.write_bytes(storage.join(base, "d", "e.bin"), b"\x00\x01")
    assert (tmp_path / "s" / "d" / "e.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in (tmp_path / "s" / "d").iterdir()) == ["c.txt", "e.bin"]  # written beside, renamed
    assert storage.subfolders(base) == ["a", "d"]
    storage.remove_file(storage.join(base, "d", "c.txt"))
    assert not storage.is_file(storage.join(base, "d", "c.txt"))
    storage.remove_file(storage.join(base, "d", "e.bin"))
    storage.remove_dir(storage.join(base, "a"))
    storage.remove_dir(storage.join(base, "nothing"))
    assert storage.subfolders(base) == ["d"]
