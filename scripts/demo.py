"""`make demo`: the main job on the embedded default, with nothing from the internet.

Makes a sample model (a few files, one of them a few hundred MB) packed as a tar, serves it from a
local Range-capable origin on 127.0.0.1 that caps each connection (as CDNs and object stores do),
pulls it cold with progress, pulls it again warm, and shows `list` and the two timings.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / ".demo"
MiB = 1 << 20
WEIGHTS_MB = int(os.environ.get("DEMO_WEIGHTS_MB", "300"))
RATE = os.environ.get("DEMO_RATE_PER_CONNECTION", str(20 * MiB))


def make_model(root: Path) -> Path:
    archive = root / "tiny-llm.tar"
    if archive.exists():
        return archive
    src = root / "tiny-llm"
    src.mkdir(parents=True, exist_ok=True)
    (src / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": 2048}\n')
    (src / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}\n')
    (src / "generation_config.json").write_text('{"max_new_tokens": 256}\n')
    block = os.urandom(MiB)
    with open(src / "model.safetensors", "wb") as f:
        for i in range(WEIGHTS_MB):
            f.write(block[i % 997 :] + block[: i % 997])  # cheap, but no two blocks alike
    with tarfile.open(archive, "w") as tf:
        tf.add(src, arcname=".")
    shutil.rmtree(src)
    return archive


def modelcache(*args: str, home: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(REPO / ".venv/bin/modelcache"), "--home", str(home), *args],
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"demo: `modelcache {' '.join(args)}` failed with exit {proc.returncode}")
    return elapsed, proc.stdout


def main() -> None:
    origin_dir, home = WORK / "origin", WORK / "cache"
    origin_dir.mkdir(parents=True, exist_ok=True)
    print(f"==> making a sample model ({WEIGHTS_MB} MB of weights + json files) in {origin_dir}")
    archive = make_model(origin_dir)
    shutil.rmtree(home, ignore_errors=True)
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.support.origin", "--root", str(origin_dir), "--rate-limit", RATE],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert server.stdout is not None
        port = server.stdout.readline().strip().removeprefix("PORT=")
        url = f"http://127.0.0.1:{port}/{archive.name}"
        rate_mb = int(RATE) / MiB
        print(f"==> origin on 127.0.0.1:{port}, capped at {rate_mb:.0f} MiB/s per connection")
        print(f"==> cold pull: modelcache pull {url}")
        cold, out = modelcache("pull", url, home=home)
        print(out.strip())
        print("==> warm pull (same URI again)")
        warm, out = modelcache("pull", url, home=home)
        print(out.strip())
        path_t, out = modelcache("path", url, home=home)
        print(f"==> modelcache path {url}\n{out.strip()}")
        print("==> modelcache list")
        _, out = modelcache("list", home=home)
        print(out.rstrip())
        _, out = modelcache("verify", "--full", home=home)
        print(f"==> modelcache verify --full\n{out.rstrip()}")
    finally:
        server.terminate()
        server.wait(timeout=10)
    size = archive.stat().st_size
    single = size / int(RATE)
    print()
    rate = size / MiB / cold
    print(f"cold pull : {cold:6.2f} s  ({rate:.0f} MiB/s; one capped connection would need {single:.0f} s)")
    print(f"warm pull : {warm * 1000:6.0f} ms (whole process)")
    print(f"path      : {path_t * 1000:6.0f} ms (whole process)")


if __name__ == "__main__":
    main()
