"""megavit.atomic: outputs appear whole or not at all, and failures leave the previous ones."""

import json
import os
import stat

import pytest

from megavit.atomic import STAGING_PREFIX, Staging, atomic_file, staged_output, write_json_atomic


def test_atomic_file_replaces_only_on_success(tmp_path):
    target = tmp_path / "sub" / "data.txt"
    write_json_atomic(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_file(target) as handle:
        handle.write("half")
        raise RuntimeError("writer failed")
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(os.listdir(target.parent)) == ["data.txt"]  # no temporary left behind


def test_atomic_file_is_readable_like_a_plain_file(tmp_path):
    write_json_atomic(tmp_path / "layout.json", {})
    (tmp_path / "plain").write_text("")
    assert stat.S_IMODE((tmp_path / "layout.json").stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)


def test_staged_output_publishes_everything_or_nothing(tmp_path):
    out = tmp_path / "run"
    with staged_output(out) as staging:
        (staging / "a.txt").write_text("first")
    assert sorted(os.listdir(out)) == ["a.txt"]
    with pytest.raises(KeyboardInterrupt), staged_output(out) as staging:
        (staging / "a.txt").write_text("second")
        (staging / "b.txt").write_text("second")
        raise KeyboardInterrupt
    assert sorted(os.listdir(out)) == ["a.txt"] and (out / "a.txt").read_text() == "first"
    with pytest.raises(ValueError), staged_output(tmp_path / "new"):
        raise ValueError
    assert not (tmp_path / "new").exists()  # created by the failed run, so removed with it


def test_publish_puts_everything_back_when_a_rename_fails(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "a").write_text("old a")
    (out / "b").mkdir()
    (out / "b" / "keep").write_text("old b")
    with Staging.create(out) as staging:
        staging.file("a").write_text("new a")  # "b" is not staged: its rename fails after "a" moved
        with pytest.raises(OSError):
            staging.publish(["a", "b"])
        assert (out / "a").read_text() == "old a" and (out / "b" / "keep").read_text() == "old b"
    assert not [p for p in os.listdir(out) if p.startswith(STAGING_PREFIX)]
