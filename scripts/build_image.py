#!/usr/bin/env python3
"""Build the modelcache image offline (no registry, no Docker): a docker-archive tar for `ctr images import`.

    .venv/bin/python scripts/build_image.py [--out dist/modelcache-image.tar] [--tag modelcache:VERSION]

Three layers, so that a code change rebuilds only the last one in seconds:

1. base: Debian minbase (`mmdebstrap`) with python3, python3-venv, ca-certificates, and a passwd/group
   entry for uid/gid 65532 (kopf calls getpwuid; a uid without an entry kills it at start);
2. deps: a venv at /opt/modelcache with our run-time dependencies pinned to the versions in the venv
   running this script (the ones the tests ran against), installed with the image's own python;
3. app: our wheel unpacked into that venv, byte-compiled (unchecked-hash pycs: the root filesystem
   is read-only at run time), plus /opt/modelcache/bin/modelcache.

Layers 1 and 2 are cached under ~/.cache/modelcache/image/, keyed by a hash of their inputs.
One image for controller, webhook, agent and initializer: entrypoint `modelcache`, user 65532,
HOME=/tmp (mount an emptyDir there; the root filesystem can stay read-only).
Needs root (mmdebstrap's root mode and chroot) and the venv (`make` creates it).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUITE = "bookworm"
MIRRORS = [
    f"deb http://deb.debian.org/debian {SUITE} main",
    f"deb http://deb.debian.org/debian {SUITE}-updates main",
    f"deb http://deb.debian.org/debian-security {SUITE}-security main",
]
PACKAGES = ["python3", "python3-venv", "ca-certificates"]
UID = GID = 65532
USER = "nonroot"
VENV = "opt/modelcache"
#: Bump to invalidate a cached layer whose recipe (not its declared inputs) changed.
BASE_RECIPE = 2
DEPS_RECIPE = 1
#: Fixed timestamp for the files we write (mmdebstrap honours SOURCE_DATE_EPOCH for the base).
EPOCH = 1700000000
DPKG_EXCLUDES = [
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/info/*",
]


def log(msg: str) -> None:
    print(f"[build-image] {msg}", file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def key_of(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


# --- layer tars -----------------------------------------------------------------------------------


def _normalise(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    """No host user names; device nodes stay out (the runtime provides /dev)."""
    if info.ischr() or info.isblk() or info.isfifo():
        return None
    info.uname = info.gname = ""
    return info


def write_layer(root: Path, members: Iterable[str], out: Path, mtime: int | None = None) -> str:
    """Tar `members` (paths relative to `root`, in this order, not recursive) to `out`; sha256 hex."""
    tmp = out.with_suffix(".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for rel in members:
            info = tar.gettarinfo(str(root / rel), arcname=rel)
            kept = _normalise(info)
            if kept is None:
                continue
            if mtime is not None:
                kept.mtime = mtime
            if kept.isreg():
                with (root / rel).open("rb") as fh:
                    tar.addfile(kept, fh)
            else:
                tar.addfile(kept)
    digest = sha256_file(tmp)
    tmp.replace(out)
    return digest


def walk(root: Path, top: str, parents: bool = True) -> list[str]:
    """`top` and everything below it, sorted; with `parents`, its ancestors first."""
    out: list[str] = []
    if parents:
        parts = Path(top).parts
        out.extend(str(Path(*parts[:i])) for i in range(1, len(parts)))
    out.append(top)
    for dirpath, dirnames, filenames in os.walk(root / top):
        dirnames.sort()
        rel = Path(dirpath).relative_to(root)
        out.extend(str(rel / n) for n in sorted([*dirnames, *filenames]))
    return out


@dataclass
class Layer:
    path: Path
    diff_id: str
    cached: bool
    seconds: float


def cached_layer(directory: Path, build: Callable[[Path], str]) -> Layer:
    """Reuse `directory/layer.tar` when its digest was recorded, else build it (atomically)."""
    started = time.monotonic()
    layer, digest_file = directory / "layer.tar", directory / "diff_id"
    if layer.is_file() and digest_file.is_file():
        return Layer(layer, digest_file.read_text().strip(), True, time.monotonic() - started)
    directory.mkdir(parents=True, exist_ok=True)
    digest = build(layer)
    digest_file.write_text(digest + "\n")
    return Layer(layer, digest, False, time.monotonic() - started)


# --- inputs ---------------------------------------------------------------------------------------


def pinned_dependencies() -> list[str]:
    """`name==version` for modelcache's run-time dependency closure, as installed in this venv."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    done: set[tuple[str, str]] = set()  # (distribution, extra) whose requirements were followed
    todo: list[tuple[str, str]] = [("modelcache", "")]
    while todo:
        dist, extra = todo.pop()
        if (dist, extra) in done:
            continue
        done.add((dist, extra))
        for text in distribution(dist).requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": extra}):
                continue
            if req.marker is None and extra:
                continue  # unconditional requirements were followed with extra ""
            name = canonicalize_name(req.name)
            if name not in pins:
                try:
                    pins[name] = distribution(req.name).version
                except PackageNotFoundError:
                    sys.exit(f"{name} is not installed in {sys.prefix}: run `make` first (it pins the image)")
            todo.extend((req.name, e) for e in ["", *sorted(req.extras)])
    return [f"{n}=={v}" for n, v in sorted(pins.items())]


def build_wheel(dest: Path) -> Path:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(dest),
            str(REPO),
        ],
        check=True,
    )
    (wheel,) = dest.glob("modelcache-*.whl")
    return wheel


# --- base -----------------------------------------------------------------------------------------


def build_rootfs(rootfs: Path) -> None:
    """Debian minbase + python3, with the non-root user; docs, man pages, apt lists removed."""
    if shutil.which("mmdebstrap") is None:
        sys.exit("mmdebstrap not found: apt-get install mmdebstrap (scripts/build-image.sh does)")
    if rootfs.exists():
        shutil.rmtree(rootfs)
    cleanup = 'rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/* "$1"/tmp/*'
    argv = [
        "mmdebstrap",
        "--mode=root",
        "--variant=minbase",
        f"--include={','.join(PACKAGES)}",
        *[f"--dpkgopt={o}" for o in DPKG_EXCLUDES],
        f"--customize-hook={cleanup}",
        SUITE,
        str(rootfs),
        *MIRRORS,
    ]
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(EPOCH)}
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
    with (rootfs / "etc" / "passwd").open("a") as fh:
        fh.write(f"{USER}:x:{UID}:{GID}:modelcache:/home/{USER}:/usr/sbin/nologin\n")
    with (rootfs / "etc" / "group").open("a") as fh:
        fh.write(f"{USER}:x:{GID}:\n")
    home = rootfs / "home" / USER
    home.mkdir(parents=True, exist_ok=True)
    os.chown(home, UID, GID)
    home.chmod(0o750)


def python_version(rootfs: Path) -> str:
    """`python3.11` (the image's python, from the /usr/bin/python3 symlink)."""
    return os.readlink(rootfs / "usr" / "bin" / "python3").split("/")[-1]


# --- deps -----------------------------------------------------------------------------------------


def download_wheels(pins: list[str], dest: Path, pyver: str) -> None:
    """Binary wheels for the image's python and platform, from the package index (pip's cache)."""
    (dest / "requirements.txt").write_text("\n".join(pins) + "\n")
    short = pyver.removeprefix("python").replace(".", "")
    platforms = ["manylinux_2_36_x86_64", *[f"manylinux_2_{m}_x86_64" for m in range(35, 4, -1)]]
    argv = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    argv += ["--python-version", short, "--implementation", "cp", "--abi", f"cp{short}", "--abi", "abi3"]
    argv += ["--abi", "none", *[x for p in [*platforms, "linux_x86_64", "any"] for x in ("--platform", p)]]
    subprocess.run([*argv, "-d", str(dest), "-r", str(dest / "requirements.txt")], check=True)


def install_deps(rootfs: Path, wheels: Path) -> None:
    """A venv at /opt/modelcache with the pinned wheels, made by the image's python in a chroot."""
    inside = rootfs / "tmp" / "wheels"
    shutil.rmtree(rootfs / VENV, ignore_errors=True)
    shutil.rmtree(inside, ignore_errors=True)
    shutil.copytree(wheels, inside)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}

    def chroot(*argv: str) -> None:
        subprocess.run(["chroot", str(rootfs), *argv], check=True, env=env, stdout=subprocess.DEVNULL)

    try:
        chroot("python3", "-m", "venv", f"/{VENV}")
        pip = f"/{VENV}/bin/pip"
        chroot(pip, "install", "-q", "--no-cache-dir", "--no-index", "--find-links", "/tmp/wheels",
               "-r", "/tmp/wheels/requirements.txt")  # fmt: skip
        chroot(pip, "uninstall", "-q", "-y", "pip", "setuptools")
    finally:
        shutil.rmtree(inside, ignore_errors=True)


# --- app ------------------------------------------------------------------------------------------

ENTRY = f"""#!/{VENV}/bin/python
import sys

from modelcache.cli.main import main

sys.exit(main())
"""


def build_app_layer(wheel: Path, pyver: str, out: Path) -> str:
    """Our wheel unpacked into the venv's site-packages, compiled, plus the `modelcache` command."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        site = root / VENV / "lib" / pyver / "site-packages"
        site.mkdir(parents=True)
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(site)
        if f"python{sys.version_info.major}.{sys.version_info.minor}" == pyver:
            subprocess.run(
                [sys.executable, "-m", "compileall", "-q", "-j", "0", "--invalidation-mode", "unchecked-hash",
                 "-d", f"/{VENV}/lib/{pyver}/site-packages", str(site / "modelcache")],
                check=True,
            )  # fmt: skip
        else:
            log(f"not byte-compiling: this python is not the image's {pyver}")
        bindir = root / VENV / "bin"
        bindir.mkdir()
        (bindir / "modelcache").write_text(ENTRY)
        (bindir / "modelcache").chmod(0o755)
        for path in [root / "opt", *(p for p in (root / "opt").rglob("*"))]:
            if path.is_dir():
                path.chmod(0o755)
            elif path.name != "modelcache" or path.parent != bindir:
                path.chmod(0o644)
        return write_layer(root, walk(root, "opt", parents=False), out, mtime=EPOCH)


# --- archive --------------------------------------------------------------------------------------


def image_config(diff_ids: list[str], version: str) -> dict[str, object]:
    return {
        "architecture": "amd64",
        "os": "linux",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(EPOCH)),
        "config": {
            "User": f"{UID}:{GID}",
            "Entrypoint": ["modelcache"],
            "Cmd": ["--help"],
            "WorkingDir": "/tmp",
            "Env": [
                f"PATH=/{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "HOME=/tmp",  # writable via an emptyDir; the root filesystem is read-only
                "LANG=C.UTF-8",
                "PYTHONDONTWRITEBYTECODE=1",
                "PYTHONUNBUFFERED=1",
            ],
            "Labels": {
                "org.opencontainers.image.title": "modelcache",
                "org.opencontainers.image.version": version,
                "org.opencontainers.image.licenses": "Apache-2.0",
            },
        },
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{d}" for d in diff_ids]},
        "history": [{"created_by": f"build_image.py: {what}"} for what in ("base", "deps", "app")],
    }


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), EPOCH
    tar.addfile(info, io.BytesIO(data))


def write_archive(out: Path, tag: str, layers: list[Layer], version: str) -> None:
    """`docker save` format: manifest.json, the config blob, one directory per layer."""
    config = json.dumps(image_config([layer.diff_id for layer in layers], version), sort_keys=True).encode()
    config_id = hashlib.sha256(config).hexdigest()
    manifest = [
        {
            "Config": f"{config_id}.json",
            "RepoTags": [tag],
            "Layers": [f"{layer.diff_id}/layer.tar" for layer in layers],
        }
    ]
    repo, _, ref = tag.rpartition(":")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with tarfile.open(tmp, "w") as tar:
        _add_bytes(tar, f"{config_id}.json", config)
        for layer in layers:
            tar.add(str(layer.path), arcname=f"{layer.diff_id}/layer.tar")
        _add_bytes(tar, "manifest.json", json.dumps(manifest).encode())
        _add_bytes(tar, "repositories", json.dumps({repo: {ref: layers[-1].diff_id}}).encode())
    tmp.replace(out)


def main() -> int:
    sys.path.insert(0, str(REPO / "src"))
    from modelcache import __version__

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "dist" / "modelcache-image.tar")
    ap.add_argument("--tag", default=f"localhost/modelcache:{__version__}")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "modelcache" / "image")
    ap.add_argument("--rebuild", action="store_true", help="ignore cached base and deps layers")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("build_image.py needs root (mmdebstrap --mode=root, chroot)")

    started = time.monotonic()
    pins = pinned_dependencies()
    base_key = key_of(BASE_RECIPE, SUITE, MIRRORS, PACKAGES, DPKG_EXCLUDES, UID, USER)
    base_dir = args.cache / f"base-{base_key}"
    rootfs = base_dir / "rootfs"
    if args.rebuild:
        shutil.rmtree(base_dir, ignore_errors=True)

    def build_base(out: Path) -> str:
        log(f"base: mmdebstrap {SUITE} minbase + {', '.join(PACKAGES)} (about a minute)")
        build_rootfs(rootfs)
        return write_layer(rootfs, walk(rootfs, ".", parents=False)[1:], out)

    base = cached_layer(base_dir, build_base)
    if not rootfs.is_dir():  # layer cached but rootfs removed: rebuild both
        shutil.rmtree(base_dir)
        base = cached_layer(base_dir, build_base)
    pyver = python_version(rootfs)
    deps_dir = args.cache / f"deps-{key_of(DEPS_RECIPE, base.diff_id, pins)}"
    if args.rebuild:
        shutil.rmtree(deps_dir, ignore_errors=True)

    def build_deps(out: Path) -> str:
        log(f"deps: {len(pins)} pinned packages into /{VENV}")
        with tempfile.TemporaryDirectory() as tmp:
            download_wheels(pins, Path(tmp), pyver)
            install_deps(rootfs, Path(tmp))
        try:
            return write_layer(rootfs, walk(rootfs, VENV), out)
        finally:
            shutil.rmtree(rootfs / VENV, ignore_errors=True)

    deps = cached_layer(deps_dir, build_deps)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = build_wheel(Path(tmp))
        app_tar = Path(tmp) / "app.tar"
        app_digest = build_app_layer(wheel, pyver, app_tar)
        app = Layer(app_tar, app_digest, False, time.monotonic() - t0)
        layers = [base, deps, app]
        write_archive(args.out, args.tag, layers, __version__)
    total = sum(layer.path.stat().st_size for layer in (base, deps)) + app_tar_size(args.out, app_digest)
    for name, layer in zip(("base", "deps", "app"), layers, strict=True):
        how = "cached" if layer.cached else f"built in {layer.seconds:.1f} s"
        log(f"{name:5} sha256:{layer.diff_id[:12]} {how}")
    log(f"{args.out}: {args.tag}, {total / 1e6:.0f} MB uncompressed, {time.monotonic() - started:.1f} s")
    print(args.out)
    return 0


def app_tar_size(archive: Path, digest: str) -> int:
    with tarfile.open(archive) as tar:
        return tar.getmember(f"{digest}/layer.tar").size


if __name__ == "__main__":
    sys.exit(main())
