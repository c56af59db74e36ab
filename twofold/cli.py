"""The `twofold` command: one entry point, one subcommand per job.

Subcommands live in the package that owns them and are imported only when chosen, so
`twofold serve-assignment` never imports ONNX Runtime and `twofold --help` stays fast.
A subcommand module exposes a `Command` (how to declare its flags, how to run it).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from twofold import __version__


@dataclass(frozen=True)
class Command:
    """A subcommand: `configure` declares its flags, `run` executes it and returns an exit code."""

    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# name -> ("module:attribute" of a Command, one-line summary)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve-assignment": ("assignment_server.cli:SERVE", "run the assignment (feature-flag) gRPC server"),
    "flags": ("assignment_server.cli:FLAGS", "validate or compile flag YAML files"),
    "conformance": ("assignment_server.cli:CONFORMANCE", "run a Confidence resolver conformance suite"),
    "serve-model": ("model_server.cli:SERVE", "run the model (ONNX / bandit) gRPC server"),
    "train": ("model_server.cli:TRAIN", "train and export XGBoost models or bandit policies"),
    "serve-analysis": ("analysis_worker.cli:SERVE", "recompute experiments on a schedule and serve results"),
    "analyze": ("analysis_worker.cli:ANALYZE", "analyze one experiment from the lake"),
    "stats": ("analysis_worker.cli:STATS", "compute results from sufficient statistics in a JSON file"),
    "lake": ("twofold.lake_cli:LAKE", "lake maintenance: compact small files, recover logs of writers gone"),
    "demo": ("twofold.demo:DEMO", "the end-to-end demo: train, serve, experiment, analyze"),
    "example": ("twofold.demo.example:EXAMPLE", "write the example's training data or send it example traffic"),
    "serve-echo": ("twofold.echo_cli:SERVE", "run the bare echo service (benchmarks and tests)"),
}


def load_command(name: str) -> Command:
    """Import the module owning subcommand `name` and return its Command."""
    target, _ = SUBCOMMANDS[name]
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise SystemExit(f"twofold {name}: not available in this installation ({exc})") from exc
    command = getattr(module, attribute, None)
    if not isinstance(command, Command):
        raise SystemExit(f"twofold {name}: not available in this installation")
    return command


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; subcommand flags are added only for the chosen subcommand."""
    parser = argparse.ArgumentParser(
        prog="twofold",
        description="Twofold: personalization and experimentation on two stacks, joined by one client.",
    )
    parser.add_argument("--version", action="version", version=f"twofold {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, summary) in SUBCOMMANDS.items():
        sub.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, run the chosen subcommand and return its exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not args_list or args_list[0] not in SUBCOMMANDS:
        parser.parse_args(args_list)  # handles --help / --version / unknown commands
        parser.print_help()
        return 2
    name = args_list[0]
    command = load_command(name)
    sub = argparse.ArgumentParser(prog=f"twofold {name}", description=SUBCOMMANDS[name][1],
                                  formatter_class=DefaultsHelpFormatter)
    command.configure(sub)
    show_defaults(sub)
    args = sub.parse_args(args_list[1:])
    check_choices(sub, args)
    return int(command.run(args) or 0)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows each option's default, so nobody has to read the code to learn it.

    Skipped where there is nothing to show (no default, a plain switch) or the help text already
    says it.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or action.default == [] \
                or "default" in text.lower() or not action.option_strings:
            return text
        return super()._get_help_string(action)


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Give `parser` and every nested subcommand parser the DefaultsHelpFormatter."""
    parser.formatter_class = DefaultsHelpFormatter
    for action in parser._actions:  # argparse offers no public view of its subparsers
        if action.help is None and action.option_strings and action.default not in (None, False, []):
            action.help = "(default: %(default)s)"  # argparse prints no help line for an option without help
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                show_defaults(child)


def check_choices(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a default outside an option's choices (exit 2 with a message, not a traceback later).

    argparse checks only values given on the command line; defaults that come from `TWOFOLD_*`
    environment variables (e.g. TWOFOLD_LOG_LEVEL=verbose) would otherwise pass through.
    """
    for action in parser._actions:  # argparse offers no public view of its options
        value = getattr(args, action.dest, None)
        if action.choices is not None and value is not None and value not in action.choices:
            flag = "/".join(action.option_strings) or action.dest
            parser.error(f"{flag}: {value!r} is not one of {', '.join(map(str, action.choices))} "
                         "(from a TWOFOLD_* environment variable?)")


if __name__ == "__main__":
    sys.exit(main())
