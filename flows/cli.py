"""`visionflow` command line. Each subcommand is one handler `cmd_<name>(args) -> int` plus one
parser block in build_parser(). Handlers import what they need inside the function: Prefect is
imported only by the subcommands that run flows, so `validate` starts fast and works without it.

Errors caused by user input (VisionflowError) print `error: <message>` on one line to stderr
and exit 2, like argparse usage errors; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Sequence

from visionflow.errors import VisionflowError


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """--dataset / --data-dir / --val-fraction / --split-seed, shared by dataset subcommands."""
    parser.add_argument("--dataset", required=True, metavar="SPEC",
                        help="'sample', 'cifar10', or a folder (ROOT/train|val|test/<class>/* or ROOT/<class>/*)")
    parser.add_argument("--data-dir", default="data", metavar="DIR",
                        help="where downloads, the sample and the cache live (default: data)")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="held-out fraction when the folder has no val/ or test/ (default: 0.2)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of that held-out split (default: 0)")


def print_json(value: Any) -> None:
    """Print one JSON document on stdout (logs go to stderr, so stdout stays parseable)."""
    print(json.dumps(value, indent=2))


def cmd_validate(args: argparse.Namespace) -> int:
    from visionflow.data import resolve_dataset
    from visionflow.validate import validate_dataset

    info = resolve_dataset(args.dataset, data_dir=args.data_dir, val_fraction=args.val_fraction,
                           split_seed=args.split_seed)
    report, _ = validate_dataset(info, on_invalid=args.on_invalid)
    if args.json:
        print_json(report.to_dict())
    else:
        print(report.format_text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="visionflow", description="Train, evaluate and serve image classifiers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (downloads, retries) to stderr")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("validate", help="check a dataset: counts, invalid files, duplicates, leakage")
    add_dataset_arguments(p)
    p.add_argument("--on-invalid", choices=("skip", "fail"), default="skip",
                   help="leave unreadable files out and report them (skip, default) or stop at the first (fail)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(handler=cmd_validate)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `visionflow` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.handler(args)
    except VisionflowError as err:
        # Collapse whitespace: the message must stay one line even if it quotes an OS error.
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout was closed early (`visionflow ... | head`): not an error worth a traceback.
        # Point stdout at devnull so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe


if __name__ == "__main__":
    sys.exit(main())
