"""Entry point. `path` takes a fast route that never imports typer, rich or asyncio, because
inference launch scripts call it on every start (target: well under 250 ms as a whole process).
Every other command goes through the typer app. All errors end as one line and an exit code.
"""

from __future__ import annotations

import os
import sys

from modelcache.errors import EXIT_INTERNAL, ModelcacheError

_GLOBAL_FLAGS = {"--debug", "--quiet", "-q"}
_GLOBAL_OPTS = {"--home", "--log-format"}


def fail(message: str, code: int) -> int:
    """One line on stderr, control characters escaped (a URI or file name may carry any)."""
    from modelcache.safepath import printable

    sys.stderr.write(f"modelcache: error: {printable(message, 4000)}\n")
    return code


def _traceback() -> None:
    """--debug: the traceback goes to stderr, the exit code stays what it would have been."""
    import traceback

    traceback.print_exc(file=sys.stderr)


def _fast_path(argv: list[str]) -> int | None:
    """Handle `[globals] path REF` without typer. None: not this shape, use the full CLI."""
    home: str | None = None
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        arg = argv[i]
        if arg in _GLOBAL_FLAGS:
            i += 1
        elif arg in _GLOBAL_OPTS and i + 1 < len(argv):
            if arg == "--home":
                home = argv[i + 1]
            i += 2
        elif arg.startswith("--home="):
            home = arg.split("=", 1)[1]
            i += 1
        else:
            return None
    rest = argv[i:]
    if len(rest) != 2 or rest[0] != "path" or rest[1].startswith("-"):
        return None
    from modelcache.store import Store
    from modelcache.uri import redact

    store = Store(home)
    rec = store.lookup(rest[1])
    if rec is None:
        return fail(f"not cached: {redact(rest[1])}", 3)
    store.touch(rec.key)
    sys.stdout.write(f"{rec.path}\n")
    return 0


def _few_malloc_arenas() -> None:
    """glibc gives threads that allocate their own heap arenas (up to 8 per core): a pull's
    tokio, write and hash threads then hold ~60 MB of fragmented memory (RSS 190 -> 135 MB for a
    1 GiB s3 pull at 32 connections, same speed). Two arenas, unless MALLOC_ARENA_MAX says."""
    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return
    import contextlib
    import ctypes

    # not glibc (musl has no such arenas): nothing to do
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(-8, 2)  # M_ARENA_MAX; before any thread has started


def main() -> None:
    argv = sys.argv[1:]
    debug = "--debug" in argv or os.environ.get("MODELCACHE_DEBUG") == "1"
    if argv and argv[0] in ("--version", "-V"):  # before typer: it has no app-level version option
        from modelcache import __version__

        sys.stdout.write(f"modelcache {__version__}\n")
        sys.exit(0)
    try:
        code = _fast_path(argv)
        if code is None:
            _few_malloc_arenas()
            from modelcache.cli.app import run

            code = run(argv)
    except ModelcacheError as exc:
        if debug:
            _traceback()
        code = fail(exc.message, exc.exit_code)
    except KeyboardInterrupt:
        code = fail("interrupted", 130)
    except Exception as exc:
        if debug:
            _traceback()
        code = fail(
            f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for a traceback)", EXIT_INTERNAL
        )
    sys.exit(code)


if __name__ == "__main__":
    main()
