"""Output folders that never cost anyone a file.

Import, export and `dlm-prepare` write their output through `writing(out, ...)`:

- everything is written into a new temporary folder beside `out` (the same file system) and
  moved into place only when complete, so a crash or a kill leaves `out` as it was;
- the finished folder holds a marker, `.dlm-written.json`, listing every file dlm put there;
- an `out` that is, holds or lies inside one of the inputs is refused before anything is read;
- an existing non-empty `out` is replaced only when asked (`--overwrite`) and only when every
  file in it is one its marker lists: one foreign file and nothing is touched, and the
  sentence names that file.

A temporary folder left by a killed process carries its host and process id; the next write
to the same `out` removes it once that process is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import socket
import tempfile

from dlm.config import ConfigError

MARKER = ".dlm-written.json"
PARTIAL = ".dlm-partial.json"


def _files(folder: pathlib.Path) -> list[str]:
    """Every file and link under `folder`, as sorted paths relative to it (links not followed)."""
    out = []
    for root, dirs, names in os.walk(folder):
        base = pathlib.Path(root)
        links = [d for d in dirs if (base / d).is_symlink()]
        dirs[:] = [d for d in dirs if d not in links]
        out += [(base / n).relative_to(folder).as_posix() for n in names + links]
    return sorted(out)


def plain_file_name(name: str) -> bool:
    """Whether a name read from a stranger's file (an index's shard, a metadata's shard) names a
    file directly inside its folder: not empty, '.', '..', a path or a NUL-carrying string."""
    return name not in ("", ".", "..") and not any(c in name for c in ("/", "\\", "\0"))


def foreign_file(folder: str | pathlib.Path) -> str | None:
    """The first file in `folder` that its dlm marker does not list (None when dlm wrote all)."""
    folder = pathlib.Path(folder)
    try:
        listed = set(json.loads((folder / MARKER).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        listed = set()
    listed.add(MARKER)
    return next((f for f in _files(folder) if f not in listed), None)


def check_apart(out: str | pathlib.Path, inputs, flag: str = "--out") -> None:
    """Refuse an output that is, holds or lies inside one of `inputs` (paths that exist)."""
    o = pathlib.Path(out).resolve()
    for given in inputs:
        s = pathlib.Path(given).resolve()
        if o == s:
            raise ConfigError(f"{flag} {str(out)!r} is the input {str(given)!r}; write to a new folder outside it.")
        if o in s.parents:
            raise ConfigError(f"{flag} {str(out)!r} holds the input {str(given)!r}; write to a new folder outside it.")
        if s in o.parents:
            raise ConfigError(f"{flag} {str(out)!r} lies inside the input {str(given)!r}; write to a new folder outside it.")


def check_target(out: str | pathlib.Path, overwrite: bool, flag: str = "--out") -> None:
    """`out` may be written: absent, an empty folder, or (with overwrite) a folder dlm wrote."""
    out = pathlib.Path(out).absolute()  # '.' has no name and no parent of its own
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise ConfigError(f"{flag} {str(out)!r} exists and is not a folder; choose a new {flag}.")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise ConfigError(f"{flag} {str(out)!r} is not empty; choose a new {flag} or pass --overwrite "
                          "(which replaces only a folder dlm wrote).")
    foreign = foreign_file(out)
    if foreign is not None:
        raise ConfigError(f"{flag} {str(out)!r} holds {foreign!r}, which dlm did not write there, so --overwrite "
                          f"leaves the folder alone; move that file away or choose a new {flag}.")


def _alive(record: dict) -> bool:
    if record.get("host") != socket.gethostname():
        return True  # another machine's process: not ours to judge
    try:
        os.kill(int(record["pid"]), 0)
    except ProcessLookupError:
        return False
    except (OSError, ValueError, KeyError, TypeError):
        return True
    return True


def _remove_stale(out: pathlib.Path) -> None:
    for tmp in out.parent.glob(f".{out.name}.dlm-partial-*"):
        try:
            record = json.loads((tmp / PARTIAL).read_text())
        except (OSError, ValueError):
            continue  # not one of ours, or not readable: left alone
        if isinstance(record, dict) and not _alive(record):
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def writing(out: str | pathlib.Path, *, inputs=(), overwrite: bool = False, flag: str = "--out"):
    """Yield a new temporary folder beside `out`; on success it becomes `out` (see the module
    docstring for what is checked first). On an exception the temporary folder is removed and
    `out` is untouched."""
    given, out = out, pathlib.Path(out).absolute()  # '.' has no name and no parent of its own
    check_apart(given, [p for p in inputs if p and pathlib.Path(p).exists()], flag)
    check_target(out, overwrite, flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.dlm-partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would hide the result from the user's group
    (tmp / PARTIAL).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    try:
        yield tmp
        (tmp / PARTIAL).unlink()
        (tmp / MARKER).write_text(json.dumps({"written_by": "dlm", "files": _files(tmp)}, indent=1) + "\n")
        check_target(out, overwrite, flag)  # again: someone may have written there meanwhile
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp: pathlib.Path, out: pathlib.Path) -> None:
    if out.exists() and any(out.iterdir()):  # a folder dlm wrote (checked): swap, then remove it
        old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.dlm-old-", dir=out.parent))
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)  # rename(2) replaces an empty folder
