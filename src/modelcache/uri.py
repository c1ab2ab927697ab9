"""Model URIs: parsing, the storage key, and sub-path matching.

The storage key is KServe's (>= 0.18): the first 16 hex chars of sha256 of the *exact* URI string.
KServe's pod mutator mounts `models/<key>`, so we must never normalise a URI before hashing it
(a trailing slash gives another key there too). Plain local paths are the one exception: they are
not URIs, so we turn them into `file://` + absolute path first.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from modelcache.errors import UsageError
from modelcache.safepath import printable

KEY_LENGTH = 16
MAX_URI_LENGTH = 8192  # what common servers accept in a request line; longer is not a model URI
_LABEL_RE = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")
_KEY_RE = re.compile(r"^[0-9a-f]{16}$")
_SCHEME_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")

#: Schemes we know of -> the module under modelcache.sources that serves it. A module that is not
#: in this build makes the scheme "recognised but not supported" (exit 2), never a traceback.
SCHEMES: dict[str, str] = {
    "file": "file",
    "http": "http",
    "https": "http",
    "hf": "hf",
    "s3": "s3",
    "gs": "gcs",
    "az": "azure",
    "oci": "oci",
    "pvc": "pvc",
}

#: https URIs on these hosts are Azure Blob Storage, as KServe's storage initializer reads them.
AZURE_BLOB_HOST_SUFFIX = ".blob.core.windows.net"


def storage_key(uri: str) -> str:
    """KServe-compatible cache key of an exact URI string."""
    return hashlib.sha256(uri.encode("utf-8")).hexdigest()[:KEY_LENGTH]


def is_key(text: str) -> bool:
    return bool(_KEY_RE.match(text))


@dataclass(frozen=True)
class ModelURI:
    """A validated URI. `uri` is the exact string the key is computed from."""

    uri: str
    scheme: str
    host: str
    path: str

    @property
    def key(self) -> str:
        return storage_key(self.uri)

    @property
    def local_path(self) -> str:
        """Filesystem path of a file:// URI."""
        return unquote(self.path)


def parse_uri(text: str) -> ModelURI:
    """Validate a model URI (or a local path) and say exactly what is wrong with a bad one."""
    raw = text.strip()
    if not raw:
        raise UsageError("empty model URI")
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in raw):
        raise UsageError(f"malformed URI {_shown(raw)!r}: contains control characters")
    if len(raw) > MAX_URI_LENGTH:
        raise UsageError(f"malformed URI {_shown(raw)!r}: longer than {MAX_URI_LENGTH} characters")
    m = _SCHEME_RE.match(raw)
    if m is None:
        if "://" in raw or (re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+:", raw) and not os.path.exists(raw)):
            raise UsageError(
                f"malformed URI {redact(raw)!r}: expected scheme://..., e.g. https://host/model.tar.gz"
            )
        raw = "file://" + os.path.abspath(os.path.expanduser(raw))
        m = _SCHEME_RE.match(raw)
        assert m is not None
    scheme = m.group(1).lower()
    if scheme not in SCHEMES:
        known = ", ".join(sorted(SCHEMES))
        raise UsageError(f"unknown URI scheme {scheme!r} in {redact(raw)!r} (known: {known})")
    try:
        parts = urlsplit(raw)
        port = parts.port  # raises ValueError on a bad port
    except ValueError as exc:
        # urlsplit's own text quotes what it took for a port: with an unescaped '#', '/' or '?' in a
        # password, that is the start of the password. Say what is wrong without it.
        why = "bad port" if "port" in str(exc).lower() else "cannot be parsed"
        hint = " (escape '#', '/', '?', '@' in user-info as %23, %2F, %3F, %40)" if "@" in raw else ""
        raise UsageError(f"malformed URI {_shown(raw)!r}: {why}{hint}") from None
    del port
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise UsageError(f"malformed URI {redact(raw)!r}: file URIs take no host (use file:///abs/path)")
        if not parts.path.startswith("/"):
            raise UsageError(f"malformed URI {redact(raw)!r}: file URIs need an absolute path")
    elif scheme in ("http", "https"):
        if not parts.hostname or " " in parts.netloc:
            raise UsageError(f"malformed URI {redact(raw)!r}: no host")
        if (problem := host_problem(parts.hostname)) is not None:
            raise UsageError(f"malformed URI {redact(raw)!r}: {problem}")
        if parts.path in ("", "/"):
            raise UsageError(f"malformed URI {redact(raw)!r}: no path to a model file or archive")
    elif not parts.netloc and not parts.path.strip("/"):
        raise UsageError(f"malformed URI {redact(raw)!r}: nothing after {scheme}://")
    return ModelURI(uri=raw, scheme=scheme, host=parts.netloc, path=parts.path)


def host_problem(host: str) -> str | None:
    """Why `host` is neither an IP address nor a DNS name (RFC 1123 labels), or None."""
    try:
        ipaddress.ip_address(host.strip("[]"))
        return None
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253:
        return f"host name {printable(host)!r} is empty or longer than 253 characters"
    for label in name.split("."):
        if not _LABEL_RE.match(label):
            return f"host name {printable(host)!r} has an invalid label {printable(label)!r}"
    return None


def _shown(raw: str) -> str:
    return printable(redact(raw))


def sub_path(storage_uri: str, cache_uri: str) -> str | None:
    """'' when equal, '/rest' when storage_uri is below cache_uri, else None (slashes trimmed, as KServe)."""
    s, c = storage_uri.rstrip("/"), cache_uri.rstrip("/")
    if s == c:
        return ""
    if s.startswith(c + "/"):
        return s[len(c) :]
    return None


#: Every query and fragment value: a denylist of secret names always misses one (auth_token,
#: private_token, q-signature, percent-encoded names...), and nothing needs the values once the
#: key is computed from the exact URI.
_QUERY_VALUE = re.compile(r"([?&;#][^=&#;]*=)[^&#;]*")
_QUERY_BARE = re.compile(r"([?&;#])[^=&#;]+(?=[&#;]|$)")  # `?SECRET`: a value with no name


_HOST_LIKE = re.compile(r"[A-Za-z0-9._-]+(:\d+)?|\[[0-9A-Fa-f:.]+\](:\d+)?")


def _userinfo_end(rest: str, web: bool = False) -> int:
    """Where the user-info of `rest` (the text after `scheme://`) ends at its '@', or -1.

    The parser's answer when a host follows the authority's last '@'. Else a password was written
    unescaped ('/', '?', '#', '@' in it moves the parser's authority): then the user-info runs to the
    last '@' that a host follows, when a ':' comes before it (a password) or, for http(s), the host
    is a dotted name (a token with a '/' in it). Not user-info: s3://b/key@v2, oci://r:5000/m@sha256:..
    """
    authority_end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    std = rest.rfind("@", 0, authority_end)
    if std >= 0 and _HOST_LIKE.fullmatch(rest[std + 1 : authority_end]):
        return std
    for m in reversed(list(re.finditer("@", rest))):
        after = re.split(r"[/?#]", rest[m.start() + 1 :], maxsplit=1)[0]
        if _HOST_LIKE.fullmatch(after) and (":" in rest[: m.start()] or (web and "." in after)):
            return m.start()
    return std


def redact(uri: str) -> str:
    """A URI safe for logs, errors and status: no user-info, no signed or secret query parameters."""
    m = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)", uri)
    out = uri
    if m is not None:
        rest = uri[m.end() :]
        end = _userinfo_end(rest, web=m.group(1).lower() in ("http://", "https://"))
        if end >= 0:
            out = m.group(1) + "***" + rest[end:]
    out = _QUERY_VALUE.sub(lambda g: g.group(1) + "***", out)
    return _QUERY_BARE.sub(lambda g: g.group(1) + "***", out)
