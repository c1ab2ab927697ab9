"""Object listings that name paths outside the model directory are refused (exit 4), nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.support.fake_listings import FakeListings

HOSTILE = [
    "models/../../../outside/x",
    "models/a/../../../outside/y",
    "models/a//outside/z",
    "models/./x",
    "models/a\x00b",
    "models/a\\..\\..\\outside\\w",
    "models/" + "n" * 300,
]
CLEAN_ENV = {
    "GOOGLE_APPLICATION_CREDENTIALS": "",
    "AZURE_STORAGE_ACCESS_KEY": "",
    "AZ_CLIENT_ID": "",
    "AZURE_CLIENT_ID": "",
}


def _pull(
    tmp_path: Path, scheme: str, names: list[str], *, endless: bool = False, huge: bool = False, **extra: str
) -> tuple[int, str, list[str]]:
    with FakeListings(names, endless=endless, huge=huge) as fake:
        if scheme == "gs":
            env = {**CLEAN_ENV, "STORAGE_EMULATOR_HOST": fake.endpoint}
            uri = "gs://bucket/models"
        else:
            conn = f"AccountName=acct;BlobEndpoint={fake.endpoint}/acct"
            env = {**CLEAN_ENV, "AZURE_STORAGE_CONNECTION_STRING": conn}
            uri = "az://container/models"
        proc = run_cli(tmp_path / "cache", "--quiet", "pull", uri, **env, **extra)
        if endless:
            assert fake.pages <= 4, fake.pages  # refused as soon as the cap was passed
        return proc.returncode, proc.stderr, list(fake.downloads)


@pytest.mark.parametrize("scheme", ["gs", "az"])
@pytest.mark.parametrize("name", HOSTILE)
def test_listing_with_unsafe_name_is_refused(scheme: str, name: str, tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    code, stderr, downloads = _pull(tmp_path, scheme, ["models/ok.bin", name])
    if scheme == "az" and "\x00" in name:  # XML cannot carry NUL: the listing itself is unreadable
        assert code == 6 and "unreadable" in stderr, stderr
    else:
        assert code == 4, stderr
        assert "unsafe" in stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert downloads == []  # refused at resolve, before a byte is fetched
    assert not any((tmp_path / "outside").iterdir())
    planted = {"x", "y", "z", "w"}  # the last segments the hostile names would create
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name in planted]
    assert written == [], written
    models = tmp_path / "cache" / "models"
    assert not models.exists() or not any(models.iterdir())


@pytest.mark.parametrize("scheme", ["gs", "az"])
def test_a_clean_listing_still_works(scheme: str, tmp_path: Path) -> None:
    code, stderr, downloads = _pull(tmp_path, scheme, ["models/ok.bin", "models/sub/dir/b.bin"])
    assert code == 0, stderr
    assert sorted(downloads) == ["models/ok.bin", "models/sub/dir/b.bin"]
    (model,) = (tmp_path / "cache" / "models").iterdir()
    assert (model / "sub" / "dir" / "b.bin").read_bytes() == b"not a model\n"


@pytest.mark.parametrize("scheme", ["gs", "az"])
def test_a_listing_that_does_not_end_is_refused_at_the_file_cap(scheme: str, tmp_path: Path) -> None:
    """Every page names 1000 new objects and a next page: refused once past MODELCACHE_MAX_FILES
    (exit 6, one line), not listed until memory or the resolve deadline runs out."""
    code, stderr, downloads = _pull(tmp_path, scheme, [], endless=True, MODELCACHE_MAX_FILES="2500")
    assert code == 6, stderr
    assert "more than 2500 files" in stderr and "MODELCACHE_MAX_FILES" in stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert downloads == []
    code, stderr, _ = _pull(tmp_path, scheme, ["models/ok.bin"], MODELCACHE_MAX_FILES="many")
    assert code == 2 and "MODELCACHE_MAX_FILES" in stderr, stderr


@pytest.mark.parametrize("scheme", ["gs", "az"])
def test_an_oversized_listing_page_is_refused_past_64_mib(scheme: str, tmp_path: Path) -> None:
    """A well-formed but 65 MiB page (chunked, so no Content-Length warns us): read up to the
    metadata limit and refused (exit 6), where it used to be read whole and parsed (exit 3, no files)."""
    code, stderr, downloads = _pull(tmp_path, scheme, [], huge=True)
    assert code == 6, stderr
    assert "larger than 64 MiB" in stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert downloads == []
