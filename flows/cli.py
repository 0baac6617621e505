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

from visionflow.errors import DatasetError, VisionflowError


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


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a positive integer")
    return value


def select_split(info: Any, name: str | None) -> Any:
    """The named split of a resolved dataset, or its eval split (val, else test) when name is None."""
    if name is None:
        return info.eval_split
    if name not in info.splits:
        raise DatasetError(f"Dataset '{info.spec}' has no '{name}' split: it has {', '.join(sorted(info.splits))}")
    return info.splits[name]


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from visionflow.cache import load_decoded
    from visionflow.checkpoints import load_model
    from visionflow.data import resolve_dataset
    from visionflow.evaluation import check_classes_match, evaluate_model

    model, spec = load_model(args.checkpoint)
    info = resolve_dataset(args.dataset, data_dir=args.data_dir, val_fraction=args.val_fraction,
                           split_seed=args.split_seed)
    check_classes_match(spec, info.classes)  # before decoding anything
    split = select_split(info, args.split)
    decoded = load_decoded(split, spec.input_size, Path(args.data_dir) / "cache")
    report = evaluate_model(model, spec, decoded, device=args.device, batch_size=args.batch_size)
    if args.json:
        print_json(report.to_dict())
    else:
        print(f"checkpoint: {args.checkpoint}  dataset: {args.dataset}  split: {split.name}")
        print(report.to_text())
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from visionflow.checkpoints import load_model
    from visionflow.evaluation import predict_images

    model, spec = load_model(args.checkpoint)
    predictions = predict_images(model, spec, args.images, device=args.device)
    if args.json:
        print_json(predictions)
    else:
        for p in predictions:
            print(f"{p['image']}\t{p['label']}\t{p['probability']:.4f}")
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

    checkpoint_help = "a training checkpoint (.pt), an export folder, or its model.safetensors (beside model.json)"
    p = commands.add_parser("evaluate", help="evaluate a checkpoint: loss, accuracy, per-class metrics, confusion matrix")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help=checkpoint_help)
    add_dataset_arguments(p)
    p.add_argument("--split", choices=("val", "test", "train"), default=None,
                   help="split to evaluate (default: the dataset's eval split, val or else test)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, mps, cuda or cuda:N")
    p.add_argument("--batch-size", type=positive_int, default=256, metavar="N", help="images per forward pass (default: 256)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(handler=cmd_evaluate)

    p = commands.add_parser("predict", help="classify image files with a checkpoint")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help=checkpoint_help)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files to classify")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, mps, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="print a JSON list of {image, label, probability, probabilities}")
    p.set_defaults(handler=cmd_predict)

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
