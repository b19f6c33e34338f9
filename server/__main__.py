"""`python -m server` / `ferrule-server`: run Ferrule until SIGTERM or SIGINT.

Subcommands: `serve` (the default), `migrate` (bring the schema to head and exit: the
deployment's migration step, run once before a rollout rather than by every replica),
and `token` (mint a JWT from the configured secret).

With FERRULE_WORKERS=N the parent migrates (or checks) the schema, then forks N workers
before any gRPC object exists (gRPC's multiprocessing example: gRPC's threads and
fork do not mix), each binding the same port with SO_REUSEPORT. The parent forwards
SIGTERM/SIGINT to the workers and exits with the first non-zero worker status.

A stop signal is never lost and never kills a process half-started: the parent blocks
SIGTERM/SIGINT before forking, each process installs its handling first and only then
unblocks them, so a signal sent while a worker is still starting is held until the worker
can answer it by draining (exit status 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import secrets
import signal
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

import uvloop
from pydantic import ValidationError

from server import dev_mode
from server.logs import configure_logging
from server.settings import Settings
from server.telemetry import install_log_correlation
from server.tokens import TokenError, mint_token, parse_ttl

log = logging.getLogger("ferrule.main")


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        lines = [
            f"  {'.'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
            for err in exc.errors()
        ]
        sys.stderr.write("ferrule: invalid configuration\n" + "\n".join(lines) + "\n")
        raise SystemExit(2) from None


async def prepare_schema(settings: Settings) -> None:
    """Migrate when told to; otherwise refuse to serve an outdated schema."""
    from db.migrate import current_revision, head_revision, upgrade_to_head

    if settings.ferrule_migrate_on_start:
        await upgrade_to_head(settings.database_url)
        return
    current, head = await current_revision(settings.database_url), head_revision()
    if current != head:
        sys.stderr.write(
            f"ferrule: database schema is at {current or 'nothing'}, the code needs {head}; "
            "run `ferrule-server migrate` (`alembic upgrade head`) "
            "or set FERRULE_MIGRATE_ON_START=1\n"
        )
        raise SystemExit(3)


def tune_gc(settings: Settings) -> None:
    """Move everything alive after start-up (modules, the app, pools) out of the cyclic
    collector's reach, and collect the youngest generation less often.

    Tracing allocates several objects per span, and every full collection walked the
    whole start-up heap, which traced calls paid for (`make bench BENCH_ARGS=tracing`
    shows the cost per call). Reference counting still frees almost everything at once;
    this only changes when the collector looks for cycles."""
    gc.collect()
    gc.freeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(settings.ferrule_gc_gen0_threshold, second, third)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def serve(settings: Settings, dev_banner: dev_mode.Banner | None = None) -> None:
    # The handlers exist before anything starts: a stop requested during start-up is
    # answered by a clean shutdown right after it, not by the signal's default action.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    # The app and Alembic are imported by the subcommands that use them: `token` needs
    # neither, and a command-line tool should not pay for the whole server to start.
    from server.app import FerruleApp

    app = FerruleApp(settings)
    port = await app.start()
    tune_gc(settings)
    loop_name = type(loop).__module__.split(".")[0]
    print(
        f"ferrule: serving on {settings.ferrule_listen} (pid {os.getpid()}, {loop_name} loop)",
        flush=True,
    )
    if dev_banner is not None:
        print(dev_banner.text(port), flush=True)
    await stop.wait()
    log.info("shutting down (grace %.1fs)", settings.ferrule_grace_seconds)
    await app.stop()


def run(main: Coroutine[Any, Any, None], settings: Settings) -> None:
    """Run the server's event loop: uvloop unless FERRULE_EVENT_LOOP=asyncio.

    uvloop (libuv) makes the socket work around every await cheaper, which is most of a
    database-backed call; the standard loop stays selectable to rule uvloop out when
    debugging. (No bench compares the two loops: measure before changing the default.)"""
    if settings.ferrule_event_loop == "uvloop":
        uvloop.run(main)
    else:
        asyncio.run(main)


def worker_settings(settings: Settings, index: int) -> Settings:
    """Each worker's metrics endpoint gets its own port: FERRULE_METRICS_PORT + index."""
    if settings.ferrule_metrics_port in (None, 0):
        return settings
    return settings.model_copy(
        update={"ferrule_metrics_port": settings.ferrule_metrics_port + index}
    )


def run_workers(settings: Settings) -> int:
    """Fork the workers, forward stop signals to them, and exit with the first non-zero
    worker status (0 when every worker drained)."""
    children: list[int] = []
    # Held until each process has its handler: the workers inherit the blocked mask and
    # unblock in serve(); the parent unblocks once `forward` is installed below.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    for index in range(settings.ferrule_workers):
        pid = os.fork()
        if pid == 0:
            try:
                run(serve(worker_settings(settings, index)), settings)
                os._exit(0)
            except BaseException:
                log.exception("worker failed")
                os._exit(1)
        children.append(pid)

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    status = 0
    for child in children:
        _, code = os.waitpid(child, 0)
        status = status or shell_status(os.waitstatus_to_exitcode(code))
    return status


def shell_status(exit_code: int) -> int:
    """A worker's status as the parent's exit status: killed by signal N is 128 + N, as a
    shell reports it (a negative SystemExit would wrap around to an unrelated number)."""
    return 128 - exit_code if exit_code < 0 else exit_code


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ferrule-server", description="Ferrule, a gRPC data-access service."
    )
    commands = parser.add_subparsers(dest="command")
    serve_cmd = commands.add_parser("serve", help="serve until SIGTERM (the default)")
    serve_cmd.add_argument(
        "--dev-token-file",
        type=Path,
        help="development mode: on the embedded default with no credentials and a loopback "
        "address, use (or create) the admin token in this file and print how to call",
    )
    commands.add_parser("migrate", help="bring the schema at DATABASE_URL to head and exit")
    token_cmd = commands.add_parser("token", help="print a JWT signed with FERRULE_JWT_SECRET")
    token_cmd.add_argument("--org", required=True, help="organization id, or '*' for all")
    token_cmd.add_argument("--scope", default="read", help='space-separated, e.g. "read write"')
    token_cmd.add_argument("--ttl", default="1h", help="lifetime: 90s, 15m, 1h, 7d")
    token_cmd.add_argument("--subject", default="ferrule-cli", help="the `sub` claim")
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["serve", *(argv or [])])
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    settings = load_settings()
    if args.command == "token":
        try:
            ttl = parse_ttl(args.ttl)
            token = mint_token(
                settings,
                organization=args.org,
                scope=args.scope,
                ttl_seconds=ttl,
                subject=args.subject,
            )
        except TokenError as exc:
            sys.stderr.write(f"ferrule: {exc}\n")
            raise SystemExit(2) from None
        print(token)
        return
    configure_logging(settings.ferrule_log_level)
    if args.command == "migrate":
        from db.migrate import head_revision, upgrade_to_head

        asyncio.run(upgrade_to_head(settings.database_url))
        print(f"ferrule: schema at {head_revision()}", flush=True)
        return
    refusal = settings.plaintext_refusal()
    if refusal is not None:
        sys.stderr.write(f"ferrule: {refusal}\n")
        raise SystemExit(2)
    install_log_correlation()
    dev_banner = None
    if args.dev_token_file is not None:
        settings, dev_banner = dev_mode.apply(settings, args.dev_token_file)
    if settings.ferrule_page_token_secret is None and not (
        settings.ferrule_jwt_secret or settings.ferrule_admin_token
    ):
        # One random secret for this process tree, chosen before the fork so that every
        # worker accepts the page tokens of the others.
        os.environ["FERRULE_PAGE_TOKEN_SECRET"] = secrets.token_hex(32)
        settings = load_settings()
    asyncio.run(prepare_schema(settings))
    if settings.ferrule_workers == 1:
        run(serve(settings, dev_banner), settings)
        return
    raise SystemExit(run_workers(settings))


if __name__ == "__main__":
    main()
