"""Where the embeddings of a root are cached: ROOT/embeddings, or a user cache folder.

Evaluation never writes into a dataset root it cannot write: on a read-only mount (a cluster's
dataset share) the embeddings go to a user cache folder instead. The rule (docs/evaluation.md):

- `--cache_dir DIR` (or the environment variable POLYP_SSL_CACHE=DIR): always DIR;
- else ROOT/embeddings when the root is writable (`writable_folder`);
- else `$XDG_CACHE_HOME/polyp-ssl` (or `~/.cache/polyp-ssl` when XDG_CACHE_HOME is not set).

In a cache folder a root's files live in `embeddings/{root name}-{root_identity[:16]}/`: the
identity hashes the root's resolved path and its catalog manifest, so two roots (or two ingests of
one root) never share an entry. An existing file is looked for in both places (ROOT/embeddings
first), so what a writable root cached is still found once it is mounted read-only; `polyp-ssl
catalog` lists both places (`embeddings_places`). Standard library only: `polyp-ssl catalog`
starts without torch.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "POLYP_SSL_CACHE"
XDG_ENV = "XDG_CACHE_HOME"
APP_DIR = "polyp-ssl"
ROOT_EMBEDDINGS = "embeddings"  # ROOT/embeddings (shards.catalog.EMBEDDINGS_DIR)
MANIFEST = ("catalog", "manifest.json")
MAX_MANIFEST_BYTES = 16 << 20  # shards.catalog.MAX_MANIFEST_BYTES
_NAME_OK = re.compile(r"[^A-Za-z0-9_.+-]")
# errors of O_TMPFILE that mean "this file system cannot make unnamed files", not "not writable"
_NO_TMPFILE = (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT)


class CacheDirError(OSError):
    """No folder to cache embeddings in (the root is read-only and the user cache cannot be
    made); the message names both and how to choose another."""

    def __str__(self) -> str:
        return str(self.strerror)


def writable_folder(path: str | os.PathLike[str]) -> bool:
    """True when a file can really be created in the existing folder `path`.

    `os.access` is not enough: as root it answers yes on folders whose mode says no, and on some
    network file systems it does not know the server's answer. A file system mounted read-only
    (statvfs ST_RDONLY) is no without touching it; otherwise a probe file is created and removed
    at once: an unnamed O_TMPFILE where the file system supports it (never visible to a reader),
    else a hidden temporary name."""
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return False
    except OSError:
        return False
    flag = getattr(os, "O_TMPFILE", 0)
    if flag:
        try:
            fd = os.open(path, flag | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), 0o600)
        except OSError as exc:
            if exc.errno not in _NO_TMPFILE:
                return False  # EROFS, EACCES, EPERM, ENOSPC, EDQUOT: cannot write here
        else:
            os.close(fd)
            return True
    try:
        fd, name = tempfile.mkstemp(prefix=".polyp-ssl-probe-", dir=path)
    except OSError:
        return False
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(name)
    return True


def user_cache_base(env: Mapping[str, str] | None = None) -> Path:
    """`$XDG_CACHE_HOME/polyp-ssl`, or `~/.cache/polyp-ssl` (XDG: a relative XDG_CACHE_HOME is
    ignored)."""
    env = os.environ if env is None else env
    xdg = env.get(XDG_ENV, "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / APP_DIR
    return Path.home() / ".cache" / APP_DIR


def cache_base(
    cache_dir: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> tuple[Path, str]:
    """The user-side cache folder and what chose it: `--cache_dir`, POLYP_SSL_CACHE, or the XDG
    default (empty reason)."""
    env = os.environ if env is None else env
    if cache_dir:
        return Path(cache_dir).expanduser(), "--cache_dir"
    if env.get(CACHE_ENV):
        return Path(env[CACHE_ENV]).expanduser(), CACHE_ENV
    return user_cache_base(env), ""


def root_identity(root: str | os.PathLike[str]) -> str:
    """sha256 of the root's resolved path and its catalog manifest's bytes: which catalog of which
    root. A copy of a root elsewhere, or a re-ingest in place, is another identity."""
    from polyp_ssl.shards.files import read_regular_bytes
    from polyp_ssl.shards.remote import remote_root

    url = remote_root(root)
    if url is not None:  # a root in an object store: its URL and its manifest
        from polyp_ssl.shards.tables import read_manifest_bytes

        resolved, manifest = url, read_manifest_bytes(url)
    else:
        resolved = Path(root).resolve()
        manifest = read_regular_bytes(resolved.joinpath(*MANIFEST), "manifest", limit=MAX_MANIFEST_BYTES)
    digest = hashlib.sha256()
    digest.update(os.fsencode(str(resolved)) + b"\0")
    digest.update(hashlib.sha256(manifest).digest())
    return digest.hexdigest()


def user_embeddings_dir(root: str | os.PathLike[str], base: Path) -> Path:
    """BASE/embeddings/{root name}-{identity}: the root's folder in a cache folder."""
    from polyp_ssl.shards.remote import remote_root

    url = remote_root(root)
    last = url.rsplit("/", 1)[-1] if url is not None else Path(root).resolve().name
    name = _NAME_OK.sub("-", last).strip("-.") or "root"
    return base / ROOT_EMBEDDINGS / f"{name}-{root_identity(root)[:16]}"


@dataclass(frozen=True)
class EmbeddingsCache:
    """Where a root's embeddings are written (`write_dir`) and looked for (`read_dirs`, in order)."""

    root: Path
    write_dir: Path
    read_dirs: tuple[Path, ...]
    reason: str  # why write_dir: "" (ROOT/embeddings), "--cache_dir", POLYP_SSL_CACHE, "read-only"

    def describe(self) -> str:
        """One line for the user: where the cache goes and why."""
        why = {
            "": "",
            "read-only": f" ({self.root} is not writable; --cache_dir DIR or {CACHE_ENV} choose another)",
            "remote": f" (the root is in an object store; --cache_dir DIR or {CACHE_ENV} choose another)",
        }.get(self.reason, f" ({self.reason})")
        return f"embeddings cache: {self.write_dir}{why}"

    def prepare(self) -> Path:
        """Create `write_dir` (and its parents) before a file is written there; CacheDirError
        naming the folder when it cannot be."""
        try:
            self.write_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            hint = (
                ""
                if self.reason in ("--cache_dir", CACHE_ENV)
                else f"; choose one with --cache_dir DIR or {CACHE_ENV}"
            )
            raise CacheDirError(
                exc.errno or errno.EACCES,
                f"{self.write_dir}: cannot cache embeddings here ({exc.strerror or exc}){hint}",
            ) from None
        return self.write_dir


def embeddings_cache(
    root: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> EmbeddingsCache:
    """The cache rule for `root` (see the module docstring). The root must hold a catalog."""
    from polyp_ssl.shards.remote import remote_root

    if remote_root(root) is not None:  # never written into a bucket: the cache folder only
        base, reason = cache_base(cache_dir, env)
        user = user_embeddings_dir(root, base)
        return EmbeddingsCache(Path(root), user, (user,), reason or "remote")
    root = Path(root)
    in_root = root / ROOT_EMBEDDINGS
    base, reason = cache_base(cache_dir, env)
    user = user_embeddings_dir(root, base)
    if not reason:
        probe = in_root if in_root.is_dir() else root
        if writable_folder(probe):
            return EmbeddingsCache(root, in_root, (in_root, user), "")
        reason = "read-only"
    return EmbeddingsCache(root, user, (in_root, user), reason)


def embeddings_places(
    root: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[Path, ...]:
    """The folders that may hold `root`'s cached embeddings, ROOT/embeddings first (no write, no
    probe: for listing)."""
    base, _ = cache_base(cache_dir, env)
    return (Path(root) / ROOT_EMBEDDINGS, user_embeddings_dir(root, base))


def cached_files(places: tuple[Path, ...]) -> list[Path]:
    """The *.parquet files of every place that is a folder, place by place, sorted by name."""
    return [p for place in places if place.is_dir() for p in sorted(place.glob("*.parquet"))]
