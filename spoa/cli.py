"""jwtgate: JWT authentication for HAProxy, as an SPOE agent (SPOP v2).

HAProxy sends each request's Authorization header to the agent, which verifies the
bearer token and answers with txn.jwt.* variables that HAProxy uses to accept or
reject the request. See README.md and docs/ for the whole picture.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spoa import __version__
from spoa.config import (
    ConfigError,
    config_warnings,
    describe,
    load_config,
    parse_duration,
    read_config,
)
from spoa.logs import mask_secrets
from spoa.protocol import SPEEDUPS
from spoa.protocol.payloads import speedups_refused
from spoa.verifier.parsing import SPEEDUPS as BASE64URL_SPEEDUPS

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class CommandError(Exception):
    """A user-facing failure: printed as one line, never as a traceback."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else sys.argv[1:])
    if not hasattr(args, "handler"):
        parser.print_help()
        return EXIT_USAGE
    try:
        result: int = args.handler(args)
    except ConfigError as exc:
        count = len(exc.problems)
        print(
            f"jwtgate: invalid configuration ({count} problem{'' if count == 1 else 's'}):",
            file=sys.stderr,
        )
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_FAILURE
    except CommandError as exc:
        print(f"jwtgate: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): exit quietly, as other CLI tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE
    except Exception as exc:  # a user never gets a traceback; this is a bug to report
        print(f"jwtgate: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jwtgate",
        description=__doc__,
        epilog=(
            "exit status: 0 done (run: stopped by SIGTERM or SIGINT), 1 failure (a bad\n"
            "configuration, a port in use, ...: said on standard error), 2 usage error,\n"
            "130 interrupted by Ctrl-C before run's own handling starts; bench passes on\n"
            "its script's status."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    def which(built: bool) -> str:
        if built:
            return "C"
        if speedups_refused():
            return "pure Python (JWTGATE_NO_SPEEDUPS is set)"
        return "pure Python (the C one was not built)"

    version = (
        f"jwtgate {__version__}, {which(SPEEDUPS)} NOTIFY decoder, "
        f"{which(BASE64URL_SPEEDUPS)} base64url decoder"
    )
    parser.add_argument("--version", action="version", version=version)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="run the agent",
        description="Run the SPOE agent: load and validate the TOML file, fetch every "
        "issuer's keys, then serve HAProxy. SIGTERM drains and stops; SIGHUP reloads the "
        "configuration and key files (an invalid new configuration is rejected and the "
        "old one keeps running).",
    )
    run.add_argument("--config", "-c", required=True, metavar="FILE", help="jwtgate.toml")
    run.add_argument("--pid-file", metavar="FILE", help="write the agent's process id here")
    # Internal: a supervisor's worker, serving the inherited listening socket.
    run.add_argument("--worker-fd", type=int, help=argparse.SUPPRESS)
    run.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    run.add_argument("--connection-table", type=_fd_and_slot, help=argparse.SUPPRESS)
    run.add_argument("--config-snapshot", help=argparse.SUPPRESS)
    run.set_defaults(handler=cmd_run)

    check = commands.add_parser(
        "check-config",
        help="validate a configuration file",
        description="Validate FILE, and the key and secret files it names, and print the "
        "effective configuration (defaults filled in, secrets never shown) as JSON. Exits 1 "
        "and lists every problem when invalid. JWKS URLs are not fetched.",
    )
    check.add_argument("file", metavar="FILE")
    check.set_defaults(handler=cmd_check_config)

    reload = commands.add_parser(
        "reload",
        help="tell a running agent to reload its configuration",
        description="Send SIGHUP to a running agent (only to a process that runs `jwtgate "
        "run`). It re-reads the TOML and key files without dropping HAProxy's connections; "
        "an invalid file is rejected and logged.",
    )
    target = reload.add_mutually_exclusive_group(required=True)
    target.add_argument("--pid-file", metavar="FILE", help="the file given to `run --pid-file`")
    target.add_argument("--pid", type=int, help="the agent's process id")
    reload.set_defaults(handler=cmd_reload)

    token = commands.add_parser(
        "token",
        help="mint a development token",
        description="Mint a signed token with a local key, for development and tests. "
        "--key takes a directory made by `jwtgate keys init` (its current key) or a "
        "private key PEM file (then give --alg).",
    )
    token.add_argument("--key", required=True, metavar="DIR|PEM")
    token.add_argument("--alg", help="algorithm, required with a PEM file (e.g. RS256)")
    token.add_argument("--kid", help="key id header (default: the key's own kid)")
    token.add_argument("--iss", help="issuer claim")
    token.add_argument("--sub", help="subject claim")
    token.add_argument("--aud", action="append", default=[], help="audience (repeatable)")
    token.add_argument("--scope", help='space-separated scopes, e.g. "read write"')
    token.add_argument(
        "--claim",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra claim; VALUE is parsed as JSON when it can be (repeatable)",
    )
    token.add_argument("--lifetime", default="5m", help='e.g. "5m" (default), "0s" for none')
    token.add_argument("--typ", default="at+jwt", help='the typ header (default "at+jwt")')
    token.set_defaults(handler=cmd_token)

    keys = commands.add_parser(
        "keys",
        help="generate and rotate a local signing key directory",
        description="Manage a development key directory: private keys, public PEMs "
        "and a jwks.json to serve or point `jwks_file` at.",
    )
    key_commands = keys.add_subparsers(title="actions", metavar="ACTION", required=True)
    init = key_commands.add_parser("init", help="create a directory with one key")
    init.add_argument("directory")
    init.add_argument("--alg", default="RS256", help="RS256 (default), ES256, EdDSA, ...")
    init.add_argument("--kid", help="key id (default: the RFC 7638 thumbprint)")
    init.set_defaults(handler=cmd_keys_init)
    rotate = key_commands.add_parser("rotate", help="add a new current key")
    rotate.add_argument("directory")
    rotate.add_argument("--keep", type=int, default=2, help="public keys kept (default 2)")
    rotate.set_defaults(handler=cmd_keys_rotate)
    show = key_commands.add_parser("show", help="print the directory's JWKS")
    show.add_argument("directory")
    show.set_defaults(handler=cmd_keys_show)

    demo = commands.add_parser(
        "demo",
        help="run the live demo on loopback",
        description="Start HAProxy with haproxy/*.cfg, two jwtgate agents, two backends and "
        "a local issuer whose key rotates, push mixed good and hostile traffic through "
        "HAProxy and show what happens. Everything runs on 127.0.0.1; every process it "
        "starts is stopped on exit, Ctrl-C, SIGTERM or SIGHUP, and its logs are kept in the "
        "directory it names.",
    )
    demo.add_argument("--duration", default="40s", help='how long to send traffic (default "40s")')
    demo.add_argument("--rotate-every", default="8s", help='key rotation period (default "8s")')
    demo.add_argument(
        "--rate", type=_positive_rate, default=50.0, help="requests per second (default 50)"
    )
    demo.add_argument("--short", action="store_true", help="a quick run (for tests)")
    demo.add_argument("--no-live", action="store_true", help="no live view, only the summary")
    demo.add_argument(
        "--exit",
        action="store_true",
        help="stop right after the summary (by default an interactive run keeps the stack up "
        "for trying it by hand, until Ctrl-C)",
    )
    demo.set_defaults(handler=cmd_demo)

    bench = commands.add_parser(
        "bench",
        help="run the benchmark suite (from a source checkout)",
        description="Run scripts/bench of the source checkout this jwtgate comes from: "
        "micro-benchmarks, the agent alone under the SPOP load generator, memory, and "
        "HAProxy 2.6 end to end against native jwt_verify, all on 127.0.0.1. It installs "
        "what it needs (haproxy, wrk, the bench extras) and writes "
        "bench/results/<timestamp>.{json,md} and PNG plots. 12-20 minutes on 2 cores, "
        "by host; see bench/README.md.",
    )
    bench.add_argument("--short", action="store_true", help="a quick pass, under 2 minutes")
    bench.set_defaults(handler=cmd_bench)
    return parser


# --- commands ------------------------------------------------------------------------------


def _positive_rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        rate = math.nan
    if not (math.isfinite(rate) and rate > 0):
        raise argparse.ArgumentTypeError("expected a number of requests per second above 0")
    return rate


def _fd_and_slot(text: str) -> tuple[int, int]:
    """`FD:SLOT`, as a supervisor passes its connection table to a worker."""
    fd, _, slot = text.partition(":")
    try:
        return int(fd), int(slot)
    except ValueError:
        raise argparse.ArgumentTypeError("expected FD:SLOT") from None


def cmd_run(args: argparse.Namespace) -> int:
    # Catch SIGHUP before the heavy imports below: its default action would kill a
    # starting agent (e.g. `systemctl reload` right after start). It is honoured once
    # the agent serves.
    early_hup: list[int] = []
    signal.signal(signal.SIGHUP, lambda signum, frame: early_hup.append(signum))

    from spoa.app import StartupError, run_agent

    # A supervisor's worker reads the supervisor's copy of the file: the one its siblings run.
    text, config = read_config(args.config, text_from=args.config_snapshot)
    try:
        return run_agent(
            config,
            config_path=args.config,
            config_snapshot=args.config_snapshot,
            config_text=text,
            pid_file=args.pid_file,
            worker_fd=args.worker_fd,
            ready_fd=args.ready_fd,
            share=args.connection_table,
            reload_requested=lambda: bool(early_hup),
        )
    except StartupError as exc:
        raise CommandError(str(exc)) from None


def cmd_check_config(args: argparse.Namespace) -> int:
    from spoa.app import static_key_problems

    config = load_config(args.file)
    problems = static_key_problems(config)
    if problems:
        raise ConfigError(problems)
    print(json.dumps(mask_secrets(describe(config)), indent=2, sort_keys=True, default=str))
    for warning in config_warnings(config):
        print(f"jwtgate: {args.file}: warning: {warning}", file=sys.stderr)
    print(f"jwtgate: {args.file}: configuration is valid", file=sys.stderr)
    return EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    pid = args.pid
    if args.pid_file:
        try:
            pid = int(Path(args.pid_file).read_text().strip())
        except (OSError, ValueError) as exc:
            raise CommandError(f"cannot read a process id from {args.pid_file}: {exc}") from None
    if not 1 < pid < 2**22:  # 0, -1, -N signal whole process groups; 1 is init
        raise CommandError(f"{pid} is not the process id of an agent")
    if not _runs_an_agent(pid):
        # A pid file left by a killed agent may name a process that took the number since;
        # SIGHUP ends most programs.
        raise CommandError(
            f"process {pid} is not a jwtgate agent (`jwtgate run`); is the pid file stale?"
        )
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise CommandError(f"no process {pid}") from None
    except PermissionError:
        raise CommandError(f"not allowed to signal process {pid}") from None
    print(f"jwtgate: reload requested (SIGHUP sent to {pid}); the agent's log says how it went")
    return EXIT_OK


def _runs_an_agent(pid: int) -> bool:
    """Whether process `pid` runs `jwtgate run` or `python -m spoa run` (the command right
    before `run`). A process that does not exist passes, so that kill() reports it."""
    if not Path("/proc/self/cmdline").exists():
        raise CommandError("cannot check the process: /proc is not mounted; use kill -HUP")
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return True
    except OSError:
        return False
    for index, arg in enumerate(argv[:-1]):
        if argv[index + 1] != b"run":
            continue
        if Path(os.fsdecode(arg)).name == "jwtgate":
            return True
        if arg == b"spoa" and index > 0 and argv[index - 1] == b"-m":
            return True
    return False


def cmd_token(args: argparse.Namespace) -> int:
    from spoa.devkit.errors import DevkitError
    from spoa.devkit.keys import load_current_key, load_signing_key_pem
    from spoa.devkit.tokens import mint_token

    path = Path(args.key)
    if not path.exists():
        raise CommandError(f"cannot load a signing key from {path}: no such file or directory")
    try:
        if path.is_dir():
            key = load_current_key(path)
        else:
            if not args.alg:
                raise CommandError("--alg is required with a PEM key file")
            key = load_signing_key_pem(path.read_bytes(), args.alg, args.kid)
    except (OSError, DevkitError, ValueError) as exc:
        raise CommandError(f"cannot load a signing key from {path}: {exc}") from None
    claims: dict[str, Any] = {}
    for name in ("iss", "sub", "scope"):
        if getattr(args, name):
            claims[name] = getattr(args, name)
    if args.aud:
        claims["aud"] = args.aud[0] if len(args.aud) == 1 else args.aud
    for item in args.claim:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise CommandError(f"--claim expects NAME=VALUE, got {item!r}")
        try:
            claims[name] = json.loads(raw)
        except json.JSONDecodeError:
            claims[name] = raw
    try:
        lifetime = parse_duration(args.lifetime)
    except ValueError:
        raise CommandError(
            f'--lifetime expects a duration like "5m", got {args.lifetime}'
        ) from None
    header = {"kid": args.kid} if args.kid else None
    print(mint_token(key, claims, lifetime=lifetime or None, header=header, typ=args.typ or None))
    return EXIT_OK


def cmd_keys_init(args: argparse.Namespace) -> int:
    from spoa.devkit.errors import DevkitError
    from spoa.devkit.keys import init_key_dir

    try:
        key = init_key_dir(args.directory, args.alg, args.kid)
    except (OSError, DevkitError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    print(f"jwtgate: created {args.directory} with {key.alg} key {key.kid}")
    print(f"jwtgate: public keys: {Path(args.directory) / 'jwks.json'}")
    return EXIT_OK


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    from spoa.devkit.errors import DevkitError
    from spoa.devkit.keys import rotate_key_dir

    try:
        key = rotate_key_dir(args.directory, keep=args.keep)
    except (OSError, DevkitError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    print(f"jwtgate: new current key {key.kid} ({key.alg}); kept {args.keep} public keys")
    return EXIT_OK


def cmd_keys_show(args: argparse.Namespace) -> int:
    path = Path(args.directory) / "jwks.json"
    try:
        print(path.read_text())
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror or exc}") from None
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench"
    if not os.access(script, os.X_OK):
        raise CommandError(
            "the benchmark suite lives in the source checkout (scripts/bench, bench/); "
            "run this from an editable install of it"
        )
    # scripts/bench sets up, bounds the run's time and stops every process it starts. It
    # takes this process's place, so a `kill` of `jwtgate bench` reaches it (a child
    # would have been orphaned with everything it started).
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(script, [str(script), *(["--short"] if args.short else [])])  # noqa: S606 (our own script)


def cmd_demo(args: argparse.Namespace) -> int:
    from spoa.demo import DemoOptions, run_demo

    try:
        options = DemoOptions(
            duration=5.0 if args.short else parse_duration(args.duration),
            rotate_every=2.0 if args.short else parse_duration(args.rotate_every),
            rate=args.rate,
            live=not args.no_live and sys.stdout.isatty(),
            hold=sys.stdout.isatty() and not (args.short or args.exit),
        )
    except ValueError as exc:
        raise CommandError(f"expected a duration like 30s, got {exc}") from None
    return run_demo(options)
