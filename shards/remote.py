"""Dataset roots and shards behind a URL that fsspec reads (`s3://`, `gs://`, `https://`, ...).

    is_remote("s3://bkt/root")                       # True; plain paths, `file:` and `pipe:` are not
    options = parse_storage_options('{"anon": false}')   # --storage_options JSON -> dict
    fs, path = filesystem_for("s3://bkt/root", options)  # the one place fsspec is configured

Endpoint, credentials and region come from the standard environment and configuration files of
the store's own library (for S3: `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`,
`AWS_PROFILE`, `AWS_DEFAULT_REGION`, `~/.aws/config`); `--storage_options` passes anything else to
the fsspec filesystem (e.g. `{"client_kwargs": {"region_name": "eu-west-1"}}`).

Credentials never appear in a message: `RemoteError` texts are built from the URL (user and
password removed), the error's type and a short cause with every storage-option value and every
secret of the environment replaced by `***`. `public_options` is what a run records (config.yaml).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import urllib.parse
from typing import Any

MAX_OPTIONS_CHARS = 64 << 10
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
# fsspec protocols that read this machine's files, wrap another filesystem or run in this process
_NOT_REMOTE = frozenset(
    {
        "file", "local", "asynclocal", "pipe", "memory", "dir", "tar", "zip", "libarchive", "reference",
        "blockcache", "cached", "filecache", "simplecache", "generic", "async_wrapper", "asyncwrapper",
        "data",
    }
)  # fmt: skip
# packages a protocol needs, for the one-line hint
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
# environment variables whose values are secrets (never shown, even where a library echoes them)
SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_CONNECTION_STRING",
    "GOOGLE_APPLICATION_CREDENTIALS",
)
# storage-option keys whose values are kept in a run's record (everything else becomes "***")
_PUBLIC_KEYS = frozenset(
    {"anon", "endpoint_url", "region_name", "requester_pays", "use_ssl", "version_aware",
     "default_block_size", "project", "cache_regions", "addressing_style", "signature_version",
     "default_fill_cache"}
)  # fmt: skip
REDACTED = "***"
MAX_CAUSE_CHARS = 300
# the --storage_options of this command, for readers that are not handed options (the catalog
# tables); set once by the command line (`use_storage_options`)
_command_options: dict[str, Any] = {}


class RemoteError(OSError):
    """A remote root or object that cannot be reached or read: one line, without credentials.

    `bad_input` (exit 2) for what the user can fix by flags or set-up (a missing package, no
    credentials, a bucket that is not there); otherwise exit 1 (an endpoint that does not answer)."""

    def __init__(self, message: str, *, bad_input: bool = False) -> None:
        super().__init__(message)
        self.strerror = message  # the dispatcher prints `strerror` for an OSError without a file
        self.bad_input = bad_input


class StorageOptionsError(ValueError):
    """`--storage_options` that is not a bounded JSON object (the message never repeats values)."""

    bad_input = True


def scheme_of(location: str | os.PathLike[str]) -> str | None:
    """The lower-case URL scheme of `location`, or None for a plain path (or a drive letter)."""
    text = os.fspath(location)
    if not isinstance(text, str):
        return None
    m = _SCHEME.match(text)
    if m is None or re.match(r"^[A-Za-z]:[\\/]", text):
        return None
    return m.group(1).lower()


def is_remote(location: str | os.PathLike[str]) -> bool:
    """True for a URL that an fsspec filesystem reads other than this machine's files."""
    scheme = scheme_of(location)
    if scheme is None or scheme in _NOT_REMOTE or "::" in os.fspath(location):
        return False
    from fsspec.registry import known_implementations, registry

    return scheme in known_implementations or scheme in registry


def remote_root(root: str | os.PathLike[str]) -> str | None:
    """The URL of a remote root, or None for a local one. A URL that went through `pathlib.Path`
    (`s3:/bkt/root`, one slash lost) is given back whole."""
    text = os.fspath(root)
    if not isinstance(text, str) or not is_remote(text):
        return None
    scheme = scheme_of(text) or ""
    rest = text[len(scheme) + 1 :]
    if rest.startswith("/") and not rest.startswith("//"):
        rest = "/" + rest
    return f"{scheme}:{rest}".rstrip("/")


def use_storage_options(options: dict[str, Any] | None) -> None:
    """The storage options of this command (--storage_options), used where none are passed."""
    _command_options.clear()
    _command_options.update(options or {})


def command_options() -> dict[str, Any]:
    return dict(_command_options)


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """The dict of `--storage_options JSON` ({} for None or blank); StorageOptionsError otherwise."""
    if text is None or not text.strip():
        return {}
    if len(text) > MAX_OPTIONS_CHARS:
        raise StorageOptionsError(f"--storage_options: longer than {MAX_OPTIONS_CHARS} characters")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:  # the position only, never the text
        raise StorageOptionsError(
            f"--storage_options: not JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
            'give a JSON object, e.g. \'{"client_kwargs": {"region_name": "eu-west-1"}}\''
        ) from None
    except RecursionError:
        raise StorageOptionsError("--storage_options: nested too deeply") from None
    if not isinstance(value, dict):
        raise StorageOptionsError(f"--storage_options: a JSON {type(value).__name__}, not an object")
    return value


def display_url(url: str) -> str:
    """`url` without a user name or password (`https://user:pw@host/x` -> `https://host/x`)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host += f":{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=host))


def _secrets(options: dict[str, Any] | None) -> list[str]:
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
        elif isinstance(value, str) and len(value) >= 4:
            found.append(value)

    walk(options or {})
    found += [os.environ[k] for k in SECRET_ENV if len(os.environ.get(k, "")) >= 4]
    return sorted(set(found), key=len, reverse=True)


def redact(text: str, options: dict[str, Any] | None = None) -> str:
    """`text` with every string value of `options` and every secret of the environment replaced."""
    for secret in _secrets(options):
        text = text.replace(secret, REDACTED)
    return text


def public_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """`options` as a run records them: the values of known harmless keys kept, others `***`."""

    def clean(value: Any, key: str | None) -> Any:
        if isinstance(value, dict):
            return {k: clean(v, k) for k, v in value.items()}
        if key in _PUBLIC_KEYS and isinstance(value, (str, int, float, bool, type(None))):
            return value
        return REDACTED

    return {k: clean(v, k) for k, v in (options or {}).items()}


def cause_of(exc: BaseException, options: dict[str, Any] | None = None) -> str:
    """A short one-line cause of `exc` for a message: its type and text, redacted."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > MAX_CAUSE_CHARS:
        text = text[:MAX_CAUSE_CHARS] + "..."
    return redact(f"{type(exc).__name__}: {text}", options)


_AUTH_WORDS = ("credential", "accessdenied", "access denied", "invalidaccesskeyid", "signaturedoesnotmatch",
               "forbidden", "expiredtoken", "unauthorized")  # fmt: skip
_MISSING_WORDS = (
    "nosuchbucket",
    "no such bucket",
    "bucket does not exist",
    "specified bucket does not exist",
)


def remote_failure(
    url: str, exc: BaseException, options: dict[str, Any] | None = None, doing: str = "read"
) -> RemoteError:
    """The RemoteError for `exc` raised while `doing` `url`: missing credentials, a denied request
    and a bucket that is not there are bad input (exit 2); anything else (an endpoint that does not
    answer, a timeout) exit 1."""
    if isinstance(exc, RemoteError):
        return exc
    shown = display_url(url)
    low = f"{type(exc).__name__} {exc}".lower()
    if "nocredentials" in low or "unable to locate credentials" in low:
        return RemoteError(
            f"{shown}: no credentials to {doing} it: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE), or pass --storage_options '{\"anon\": true}' for a public bucket",
            bad_input=True,
        )
    if any(w in low for w in _MISSING_WORDS):
        return RemoteError(f"{shown}: no such bucket ({cause_of(exc, options)})", bad_input=True)
    if any(w in low for w in _AUTH_WORDS) or isinstance(exc, PermissionError):
        return RemoteError(f"{shown}: access denied: {cause_of(exc, options)}", bad_input=True)
    return RemoteError(f"{shown}: cannot {doing} it: {cause_of(exc, options)}")


# the stores' libraries log every endpoint lookup and retry at INFO: a run's log keeps warnings only
QUIET_LOGGERS = ("botocore", "aiobotocore", "boto3", "s3fs", "fsspec", "urllib3", "gcsfs", "adlfs")


def quiet_store_loggers() -> None:
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level < logging.WARNING:
            logger.setLevel(logging.WARNING)


def filesystem_for(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for `url` (with `storage_options`, or this command's when
    None: `use_storage_options`); RemoteError in one line for a protocol that no
    installed package reads (naming the package to install) or options the filesystem refuses."""
    scheme = scheme_of(url) or "file"
    options = dict(_command_options if storage_options is None else storage_options)
    quiet_store_loggers()
    try:
        import fsspec.core
    except ImportError:
        raise RemoteError(
            f"{display_url(url)}: reading {scheme}:// needs fsspec: pip install 'polyp-ssl[s3]'",
            bad_input=True,
        ) from None
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except ImportError:
        package = _PACKAGES.get(scheme, f"the fsspec backend for {scheme}://")
        hint = "pip install 'polyp-ssl[s3]'" if package == "s3fs" else f"pip install {package}"
        raise RemoteError(
            f"{display_url(url)}: reading {scheme}:// needs {package}, which is not installed: {hint}",
            bad_input=True,
        ) from None
    except (TypeError, ValueError) as exc:  # an unknown protocol, an option the filesystem refuses
        raise RemoteError(
            f"{display_url(url)}: cannot open a {scheme}:// filesystem with these --storage_options: "
            f"{cause_of(exc, options)}",
            bad_input=True,
        ) from None
    return fs, path


def join(root: str, rel: str) -> str:
    """The URL of `rel` (a checked relative path) under the remote root `root`."""
    return root.rstrip("/") + "/" + rel


def is_missing(exc: BaseException) -> bool:
    """True for a 'not found' answer (FileNotFoundError, ENOENT) rather than a failure to ask."""
    return isinstance(exc, FileNotFoundError) or getattr(exc, "errno", None) == errno.ENOENT
