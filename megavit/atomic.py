"""Publishing outputs atomically: a reader finds the previous output or the complete new one, never a mix.

One mechanism, write under a hidden name in the destination's directory and ``os.replace`` it
into place, in two shapes:

* one file: :func:`atomic_path` (any writer that takes a path, such as netCDF4),
  :func:`atomic_file` (a file object), :func:`write_text_atomic`, :func:`write_json_atomic`;
* a set of files (a DA run's outputs, a shard set): :class:`Staging`, a hidden directory inside
  the output directory that writers fill, and whose entries :meth:`Staging.publish` moves into
  place together, putting the previous entries back if a rename fails.

Files are fsynced before the rename and get the permissions a plain ``open`` would give them
(``tempfile`` makes them private to the owner), so a group sharing the filesystem can read them.

A staging directory's name carries its owner (``.staging-PID@HOST-XXXX``): one left behind by a
killed process (SIGKILL, a node failure) is found by the next :meth:`Staging.create` in the same
output directory and removed when its process is gone from this host, or reported otherwise; it
is never published. :func:`interruptible` turns SIGTERM (what ``timeout`` and Slurm send) and
SIGINT into :class:`Interrupted`, so the cleanup above runs on those exits too.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any, ParamSpec

P = ParamSpec("P")

STAGING_PREFIX = ".staging-"
_OWNED_STAGING = re.compile(r"^\.staging-(\d+)@(.+)-[^-]+$")


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived: raised where the process was, so ``with``/``finally`` cleanup runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        """128 + the signal number, the shell's convention for a process ended by a signal."""
        return 128 + self.signum


@contextmanager
def interruptible() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise :class:`Interrupted` (main thread only)."""
    def interrupt(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def check_output_dir(out_dir: str | Path, run_files: Sequence[str], overwrite: bool) -> None:
    """Before any work: refuse ``out_dir`` if it holds a run (any of ``run_files``) unless
    ``overwrite``, and make sure it can be written (it, or the nearest existing parent), so a long
    run does not end with results it cannot store. Raises OSError naming the directory."""
    out_dir = Path(out_dir)
    found = [name for name in run_files if (out_dir / name).exists()]
    if found and not overwrite:
        raise OSError(f"output directory {out_dir} already holds a run ({', '.join(found)}); choose another "
                      f"output_dir or pass overwrite=true to replace it")
    existing = next(parent for parent in (out_dir, *out_dir.parents) if parent.exists())
    if not existing.is_dir():
        raise OSError(f"output directory {out_dir}: {existing} is not a directory")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as err:
        raise OSError(f"output directory {out_dir} is not writable ({existing}: {err.strerror or err})") from None


def stops_cleanly(prog: str) -> Callable[[Callable[P, int]], Callable[P, int]]:
    """Decorate a command's ``main``: SIGTERM and SIGINT end it with one line on stderr and status
    128 + signal, after the cleanup of whatever they interrupted (staging discarded, temporaries
    removed), so nothing half-written is published and earlier outputs stay as they were."""
    def decorate(main: Callable[P, int]) -> Callable[P, int]:
        @functools.wraps(main)
        def run(*args: P.args, **kwargs: P.kwargs) -> int:
            with interruptible():
                try:
                    return main(*args, **kwargs)
                except Interrupted as stop:
                    print(f"{prog}: stopped by {stop}; nothing was published (earlier outputs are unchanged)",
                          file=sys.stderr)
                    return stop.exit_status
        return run
    return decorate


def _process_alive(pid: int) -> bool:
    """Whether ``pid`` runs on this host; a zombie (exited, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):  # no /proc here: trust kill(pid, 0)
        return True
    return state != "Z"


def clear_stale_stagings(out_dir: Path) -> None:
    """Remove staging directories in ``out_dir`` whose process is gone from this host; report the rest.

    A staging directory of a live process, of another host or of unknown owner is left alone with
    a note on stderr: it is never published by anyone but its owner.
    """
    host = socket.gethostname()
    for entry in sorted(out_dir.glob(f"{STAGING_PREFIX}*")):
        owner = _OWNED_STAGING.match(entry.name)
        if owner and owner[2] == host and not _process_alive(int(owner[1])):
            shutil.rmtree(entry, ignore_errors=True)
            print(f"note: removed {entry}, left by process {owner[1]} (killed?); nothing of it was published",
                  file=sys.stderr)
        elif owner is None or owner[2] != host or int(owner[1]) != os.getpid():
            who = f"process {owner[1]} on {owner[2]}" if owner else "an unknown process"
            print(f"note: {entry} belongs to {who}, still running or elsewhere; left alone (remove it if that "
                  f"run is dead)", file=sys.stderr)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a hidden temporary path beside ``path``; on success it replaces ``path``, else it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        _fsync(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file for writing that replaces ``path`` when the block completes."""
    with atomic_path(path) as tmp, open(tmp, mode) as handle:
        yield handle


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_file(path) as handle:
        handle.write(text)


def write_json_atomic(path: str | Path, data: Any, indent: int = 1) -> None:
    write_text_atomic(path, json.dumps(data, indent=indent) + "\n")


class Staging:
    """A hidden directory inside ``out_dir`` that holds a run's outputs until they are published.

    Writers put files under :meth:`file` (or anywhere in :attr:`path`); :meth:`publish` moves the
    staged top-level entries into ``out_dir``, replacing older ones; :meth:`discard` (also on
    leaving a ``with`` block) removes whatever is still staged, and ``out_dir`` itself if this
    staging created it and nothing else is in it. Several processes can share one staging
    directory: one creates it with :meth:`create`, the others join with ``Staging(out_dir, path)``.
    """

    def __init__(self, out_dir: str | Path, path: str | Path, created: bool = False) -> None:
        self.out_dir, self.path, self.created = Path(out_dir), Path(path), created

    @classmethod
    def create(cls, out_dir: str | Path) -> Staging:
        """Make ``out_dir`` if needed and a fresh staging directory inside it."""
        out_dir = Path(out_dir)
        created = not out_dir.exists()
        if not created:
            clear_stale_stagings(out_dir)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            path = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}@{socket.gethostname()}-", dir=out_dir)
        except OSError as err:
            raise OSError(f"output directory {str(out_dir)!r} is not writable: {err.strerror or err}") from None
        return cls(out_dir, path, created)

    def file(self, name: str) -> Path:
        """Staged path of output ``name`` (relative to ``out_dir``); creates its parent directories."""
        path = self.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def publish(self, names: Sequence[str] | None = None) -> None:
        """Move the staged entries ``names`` (default: all, sorted) into ``out_dir`` in that order.

        If a rename fails, or SIGTERM/SIGINT (:class:`Interrupted`) arrives midway, the entries
        already moved go back to staging and the ones they replaced back into ``out_dir``, so
        ``out_dir`` is left as it was.
        """
        names = sorted(p.name for p in self.path.iterdir()) if names is None else list(names)
        replaced = Path(tempfile.mkdtemp(prefix=".replaced-", dir=self.path))
        moved: list[str] = []
        try:
            for name in names:
                target = self.out_dir / name
                if os.path.lexists(target):
                    os.replace(target, replaced / name)
                os.replace(self.path / name, target)
                moved.append(name)
        except (OSError, KeyboardInterrupt):
            for name in moved:
                os.replace(self.out_dir / name, self.path / name)
            for entry in replaced.iterdir():
                os.replace(entry, self.out_dir / entry.name)
            raise
        shutil.rmtree(replaced)

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self.created:
            with suppress(OSError):  # not empty: something else lives there now
                self.out_dir.rmdir()

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


@contextmanager
def staged_output(out_dir: str | Path) -> Iterator[Path]:
    """Yield a staging directory for one process's outputs; on success publish all of it, else discard it."""
    with Staging.create(out_dir) as staging:
        yield staging.path
        staging.publish()
