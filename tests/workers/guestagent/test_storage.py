import pytest

from dbaas.storage import LocalStorage, StorageError


def test_put_get_delete(tmp_path):
    storage = LocalStorage(tmp_path / "backups")
    source = tmp_path / "dump"
    source.write_bytes(b"backup bytes" * 1000)
    location = storage.put("b-1", str(source))
    assert location == (tmp_path / "backups" / "b-1").resolve().as_uri()
    assert storage.exists(location)
    assert [p.name for p in (tmp_path / "backups").iterdir()] == ["b-1"], "no temp file left"
    storage.get(location, str(tmp_path / "copy"))
    assert (tmp_path / "copy").read_bytes() == source.read_bytes()
    storage.delete(location)
    assert not storage.exists(location)
    storage.delete(location)
    with pytest.raises(StorageError):
        storage.get(location, str(tmp_path / "again"))


@pytest.mark.parametrize("location", [
    "file:///etc/passwd",
    "file://{root}/../secret",
    "file://{root}/sub/b-1",
    "file://{root}/.hidden",
    "http://example.com{root}/b-1",
    "{root}/b-1",
])
def test_locations_outside_the_root_are_refused(tmp_path, location):
    storage = LocalStorage(tmp_path)
    with pytest.raises(StorageError):
        storage.get(location.format(root=storage.root), str(tmp_path / "out"))


@pytest.mark.parametrize("backup_id", ["../x", ".hidden", "a/b", ""])
def test_backup_ids_must_be_plain_names(tmp_path, backup_id):
    (tmp_path / "src").write_text("x")
    with pytest.raises(StorageError):
        LocalStorage(tmp_path / "backups").put(backup_id, str(tmp_path / "src"))
