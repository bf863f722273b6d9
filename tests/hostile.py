"""What every hostile-input test checks: one sentence, in bounded time and memory, from the
library and through the command line; and for folders, that no pre-existing byte moved."""

import contextlib
import hashlib
import os
import pathlib
import resource
import subprocess
import sys
import time

import pytest

from dlm.config import ConfigError

ADDRESS_SPACE = 4 << 30  # the most a hostile input may make a process reserve


def one_sentence(fn, seconds: float = 5.0) -> str:
    """fn() raises a ConfigError of one line ending in a full stop, within `seconds`; its text."""
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        fn()
    assert time.perf_counter() - t0 < seconds
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith("."), msg
    return msg


def _vm_bytes() -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


@contextlib.contextmanager
def bounded_memory(extra: int = ADDRESS_SPACE):
    """Within the block this process may reserve at most `extra` more bytes of address space
    (an allocation beyond it is a MemoryError, which a hostile-input test counts as a failure)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _vm_bytes() + extra
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def run_cli(args, cwd=None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python ARGS` in a process limited to 4 GiB of address space (the shell's ulimit, so no
    fork of this multithreaded process runs Python code)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    limited = ["/bin/sh", "-c", f'ulimit -v {ADDRESS_SPACE >> 10} && exec "$@"', "sh", sys.executable]
    return subprocess.run(limited + [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def cli_error(p: subprocess.CompletedProcess) -> str:
    """A command's failure: exit code 1 or 2 and one stderr line starting 'error: ' (no traceback)."""
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode in (1, 2) and len(lines) == 1 and lines[0].startswith("error: "), (p.returncode, p.stderr)
    return lines[0]


def hashes(*folders) -> dict:
    """sha256 of every file under the folders (links by their target path), by path."""
    out = {}
    for folder in folders:
        for root, dirs, names in os.walk(folder):
            for name in names + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
                p = pathlib.Path(root) / name
                out[str(p)] = os.readlink(p) if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out
