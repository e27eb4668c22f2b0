"""The ``parley`` command: run, chat, check, audit, forget and feedback for a bot's TOML
file."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from core.app import Adapter, adapter_registry, build_adapters, build_engine, serve
from core.config import BotSettings, load_settings
from core.errors import ConfigError, ParleyError
from core.ports import ListenAddress, addresses_of, ensure_free

T = TypeVar("T")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parley", description=__doc__)
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--loop", default="auto", choices=["auto", "uvloop", "asyncio"],
                        help="event loop: uvloop where installed (auto, the default), or "
                        "the standard library's")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="start every adapter the bot's file configures")
    run.add_argument("config", help="the bot's TOML file")
    run.add_argument("--adapter", action="append", dest="adapters", metavar="NAME",
                     help="start only this adapter (repeatable)")
    run.add_argument("--processes", type=_at_least_one, default=1, metavar="N",
                     help="serve the web channel from N processes on its one port (needs "
                     "memory in Redis; docs/scale-out.md)")
    run.add_argument("--child", help=argparse.SUPPRESS)  # INDEX:FD, set by the supervisor

    chat = sub.add_parser("chat", help="talk to the bot in this terminal")
    chat.add_argument("config", help="the bot's TOML file")
    chat.add_argument("--json", action="store_true",
                      help="write one JSON object per reply (text, action, ...)")
    chat.add_argument("--user", default="local", help="user id to chat as")
    chat.add_argument("--conversation", default="terminal", help="conversation id")

    worker = sub.add_parser("worker", help="serve generation jobs from Redis (and HTTP)")
    worker.add_argument("config", help="the bot's TOML file ([generation] and [worker])")

    audit = sub.add_parser("audit", help="show the bot's moderation audit log (newest first)")
    audit.add_argument("config", help="the bot's TOML file")
    audit.add_argument("--limit", type=int, default=50, help="entries to show")
    audit.add_argument("--escalations", action="store_true",
                       help="show the cases handed to people instead")
    audit.add_argument("--json", action="store_true", help="one JSON object per entry")
    audit.add_argument("--user", help="only this user's entries")
    audit.add_argument("--channel", help="only this channel's entries (web, console, ...)")
    audit.add_argument("--category", help="only entries with this finding: a kind (terms, "
                       "classifier, pii, injection, flood, size) or a label (pii:email)")
    audit.add_argument("--since", metavar="WHEN",
                       help="entries from then on: 30m, 2h, 7d ago, or 2026-11-29[T20:00]")
    audit.add_argument("--until", metavar="WHEN", help="entries up to then (as --since)")
    audit.add_argument("--utc", action="store_true", help="print times in UTC, not local time")

    forget = sub.add_parser("forget", help="delete everything kept about one user")
    forget.add_argument("config", help="the bot's TOML file")
    forget.add_argument("--channel", required=True, help="the user's channel (web, telegram...)")
    forget.add_argument("--user", required=True, help="the user's id on that channel")

    feedback = sub.add_parser("feedback", help="export the ratings users gave replies")
    feedback.add_argument("config", help="the bot's TOML file")
    feedback.add_argument("--since", metavar="WHEN",
                          help="ratings from then on: 30m, 2h, 7d ago, or 2026-11-29[T20:00]")
    feedback.add_argument("--format", choices=["jsonl", "csv"], default="jsonl",
                          help="JSON Lines (default) or CSV with a header")
    feedback.add_argument("--output", metavar="FILE", help="write here instead of stdout")

    check = sub.add_parser("check", help="validate the bot's file and exit")
    check.add_argument("config", help="the bot's TOML file")
    check.add_argument("--no-ports", dest="ports", action="store_false",
                       help="validate the file only, not whether this machine can listen "
                       "on its ports now (e.g. while the bot itself runs on them)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``parley`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        settings = load_settings(args.config)
        if args.command == "check":
            return _check(settings, ports=args.ports)
        if args.command == "audit":
            return _audit(settings, args)
        if args.command == "forget":
            from core.forget import forget

            gone = run_loop(args.loop, forget(settings, args.channel, args.user))
            stores = ", ".join(f"{name} {n}" for name, n in sorted(gone.by_store.items()))
            print(f"forgot {args.channel} user {args.user!r}: {gone.total} records "
                  f"({stores})")
            return 0
        if args.command == "feedback":
            return _feedback(settings, args)
        if args.command == "chat":
            console = adapter_registry().get("console")(
                settings,
                {**settings.adapters.get("console", {}), "output": "json" if args.json else "text",
                 "user_id": args.user, "conversation_id": args.conversation,
                 "exit_on_eof": True},
            )
            _keep_access_log_off_the_terminal(args.log_level)
            run_loop(args.loop, serve(build_engine(settings), [console]))
            return 0
        if args.command == "worker":
            from core.generation.fleet.worker import run_worker

            if settings.worker.http_port is not None:
                ensure_free([ListenAddress(settings.worker.http_host, settings.worker.http_port,
                                           "worker.http_port")], settings.source)
            run_loop(args.loop, run_worker(settings))
            return 0
        if args.child is not None:
            return _run_child(settings, args)
        adapters = build_adapters(settings, args.adapters)
        engine = build_engine(settings)
        if args.processes > 1:
            return _supervise(settings, adapters, args, argv)
        # Before the engine starts: loading a model takes seconds, a taken port none.
        ensure_free(addresses_of(adapters), settings.source)
        if "console" in (args.adapters or settings.adapters):
            _keep_access_log_off_the_terminal(args.log_level)
        run_loop(args.loop, serve(engine, adapters, freeze_heap=True))
        return 0
    except ConfigError as exc:
        print(f"parley: configuration error:\n{exc}", file=sys.stderr)
        return 2
    except ParleyError as exc:  # a failed start: Redis unreachable, model missing, ...
        print(f"parley: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _at_least_one(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


def _supervise(settings: BotSettings, adapters: list[Adapter], args: argparse.Namespace,
               argv: Sequence[str] | None) -> int:
    """``parley run --processes N``: check what N processes cannot share, then run N
    children of this command (core/processes.py)."""
    from core.processes import Supervisor, child_command, refuse_unshared

    names = list(args.adapters or settings.adapters)
    addresses = addresses_of(adapters)
    refuse_unshared(settings, names, addresses, args.processes)
    ensure_free(addresses, settings.source)
    # The children get this command line as it is: --child wins over --processes.
    forwarded = list(sys.argv[1:] if argv is None else argv)
    return Supervisor(lambda index, fd: child_command(forwarded, index, fd),
                      args.processes).run()


def _run_child(settings: BotSettings, args: argparse.Namespace) -> int:
    """One of ``parley run --processes N``'s children: the web channel on the shared
    port, its metrics in the run's multiprocess folder, its link to the supervisor last."""
    from core.metrics import Metrics
    from core.processes import METRICS_DIR_ENV, SECRET_ENV, ParentLink, child_settings, parse_child

    index, fd = parse_child(args.child)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s %(levelname)s [process {index}] %(name)s: %(message)s"))
    settings = child_settings(settings, os.environ.get(SECRET_ENV))
    adapters: list[Adapter] = [*build_adapters(settings, ["web"]), ParentLink(fd)]
    engine = build_engine(settings, metrics=Metrics(
        multiprocess_dir=os.environ.get(METRICS_DIR_ENV)))
    run_loop(args.loop, serve(engine, adapters, freeze_heap=True))
    return 0


def _audit(settings: BotSettings, args: argparse.Namespace) -> int:
    from core.moderation.audit_cli import AuditFilter, parse_when, print_audit

    try:
        since = parse_when(args.since) if args.since else None
        until = parse_when(args.until) if args.until else None
    except ValueError as exc:
        print(f"parley audit: {exc}", file=sys.stderr)
        return 2
    where = AuditFilter(user=args.user, channel=args.channel, category=args.category,
                        since=since, until=until)
    return run_loop(args.loop, print_audit(settings, limit=args.limit,
                                           escalations=args.escalations, as_json=args.json,
                                           where=where, utc=args.utc))


def run_loop(kind: str, main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on the event loop ``kind`` names (see ``--loop``).

    uvloop (libuv, in C) runs the same asyncio code with about half the loop's own CPU
    per message; ``auto`` uses it where it is installed (it is a dependency on Linux and
    macOS) and the standard loop elsewhere.
    """
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if kind != "asyncio":
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                main.close()
                raise ConfigError("--loop uvloop: uvloop is not installed") from None
        else:
            factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def _feedback(settings: BotSettings, args: argparse.Namespace) -> int:
    from core.feedback import collect, write
    from core.moderation.audit_cli import parse_when

    try:
        since = parse_when(args.since) if args.since else None
    except ValueError as exc:
        print(f"parley feedback: {exc}", file=sys.stderr)
        return 2
    records = run_loop(args.loop, collect(settings, since))
    if args.output:
        with open(args.output, "w", encoding="utf-8", newline="") as out:
            count = write(records, args.format, out)
    else:
        count = write(records, args.format, sys.stdout)
    print(f"parley feedback: {count} ratings", file=sys.stderr)
    return 0


def _keep_access_log_off_the_terminal(level: str) -> None:
    """With the console channel on this terminal, one access-log line per web request
    would print over the prompt; they stay off unless asked for with ``--log-level debug``.
    """
    if level != "debug":
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _check(settings: BotSettings, *, ports: bool = True) -> int:
    """Build everything the file names without starting it, so wrong names fail here;
    the ports the adapters will listen on must be free, unless ``ports`` is false: what
    else runs on the machine says nothing about the file.
    """
    build_engine(settings)
    adapters: list[Adapter] = build_adapters(settings)
    if ports:
        ensure_free(addresses_of(adapters), settings.source)
    print(f"{settings.source}: ok (bot {settings.bot.name!r}, "
          f"adapters: {', '.join(settings.adapters) or 'none'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
