"""The ``parley`` command: ``run``, ``chat``, ``check`` and ``audit`` a bot from its TOML file."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from core.app import adapter_registry, build_adapters, build_engine, serve
from core.config import BotSettings, load_settings
from core.errors import ConfigError, ParleyError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parley", description=__doc__)
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="start every adapter the bot's file configures")
    run.add_argument("config", help="the bot's TOML file")
    run.add_argument("--adapter", action="append", dest="adapters", metavar="NAME",
                     help="start only this adapter (repeatable)")

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

    check = sub.add_parser("check", help="validate the bot's file and exit")
    check.add_argument("config", help="the bot's TOML file")
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
            return _check(settings)
        if args.command == "audit":
            from core.moderation.audit_cli import print_audit

            return asyncio.run(print_audit(settings, limit=args.limit,
                                           escalations=args.escalations, as_json=args.json))
        if args.command == "chat":
            console = adapter_registry().get("console")(
                settings,
                {**settings.adapters.get("console", {}), "output": "json" if args.json else "text",
                 "user_id": args.user, "conversation_id": args.conversation,
                 "exit_on_eof": True},
            )
            asyncio.run(serve(build_engine(settings), [console]))
            return 0
        if args.command == "worker":
            from core.generation.worker import run_worker

            asyncio.run(run_worker(settings))
            return 0
        adapters = build_adapters(settings, args.adapters)
        asyncio.run(serve(build_engine(settings), adapters))
        return 0
    except ConfigError as exc:
        print(f"parley: configuration error:\n{exc}", file=sys.stderr)
        return 2
    except ParleyError as exc:  # a failed start: Redis unreachable, model missing, ...
        print(f"parley: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _check(settings: BotSettings) -> int:
    """Build everything the file names without starting it, so wrong names fail here."""
    build_engine(settings)
    build_adapters(settings)
    print(f"{settings.source}: ok (bot {settings.bot.name!r}, "
          f"adapters: {', '.join(settings.adapters) or 'none'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
