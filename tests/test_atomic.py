"""megavit.atomic: outputs appear whole or not at all, and failures leave the previous ones."""

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from megavit.atomic import STAGING_PREFIX, Interrupted, Staging, atomic_file, staged_output, write_json_atomic


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


WRITER = """
import sys, time
from megavit.atomic import Staging, interruptible
out = sys.argv[1]
with interruptible():
    try:
        with Staging.create(out) as staging:
            staging.file("result.txt").write_text("half-written")
            print(staging.path, flush=True)
            time.sleep(60)
            staging.publish()
    except KeyboardInterrupt as stop:
        print(f"stopped by {stop}", file=sys.stderr)
        sys.exit(stop.exit_status)
"""


def start_writer(out):
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(out)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    return process, Path(process.stdout.readline().strip())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_terminated_writer_discards_its_staging(tmp_path, signum):
    out = tmp_path / "run"
    out.mkdir()
    (out / "result.txt").write_text("previous")
    process, staged = start_writer(out)
    assert staged.is_dir() and staged.parent == out
    process.send_signal(signum)
    assert process.wait(timeout=30) == 128 + signum
    assert f"stopped by {signal.Signals(signum).name}" in process.stderr.read()
    assert sorted(os.listdir(out)) == ["result.txt"] and (out / "result.txt").read_text() == "previous"


def test_a_killed_writers_staging_is_removed_by_the_next_run_and_never_published(tmp_path, capsys):
    out = tmp_path / "run"
    process, killed = start_writer(out)
    live, running = start_writer(out)  # a second writer, still running: its staging must be left alone
    process.kill()
    process.wait()
    assert killed.is_dir()  # SIGKILL: no cleanup ran
    with staged_output(out) as staging:
        (staging / "fresh.txt").write_text("new run")
    note = capsys.readouterr().err
    assert f"removed {killed}, left by process {process.pid}" in note
    assert f"{running} belongs to process {live.pid}" in note
    assert not killed.exists() and running.is_dir()
    assert sorted(p for p in os.listdir(out) if not p.startswith(STAGING_PREFIX)) == ["fresh.txt"]
    live.kill()
    live.wait()


def test_an_interrupt_in_the_middle_of_publishing_puts_everything_back(tmp_path, monkeypatch):
    """SIGTERM arriving between two renames of publish: the folder is left as it was, not half new."""
    out = tmp_path / "run"
    out.mkdir()
    for name in ("a", "b"):
        (out / name).write_text(f"old {name}")
    real_replace, calls = os.replace, []

    def replace_then_interrupt(source, target):
        calls.append(target)
        real_replace(source, target)
        if len(calls) == 2:  # "a" moved aside and the new "a" moved in: now the signal
            raise Interrupted(signal.SIGTERM)

    with Staging.create(out) as staging:
        for name in ("a", "b"):
            staging.file(name).write_text(f"new {name}")
        monkeypatch.setattr(os, "replace", replace_then_interrupt)
        with pytest.raises(Interrupted):
            staging.publish(["a", "b"])
        monkeypatch.setattr(os, "replace", real_replace)
    assert {p.name: p.read_text() for p in out.iterdir()} == {"a": "old a", "b": "old b"}
