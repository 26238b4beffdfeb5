"""autoprune.paths' locations: a search's state in a local folder or an S3 bucket (a real
S3-protocol server on loopback, tests/conftest.py), read and written the same way."""

from __future__ import annotations

import pytest

from autoprune.errors import AutopruneError
from autoprune.paths import check_location, has_files, join, read_text, texts, upload_dir, write_text


@pytest.fixture(params=["folder", "bucket"])
def root(request, tmp_path):
    if request.param == "folder":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3").uri(f"loc-{tmp_path.name.lower().replace('_', '-')[:40]}", "store")


def test_join_puts_names_before_a_uris_query(tmp_path):
    assert (
        join("s3://b/p?endpoint_override=http://h:1", "x", "y.json") == "s3://b/p/x/y.json?endpoint_override=http://h:1"
    )
    assert join("gs://b/p/", "x") == "gs://b/p/x"
    assert join(str(tmp_path / "a" / ".." / "b"), "x") == str(tmp_path / "b" / "x")


def test_text_round_trips_and_lists_by_suffix(root):
    assert check_location(root, "--storage")
    assert read_text(join(root, "s", "a.json")) is None
    assert not has_files(join(root, "s"))
    write_text(join(root, "s", "a.json"), '{"a": 1}')
    write_text(join(root, "s", "b.json"), '{"b": 2}')
    write_text(join(root, "s", "a.json"), '{"a": 3}')  # replaced whole
    write_text(join(root, "s", "notes.txt"), "x")
    assert read_text(join(root, "s", "a.json")) == '{"a": 3}'
    assert has_files(join(root, "s"))
    assert texts(join(root, "s"), ".json") == {"a": '{"a": 3}', "b": '{"b": 2}'}
    assert texts(join(root, "nothing"), ".json") == {}


def test_a_folder_uploads_to_a_bucket(s3, tmp_path):
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "summary.json").write_text("{}")
    (tmp_path / "best" / "model.pt").write_bytes(b"\0" * 1000)
    root = s3.uri("upload", "x")
    upload_dir(tmp_path / "best", join(root, "best"))
    assert read_text(join(root, "best", "summary.json")) == "{}"
    assert set(texts(join(root, "best"), ".pt")) == {"model"}


def test_an_unusable_storage_is_refused_with_what_is_wrong(s3):
    with pytest.raises(AutopruneError, match=r"--storage 's3://no-such-bucket/x.*' cannot be written.*credentials"):
        check_location(f"s3://no-such-bucket/x?endpoint_override={s3.endpoint}", "--storage")
    with pytest.raises(AutopruneError, match=r"--storage 'bogus://x' is not a storage location.*s3://bucket/path"):
        check_location("bogus://x", "--storage")


def test_a_storage_that_does_not_answer_is_refused_after_the_timeout():
    """A server that accepts connections and never replies (a listening socket nobody serves)."""
    import socket
    import time

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(AutopruneError, match=r"--storage 's3://b/x.*' did not answer within 2 s"):
            check_location(f"s3://b/x?endpoint_override=http://127.0.0.1:{port}", "--storage", timeout_s=2)
        assert time.monotonic() - t0 < 10


def test_a_file_uri_storage_is_the_local_folder(tmp_path):
    """``--storage file:///abs`` is the folder /abs (not a folder named ``file:``); a relative
    one is refused."""
    assert check_location(f"file://{tmp_path}/res", "--storage") == str(tmp_path / "res")
    with pytest.raises(AutopruneError, match="not an absolute file:/// URI"):
        check_location("file://res", "--storage")


def test_free_space_is_checked_against_what_a_run_will_write(tmp_path):
    """The disk's real free space, read where the folder will be (its nearest existing parent)."""
    import shutil

    from autoprune.paths import check_free_space

    free = shutil.disk_usage(tmp_path).free
    check_free_space(tmp_path / "new" / "out", 1 << 20, "--out")
    with pytest.raises(AutopruneError, match=r"--out .*MiB free, and the results need about"):
        check_free_space(tmp_path / "new" / "out", free + (1 << 40), "--out")
