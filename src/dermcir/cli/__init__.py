"""The ``dermcir`` command: ``prepare | train | cv | compare | index | search | serve | demo``.

Each sub-command is a thin wrapper over library functions; heavy imports happen inside the handlers so that
``dermcir --help`` starts fast. The library never imports this package.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import sys
import threading

from dermcir import __version__
from dermcir.cli import compare as _compare
from dermcir.cli import core as _core
from dermcir.cli import search as _search
from dermcir.cli._waits import LOG_FORMAT, exit_once


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dermcir", description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (_core, _compare, _search):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; ``argv=None`` means this process is the ``dermcir`` command itself (its arguments are
    ``sys.argv``), which also makes a Ctrl+C after the command's work is done end it quietly."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format=LOG_FORMAT)
    if getattr(args, "quiet", True) is False and not sys.stderr.isatty():
        # in a log file a bar is every update after a carriage return on one line, with log records glued to its
        # end; the log lines (per epoch, per fold, the summaries) say the same there
        args.quiet = True
    previous = _exit_on_sigterm()
    try:
        code = int(args.handler(args) or 0)
        sys.stdout.flush()  # a reader that stopped early (`| head`) shows here, not at the interpreter's exit
        return code
    except BrokenPipeError as exc:
        if not _stdout_reader_gone():  # another pipe (a worker process's): an error to report like any other
            return _report(args, exc)
        # the reader stopped: not the user's error, and nothing to say (as `cat file | head`)
        _discard_stdout()
        return 141  # 128 + SIGPIPE, what a shell reports for a command its pipe's reader stopped
    except (ValueError, OSError) as exc:  # user errors: one clear line, no traceback (but with -v)
        # OSError: a path that cannot be read or written (a PermissionError on --out, a folder given for a file, ...)
        return _report(args, exc)
    except KeyboardInterrupt:  # Ctrl+C: the command's clean-up has run (finally blocks); no traceback (but with -v)
        logging.getLogger("dermcir").debug("%s interrupted", args.command, exc_info=True)
        print(f"dermcir {args.command}: interrupted", file=sys.stderr)
        return 130  # the shell's code for a command ended by SIGINT
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if argv is None and threading.current_thread() is threading.main_thread():
            # the work is done and said; the interpreter's shutdown (joining tqdm's monitor and other threads) takes
            # a second or two, and a Ctrl+C then printed a traceback over the result
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def _report(args: argparse.Namespace, exc: Exception) -> int:
    logging.getLogger("dermcir").debug("%s failed", args.command, exc_info=exc)  # the traceback with -v
    print(f"dermcir {args.command}: error: {_one_line(exc)}", file=sys.stderr)
    return 2


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll reports an error on its write end)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no file descriptor (a test's capture), or no poll (Windows)
        return False


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush of what is still buffered finds no broken pipe
    (it would print "Exception ignored ... BrokenPipeError" and exit 120)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout replaced by an object without a file descriptor (a test's capture)
        pass


def _exit_on_sigterm():
    """Make SIGTERM (``timeout``, ``kill``, a batch system's stop) a ``SystemExit``, so that a stopped command still
    runs its clean-up: worker processes stopped, temporary files removed, the run's log ended with why it stopped.
    Python's default for SIGTERM ends the process at once. Returns the previous handler (None: not installed, as
    outside the main thread, where signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, exit_once)


def _one_line(exc: Exception) -> str:
    """The error as one line, naming the path of an operating-system error ("PATH: Permission denied")."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        target = f" -> {exc.filename2}" if exc.filename2 is not None else ""
        return f"{exc.filename}{target}: {exc.strerror}"
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.splitlines())


if __name__ == "__main__":
    sys.exit(main())
