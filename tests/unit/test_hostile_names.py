"""Pure rules for hostile input: response checks, redaction, safe names, URI parsing (plus fuzzing)."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelcache.errors import ModelcacheError, UsageError
from modelcache.safepath import UnsafeNameError, join_under, safe_relpath
from modelcache.sources.transport import Expect, check_response, parse_content_range, same_origin
from modelcache.uri import parse_uri, redact

SIZE = 1000


def want(start: int = 0, end: int | None = None, ranged: bool = True, etag: str | None = '"v1"') -> Expect:
    return Expect(start, end if end is not None else SIZE, SIZE, ranged, etag=etag)


@pytest.mark.parametrize(
    ("status", "headers", "expect", "reason"),
    [
        (206, {"Content-Range": "bytes 100-199/1000", "Content-Length": "100"}, want(100, 200), None),
        (206, {"Content-Range": "bytes 101-200/1000"}, want(100, 200), "asked for bytes 100-199"),
        (206, {"Content-Range": "bytes 100-149/1000"}, want(100, 200), "asked for bytes 100-199"),
        (206, {"Content-Range": "bytes 100-199/1001"}, want(100, 200), "now 1001 bytes"),
        (206, {"Content-Range": "bytes 100+199"}, want(100, 200), "unparseable"),
        (206, {"Content-Range": "bytes 199-100/1000"}, want(100, 200), "unparseable"),
        (206, {}, want(0, SIZE, ranged=False), "without a Range"),
        (206, {"Content-Range": "bytes 0-999/1000"}, want(0, SIZE, ranged=False), None),
        (200, {"Content-Length": "1000"}, want(100, 200), "ignored the byte range"),
        (200, {"Content-Length": "1000"}, want(0, SIZE, ranged=False), None),
        (200, {"Content-Length": "1001"}, want(0, SIZE, ranged=False), "Content-Length"),
        (200, {"Content-Length": "-5"}, want(0, SIZE, ranged=False), "Content-Length"),
        (
            206,
            {"Content-Range": "bytes 100-199/1000", "Content-Length": "99"},
            want(100, 200),
            "Content-Length",
        ),
        (206, {"Content-Range": "bytes 100-199/1000", "ETag": '"v2"'}, want(100, 200), "ETag differs"),
        (206, {"Content-Range": "bytes 100-199/1000", "ETag": 'W/"v1"'}, want(100, 200), None),
        (204, {}, want(100, 200), "unexpected HTTP 204"),
    ],
)
def test_check_response(status: int, headers: dict[str, str], expect: Expect, reason: str | None) -> None:
    got = check_response(status, headers, expect)
    assert (got is None) == (reason is None), got
    if reason:
        assert got is not None and reason in got


def test_last_modified_is_the_validator_only_without_etag() -> None:
    w = Expect(0, 10, 10, False, etag=None, modified="Tue, 14 Nov 2023 22:13:20 GMT")
    assert check_response(200, {"Last-Modified": "Tue, 14 Nov 2023 22:30:00 GMT"}, w)
    assert check_response(200, {"Last-Modified": "Tue, 14 Nov 2023 22:13:20 GMT"}, w) is None


def test_parse_content_range() -> None:
    assert parse_content_range("bytes 0-9/10") == (0, 10, 10)
    assert parse_content_range("bytes 0-9/*") == (0, 10, None)
    assert parse_content_range("bytes 5-10/10") is None  # past the end
    assert parse_content_range("items 0-9/10") is None


def test_same_origin() -> None:
    assert same_origin("http://a:80/x", "http://A/y")
    assert not same_origin("http://a/x", "https://a/x")
    assert not same_origin("http://a:8080/x", "http://a:8081/x")
    assert not same_origin("http://127.0.0.1/x", "http://127.0.0.2/x")


@pytest.mark.parametrize(
    ("uri", "hidden"),
    [
        ("https://user:pa/ss@host/x", "pa/ss"),
        ("https://u:p#q@host/x", "p#q"),
        ("https://u:p?x@host/m", "p?x"),
        ("https://u:p@ss@host/a@b", "p@ss"),
        ("https://tok@host/x", "tok"),
        ("https://h/x?X-Amz-Signature=abc&X-Amz-Credential=cred", "abc"),
        ("https://h/x?password=pw1&client_secret=cs1", "pw1"),
        ("https://h/x?password=pw1&client_secret=cs1", "cs1"),
        ("https://h/x?code=oauthcode", "oauthcode"),
        ("https://h/x?AWSAccessKeyId=AKIA1", "AKIA1"),
        ("https://acct.blob.core.windows.net/c/p?sv=2020&sig=s1g&se=2030", "s1g"),
        ("https://h/x#access_token=frag", "frag"),
        ("https://u:12/34@localhost/x", "12/34"),
        ("http://a:b/c@minio:9000/bkt/x", "b/c"),
        ("https://h/m?auth_token=S1&private_token=T1", "S1"),
        ("https://h/m?auth_token=S1&private_token=T1", "T1"),
        ("https://h/m?%73ig=PCT1", "PCT1"),
        ("https://h/m?q-signature=QS1", "QS1"),
        ("https://h/m?BARESECRET1", "BARESECRET1"),
    ],
)
def test_redact(uri: str, hidden: str) -> None:
    out = redact(uri)
    assert hidden not in out and "***" in out


@pytest.mark.parametrize(
    "uri", ["s3://bucket/key@v2", "https://h/p/a@b", "hf://org/model", "oci://reg:5000/m/t@sha256:60bc00"]
)
def test_redact_leaves_paths_alone(uri: str) -> None:
    assert redact(uri) == uri


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", "a/../b", "/abs", "a\\b", "a\x00b", "a\nb", "a//b", "./a", "x" * 256, "a/" * 600 + "b"],
)
def test_unsafe_names(name: str) -> None:
    with pytest.raises(UnsafeNameError) as err:
        safe_relpath(name)
    assert err.value.exit_code == 4 and "\n" not in str(err.value)


def test_lenient_names_for_archives() -> None:
    assert safe_relpath("./a//b/", lenient=True) == "a/b"
    with pytest.raises(UnsafeNameError):
        safe_relpath("./a/../../b", lenient=True)


def test_join_under_refuses_symlinks(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path / "out")
    with pytest.raises(UnsafeNameError):
        join_under(tmp_path / "root", "link/x")
    assert join_under(tmp_path / "root", "new/x") == tmp_path / "root" / "new" / "x"


@pytest.mark.parametrize(
    "uri",
    [
        "http://a..b/x",
        "http:///x",
        "http://" + "a" * 64 + ".io/x",
        "http://-x.io/m",
        "http://h/" + "p" * 9000,
    ],
)
def test_bad_hosts_and_lengths_are_usage_errors(uri: str) -> None:
    with pytest.raises(UsageError):
        parse_uri(uri)


# -- fuzzing -----------------------------------------------------------------------------------
_URI_ALPHABET = string.ascii_letters + string.digits + ":/?#[]@!$&'()*+,;=%-._~ \\\x00\r\n\x7f\u0085é"
_SCHEMES = st.sampled_from(
    ["http://", "https://", "s3://", "gs://", "az://", "hf://", "oci://", "pvc://", "file://", ""]
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scheme=_SCHEMES, rest=st.text(alphabet=_URI_ALPHABET, max_size=120))
def test_fuzz_parse_uri_is_usage_error_or_valid(scheme: str, rest: str) -> None:
    """Any text: a ModelURI or a one-line UsageError; never another exception, never a control char."""
    try:
        uri = parse_uri(scheme + rest)
    except UsageError as exc:
        msg = str(exc)
        assert "\n" not in msg and "\r" not in msg and "\x00" not in msg
        return
    assert uri.key and len(uri.key) == 16


@settings(max_examples=300, deadline=None)
@given(
    user=st.text(min_size=1, max_size=12),
    pw=st.text(min_size=4, max_size=24),
    host=st.from_regex(r"[a-z]{1,10}\.io", fullmatch=True),
)
def test_fuzz_password_never_survives_redaction(user: str, pw: str, host: str) -> None:
    secret = "Zq" + pw + "Zq"  # the marker makes a leak unambiguous
    out = redact(f"https://{user}:{secret}@{host}/model.bin")
    assert secret not in out
    try:
        parse_uri(f"https://{user}:{secret}@{host}/model.bin")
    except ModelcacheError as exc:
        assert secret not in str(exc)


@settings(max_examples=400, deadline=None)
@given(name=st.text(max_size=80))
def test_fuzz_safe_relpath_stays_inside(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    try:
        rel = safe_relpath(name)
    except UnsafeNameError as exc:
        assert "\n" not in str(exc)
        return
    root = Path("/nonexistent-root")
    joined = (root / rel).resolve()
    assert joined.is_relative_to(root) and joined != root
