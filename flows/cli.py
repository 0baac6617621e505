"""`visionflow` command line. Each subcommand is one handler `cmd_<name>(args) -> int` plus its
arguments in one of the `add_..._command(s)` functions that build_parser() calls. Handlers import
what they need inside the function: Prefect is imported only by the subcommands that run flows, so
`validate` starts fast and works without it.

Errors caused by user input (VisionflowError, and an OSError about a path) print `error: <message>`
on one line to stderr and exit 2, like argparse usage errors; paths are checked before anything
starts where that is cheap; Ctrl-C exits 130, SIGTERM 143, SIGHUP 129, a training timeout 124.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap
from typing import TYPE_CHECKING, Any, Sequence, get_args

from flows.prefect_server import (
    DEFAULT_PORT,
    NOT_RUNNING_STATUS,
    BackgroundServer,
    PrefectAPI,
    prefect_home,
    recorded_server,
    running_server,
    server_url,
    start_server,
    stop_server,
)
from visionflow.errors import (
    ConfigError,
    DatasetError,
    VisionflowError,
    check_directory,
    check_readable,
    make_directory,
    one_line,
    path_error,
)
from visionflow.train.stopping import handle_stop_signals

if TYPE_CHECKING:
    from visionflow.manifest import ChampionDecision

OUTPUT_EXPECTED = "a directory for run outputs (--output, output.output_dir)"
DATA_DIR_EXPECTED = "a directory for downloads and the decoded cache (--data-dir, data.data_dir)"


def check_data_dir(dataset: str, data_dir: str) -> None:
    """A data directory that cannot exist fails in one line; CIFAR-10 is downloaded into it, so writable too."""
    check_directory(data_dir, DATA_DIR_EXPECTED, writable=dataset == "cifar10")


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """--dataset / --data-dir / --val-fraction / --split-seed, shared by dataset subcommands."""
    parser.add_argument(
        "--dataset",
        required=True,
        metavar="SPEC",
        help="'sample', 'cifar10', or a folder (ROOT/train|val|test/<class>/* or ROOT/<class>/*)",
    )
    parser.add_argument(
        "--data-dir",
        default="data",
        metavar="DIR",
        help="where downloads, the sample and the cache live (default: data)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="held-out fraction when the folder has no val/ or test/ (default: 0.2)",
    )
    parser.add_argument("--split-seed", type=int, default=0, help="seed of that held-out split (default: 0)")


def print_error(err: BaseException) -> None:
    """The one line on stderr for an error the user can fix (main then exits 2)."""
    print(f"error: {one_line(err)}", file=sys.stderr)


def print_json(value: Any) -> None:
    """Print one JSON document on stdout (logs go to stderr, so stdout stays parseable)."""
    print(json.dumps(value, indent=2))


def cmd_validate(args: argparse.Namespace) -> int:
    from visionflow.data.splits import resolve_dataset
    from visionflow.data.validate import validate_dataset

    check_data_dir(args.dataset, args.data_dir)
    info = resolve_dataset(
        args.dataset, data_dir=args.data_dir, val_fraction=args.val_fraction, split_seed=args.split_seed
    )
    near = {"threshold": args.threshold, "on_leak": args.on_leak}
    if not args.near_duplicates:
        given = [flag for flag, value in (("--threshold", args.threshold), ("--on-leak", args.on_leak)) if value]
        if given:
            raise ConfigError(f"{' and '.join(given)} {'needs' if len(given) == 1 else 'need'} --near-duplicates")
    report, _ = validate_dataset(
        info,
        on_invalid=args.on_invalid,
        near_duplicates=args.near_duplicates,
        **{key: value for key, value in near.items() if value is not None},
    )
    issues = label_issues_of(info, args) if args.label_issues else None
    if args.json:
        print_json({**report.to_dict(), **({"label_issues": issues.to_dict()} if issues else {})})
        return 0
    print(report.format_text())
    if issues is not None:
        from visionflow.tables import text_table

        print(f"\nlabel issues: {len(issues.issues)} of {issues.num_train} train images ({issues.folds} folds)")
        print(text_table(issues.table(LISTED_ISSUES)))
    return 0


LISTED_ISSUES = 20  # suspects printed by validate --label-issues (--json gives them all)


def label_issues_of(info: Any, args: argparse.Namespace) -> Any:
    """validate --label-issues: the train split's suspects, the folds trained with --config's recipe."""
    from visionflow.config import load_config
    from visionflow.label_issues import find_issues

    config = load_config(args.config, {"data.dataset": args.dataset, "data.data_dir": args.data_dir}).resolved()
    return find_issues(info, config)


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
    from visionflow.checkpoints import load_model
    from visionflow.config import DataConfig
    from visionflow.data.decoded import open_eval_split
    from visionflow.data.splits import resolve_dataset
    from visionflow.evaluation import check_classes_match, evaluate_model

    check_data_dir(args.dataset, args.data_dir)
    model, spec = load_model(args.checkpoint)
    info = resolve_dataset(
        args.dataset, data_dir=args.data_dir, val_fraction=args.val_fraction, split_seed=args.split_seed
    )
    check_classes_match(spec, info.classes)  # before decoding anything
    split = select_split(info, args.split)
    images = open_eval_split(split, DataConfig(data_dir=args.data_dir, loader=args.loader), spec.decode_size)
    report = evaluate_model(model, spec, images, device=args.device, batch_size=args.batch_size)
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


SCORE_OPTIONS = {  # CLI flag (argparse dest) -> scoring.ScoreConfig field
    "inputs": "inputs",
    "checkpoint": "checkpoint",
    "table": "table",
    "output": "output_dir",
    "top_k": "top_k",
    "batch_size": "batch_size",
    "shard_size": "shard_size",
    "workers": "num_workers",
    "device": "device",
}


def cmd_score(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from visionflow.scoring import resolve_inputs, resolve_model, score_config, score_images

    config = score_config({field: getattr(args, dest) for dest, field in SCORE_OPTIONS.items()})
    paths = resolve_inputs(config.inputs)  # before the model loads: a wrong folder fails fast
    summary = score_images(resolve_model(config.checkpoint, config.output_dir), paths, config)
    if args.json:
        print_json(asdict(summary))
    else:
        print(
            f"{summary.images} images ({summary.scored} scored now, {summary.unreadable} unreadable) "
            f"by model {summary.model_version[:12]} -> {summary.table}"
        )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from visionflow.exports import export_checked
    from visionflow.scoring import model_path

    result = export_checked(model_path(args.checkpoint, args.output), args.format, args.out, args.images)
    if args.json:
        print_json(result.to_dict())
    else:
        print(
            f"{result.format} export in {result.folder} ({result.file.name} + {result.spec.name}): max probability "
            f"difference {result.max_difference:.2g} on {result.images} images"
        )
    return 0


# Prefect settings for a CLI run, applied before prefect is imported (it reads them at import);
# a value the user set in the environment wins. Analytics off: no network call on a first run.
PREFECT_DEFAULTS = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}

TRAIN_OVERRIDES = {  # CLI flag (argparse dest) -> dotted config field
    "dataset": "data.dataset",
    "model": "model.name",
    "weights": "model.weights",
    "freeze_epochs": "model.freeze_epochs",
    "image_size": "data.image_size",
    "recipe": "optim.recipe",
    "epochs": "training.epochs",
    "batch_size": "data.batch_size",
    "loader": "data.loader",
    "lr": "optim.lr",
    "device": "training.device",
    "seed": "training.seed",
    "output": "output.output_dir",
    "run_name": "output.run_name",
    "nproc_per_node": "training.distributed.nproc_per_node",
    "nnodes": "training.distributed.nnodes",
    "rdzv_endpoint": "training.distributed.rdzv_endpoint",
    "on_label_issue": "label_issues.on_issue",
}


def nproc_per_node(value: str) -> int | str:
    """--nproc-per-node: a number of ranks, or 'gpu' (one per visible GPU); the config validates the range."""
    return int(value) if value.isdigit() else value


EXIT_TIMED_OUT = 124  # what GNU `timeout` returns


def prefect_environment() -> None:
    """Call before importing prefect."""
    # PREFECT_API_URL set but empty (a common way to "unset" it) is a URL to Prefect, which then
    # logs an EventsWorker traceback on every run: treat it as unset.
    if os.environ.get("PREFECT_API_URL") == "":
        del os.environ["PREFECT_API_URL"]
    for name, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(name, value)
    # Prefect installs its console handler (timestamps, flow and task run names) only when the
    # root logger has no handler of its own; main()'s basicConfig one would swallow that format.
    # (Exact type: subclasses belong to someone else, e.g. a test runner's log capture.)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if type(h) is logging.StreamHandler]:
        root.removeHandler(handler)


def prefect_ui_hint(api: PrefectAPI, flow_run_id: str | None) -> str:
    """Where to see a flow run in the Prefect UI."""
    from prefect.settings import PREFECT_UI_URL

    path = f"/runs/flow-run/{flow_run_id}" if flow_run_id else ""
    if api.server is not None:
        return f"{api.server.url}{path}"
    if not api.temporary and PREFECT_UI_URL.value():
        return f"{PREFECT_UI_URL.value()}{path}"
    return f"run `visionflow server start`, then open {server_url(DEFAULT_PORT)}{path}"


def resume_hint(output_dir: str) -> str:
    """The line printed when a training run stopped before its end: how to resume it."""
    from visionflow.manifest import STOPPED_STATUSES
    from visionflow.runs import list_runs

    mine = [row for row in list_runs(output_dir) if row["status"] in STOPPED_STATUSES and row["pid"] == os.getpid()]
    if not mine:
        return "interrupted"
    return (
        f"{mine[-1]['status']}: rerun the same command with --run-name {mine[-1]['name']} "
        f"to resume from its last checkpoint"
    )


def check_paths(config: Any) -> None:
    """Before any server starts: the output and data directories of `config` can exist there."""
    check_directory(config.output.output_dir, OUTPUT_EXPECTED, writable=True)
    check_data_dir(config.data.dataset, config.data.data_dir)


def check_before_run(config: Any) -> None:
    """Reject a missing dataset, an unavailable device, a completed run's name or pretrained weights
    that cannot be had (offline and not cached, a missing run) before the flow creates anything.
    CIFAR-10 is exempt from the dataset check: the flow downloads it. A global batch that does not
    divide by the world size too."""
    from visionflow.config import WEIGHTS_NONE, check_global_batch, world_size
    from visionflow.data.splits import resolve_dataset
    from visionflow.runs import resumable_run

    if config.output.run_name is not None:
        resumable_run(config.output.output_dir, config.output.run_name)
    if config.data.dataset != "cifar10":
        resolve_dataset(
            config.data.dataset, config.data.data_dir, config.data.val_fraction, config.data.split_seed, download=False
        )
    if config.training.device not in ("auto", "cpu"):  # these always resolve; checking cuda/mps imports torch
        from visionflow.train.device import resolve_device

        resolve_device(config.training.device)
    check_global_batch(config.data.batch_size, world_size(config.training.distributed))
    if config.model.weights != WEIGHTS_NONE:
        from visionflow.weights import locate  # torch

        locate(config.model, config.output.output_dir)  # downloads what is missing: the flow finds it cached
    make_directory(config.output.output_dir, OUTPUT_EXPECTED)  # last: a failed check leaves nothing behind


def cmd_train(args: argparse.Namespace) -> int:
    from visionflow.config import load_config

    overrides = {
        field: getattr(args, dest) for dest, field in TRAIN_OVERRIDES.items() if getattr(args, dest) is not None
    }
    if args.refresh:
        overrides["output.refresh"] = True
    if args.label_issues or args.on_label_issue:
        overrides["label_issues.enabled"] = True
    config = load_config(args.config, overrides)
    check_paths(config)
    prefect_environment()
    api = PrefectAPI()  # a temporary server starts now, while the checks below import torch
    try:
        check_before_run(config)
    except VisionflowError:
        api.stop()  # nothing ran on it
        raise
    from prefect import tags

    from flows.train import train_pipeline
    from visionflow.reports import tensorboard_command
    from visionflow.runs import RunLayout, runs_root

    api.wait()
    try:
        with tags("visionflow", f"model:{config.model.name}", f"recipe:{config.optim.recipe}"):
            manifest = train_pipeline(config)
    except KeyboardInterrupt:
        print(resume_hint(config.output.output_dir), file=sys.stderr)
        return 130
    except SystemExit:  # SIGTERM, SIGHUP (StopRequested): exit 143, 129
        print(resume_hint(config.output.output_dir), file=sys.stderr)
        raise
    except TimeoutError as err:  # training.timeout_minutes
        print_error(err)
        print(resume_hint(config.output.output_dir), file=sys.stderr)
        return EXIT_TIMED_OUT
    layout = RunLayout(runs_root(config.output.output_dir) / manifest.run_name)
    statuses = list(manifest.tasks.values())
    print(
        f"\nrun {manifest.run_name}: {manifest.status}, eval accuracy {manifest.metrics.eval_accuracy:.2%}, "
        f"{manifest.timing.total_seconds:.1f} s ({statuses.count('cached')} of {len(statuses)} tasks cached)"
    )
    print(f"  run directory: {layout.root}")
    print(f"  TensorBoard:   {tensorboard_command(layout.tensorboard)}")
    print(f"  Prefect UI:    {prefect_ui_hint(api, manifest.prefect_flow_run_id)}")
    print_champion(manifest.champion)
    return 0


def print_champion(decision: ChampionDecision | None) -> None:
    """The champion decision, when one was made: its outcome and reason, and the gate's checks."""
    from visionflow.tables import text_table

    if decision is None:
        return
    print(f"  champion '{decision.slot}': {decision.outcome} ({decision.reason})")
    if decision.checks:
        print(textwrap.indent(text_table(decision.checks_table()), "    "))


SWEEP_OPTIONS = {  # CLI flag (argparse dest) -> SweepConfig field
    "method": "method",
    "seed": "seed",
    "max_trials": "max_trials",
    "parallel": "parallel",
    "metric": "metric",
    "dask_address": "dask_address",
    "name": "name",
}


def cmd_sweep(args: argparse.Namespace) -> int:
    from visionflow.config import load_config
    from visionflow.sweep import build_sweep, check_space, load_space

    overrides = {"output.output_dir": args.output} if args.output else {}
    if args.champion:
        overrides["output.champion"] = args.champion
    base = load_config(args.config, overrides)
    options = {field: getattr(args, dest) for dest, field in SWEEP_OPTIONS.items() if getattr(args, dest) is not None}
    sweep = build_sweep({"space": load_space(args.space), **options})
    check_space(base, sweep)  # a bad key or value: exit 2 before any server or trial starts
    check_paths(base)
    prefect_environment()
    api = PrefectAPI()
    try:
        check_before_run(base)
    except VisionflowError:
        api.stop()
        raise
    from prefect import tags

    from flows.sweep import sweep_pipeline
    from visionflow.reports import tensorboard_command
    from visionflow.runs import TENSORBOARD_SUBDIR
    from visionflow.sweep import LEADERBOARD_NAME, format_leaderboard

    api.wait()
    try:
        with tags("visionflow", f"model:{base.model.name}", f"recipe:{base.optim.recipe}"):
            result = sweep_pipeline(base, sweep)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume; finished trials are cached", file=sys.stderr)
        return 130
    if args.json:
        print_json(result.model_dump(mode="json"))
        return 0
    states = [row.state for row in result.rows]
    print(
        f"\nsweep {result.name}: {len(states)} trials ({states.count('completed')} trained, "
        f"{states.count('cached')} cached, {states.count('failed')} failed), best {result.best} by {result.metric}"
    )
    print(format_leaderboard(result.rows, result.metric))
    print(f"  sweep directory: {result.sweep_dir} ({LEADERBOARD_NAME})")
    print(f"  TensorBoard:     {tensorboard_command(os.path.join(result.sweep_dir, TENSORBOARD_SUBDIR))} (HParams tab)")
    print(f"  Prefect UI:      {prefect_ui_hint(api, None)}")
    print_champion(result.champion)
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from visionflow.runs import format_runs, list_runs

    check_directory(args.output, OUTPUT_EXPECTED)
    rows = list_runs(args.output)
    if args.json:
        print_json(rows)
    elif rows:
        print(format_runs(rows))
    else:
        print(f"no runs under {args.output}/runs")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from visionflow.data.changes import changes_markdown
    from visionflow.runs import diff_runs, diff_to_dict, find_run

    check_directory(args.output, OUTPUT_EXPECTED)
    before, after = find_run(args.output, args.run_a), find_run(args.output, args.run_b)
    if args.json:
        print_json(diff_to_dict(before, after))
        return 0
    changes, config = diff_runs(before, after)
    print(changes_markdown(changes, f"Data changes from {before.name} to {after.name}"))
    print("# Config differences\n")
    rows = [f"{key}: {old!r} -> {new!r}" for key, (old, new) in config.items()]
    print("\n".join(rows) if rows else "none")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from tasks.caching import result_files
    from visionflow.retention import collect_garbage

    check_directory(args.output, OUTPUT_EXPECTED)
    plan = collect_garbage(args.output, args.keep_last, args.keep_days, dry_run=args.dry_run, result_files=result_files)
    if args.json:
        print_json(plan.to_dict())
    else:
        print(plan.format_text())
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from visionflow.manifest import Manifest

    Manifest.load(args.run_dir)  # a wrong directory fails here, before Prefect starts
    prefect_environment()
    api = PrefectAPI()
    from flows.reproduce import reproduce_run

    api.wait()
    result = reproduce_run(args.run_dir)
    if args.json:
        print_json(result)
    else:
        verdict = "identical" if result["identical"] else "DIFFERENT"
        print(f"\nreproduced {result['original_run']} as {result['reproduced_run']}: weights {verdict}")
        print(f"  weights sha256: {result['original_weights_sha256']} (original)")
        print(f"                  {result['reproduced_weights_sha256']} (reproduced)")
        for name, metrics in result["metrics"].items():
            print(f"  {name:<10} eval accuracy {metrics['eval_accuracy']:.2%}, eval loss {metrics['eval_loss']:.4f}")
        print(f"  run directory: {result['reproduced_run_dir']}")
    return 0 if result["identical"] else 1


def api_url_note() -> str | None:
    """The line saying that PREFECT_API_URL, when set, wins over `visionflow server`."""
    url = os.environ.get("PREFECT_API_URL")
    return f"note: PREFECT_API_URL is set ({url}): visionflow commands use that API, not this server" if url else None


def print_server(server: BackgroundServer) -> None:
    """Where a running server's UI, API and log are."""
    print(f"  UI:   {server.url}")
    print(f"  API:  {server.api_url}")
    print(f"  log:  {server.log}")
    if note := api_url_note():
        print(note)


def cmd_server_start(args: argparse.Namespace) -> int:
    prefect_environment()
    server, started = start_server(args.port or DEFAULT_PORT)
    if started:
        print(f"Prefect server started (pid {server.pid}), database and log in {server.home}")
    elif args.port not in (None, server.port):
        print(f"Prefect server already running on port {server.port}, not {args.port}: stop it first to move it")
    else:
        print(f"Prefect server already running (pid {server.pid})")
    print_server(server)
    return 0


def cmd_server_stop(args: argparse.Namespace) -> int:
    print(stop_server())
    return 0


def cmd_server_status(args: argparse.Namespace) -> int:
    home = prefect_home()
    server = running_server(home)
    if server is None:
        recorded = recorded_server(home)
        why = f": pid {recorded.pid} does not answer at {recorded.url}" if recorded else ""
        print(f"Prefect server not running{why} (start it with `visionflow server start`)")
        return NOT_RUNNING_STATUS
    print(f"Prefect server running (pid {server.pid})")
    print_server(server)
    return 0


def cmd_alerts_apply(args: argparse.Namespace) -> int:
    from flows.alerts import (
        WEBHOOK_BLOCK,
        WEBHOOK_URL_ENV,
        apply_automations,
        find_block,
        load_automations,
        save_webhook_block,
    )

    if args.webhook_url and args.block:
        raise ConfigError("give --webhook-url or --block TYPE/NAME, not both")
    url = args.webhook_url or (None if args.block else os.environ.get(WEBHOOK_URL_ENV))
    if not url and not args.block:
        raise ConfigError(f"give --webhook-url URL (or set {WEBHOOK_URL_ENV}) or --block TYPE/NAME")
    check_readable(args.file, "an automations YAML file (--file)")
    prefect_environment()
    # Automations live on a lasting server: PREFECT_API_URL, else the running `visionflow server`.
    if not os.environ.get("PREFECT_API_URL"):
        server = running_server(prefect_home())
        if server is None:
            raise ConfigError(
                "no Prefect server to apply alerts to: set PREFECT_API_URL or run `visionflow server start`"
            )
        os.environ["PREFECT_API_URL"] = server.api_url
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError

    with get_client(sync_client=True) as client:
        block_id = save_webhook_block(url) if url else find_block(client, args.block)
        automations = load_automations(args.file, block_id)  # before anything is applied
        try:
            applied = apply_automations(client, automations)
        except PrefectHTTPStatusError as err:  # e.g. a subject or body that is not a valid Jinja template
            raise ConfigError(
                f"The Prefect server refused an automation of '{args.file}': {err.response.text}"
            ) from err
    print(f"notifications through block {args.block or f'custom-webhook/{WEBHOOK_BLOCK}'} ({block_id})")
    for item in applied:
        print(f"  {item.action} {item.name} ({item.automation_id})")
    print(f"on {os.environ['PREFECT_API_URL']}")
    return 0


def tcp_port(text: str) -> int:
    """argparse type: a TCP port number, 1-65535."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a TCP port, 1-65535")
    return int(text)


def add_validate_command(commands: argparse._SubParsersAction) -> None:
    """`validate`: a dataset's report."""
    from visionflow.config import NEAR_DUPLICATE_THRESHOLD, OnInvalid, OnLeak

    p = commands.add_parser("validate", help="check a dataset: counts, invalid files, duplicates, leakage")
    add_dataset_arguments(p)
    p.add_argument(
        "--on-invalid",
        choices=get_args(OnInvalid),
        default="skip",
        help="leave unreadable files out and report them (skip, default) or stop at the first (fail)",
    )
    p.add_argument(
        "--near-duplicates",
        action="store_true",
        help="also find near-duplicates (re-encoded, resized, cropped, brightened, mirrored copies)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        metavar="T",
        help="with --near-duplicates: minimum pixel correlation of a pair, in (0, 1] "
        f"(default: {NEAR_DUPLICATE_THRESHOLD})",
    )
    p.add_argument(
        "--on-leak",
        choices=get_args(OnLeak),
        help="with --near-duplicates: eval images with a near-duplicate in train are reported (report, default; "
        "drop-eval also counts what evaluation would leave out) or stop with an error (fail)",
    )
    p.add_argument(
        "--label-issues",
        action="store_true",
        help="also rank suspected mislabelled train images (cleanlab on out-of-fold predictions: trains "
        "label_issues.folds models, cached under output.output_dir)",
    )
    p.add_argument(
        "--config", metavar="FILE.yaml", help="with --label-issues: the recipe, model, epochs and folds to train with"
    )
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(handler=cmd_validate)


def add_model_commands(commands: argparse._SubParsersAction) -> None:
    """`evaluate` and `predict`: a trained model on a split or on image files."""
    from visionflow.config import Loader

    checkpoint_help = "a training checkpoint (.pt), an export folder, or its model.safetensors (beside model.json)"
    p = commands.add_parser(
        "evaluate", help="evaluate a checkpoint: loss, accuracy, per-class metrics, confusion matrix"
    )
    p.add_argument("--checkpoint", required=True, metavar="PATH", help=checkpoint_help)
    add_dataset_arguments(p)
    p.add_argument(
        "--split",
        choices=("val", "test", "train"),
        default=None,
        help="split to evaluate (default: the dataset's eval split, val or else test)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, mps, cuda or cuda:N")
    p.add_argument(
        "--batch-size", type=positive_int, default=256, metavar="N", help="images per forward pass (default: 256)"
    )
    p.add_argument(
        "--loader",
        choices=get_args(Loader),
        default="auto",
        help="decode the split into RAM (memory, cached on disk) or batch by batch from the files (stream); "
        "default auto: memory while it fits a quarter of RAM",
    )
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(handler=cmd_evaluate)

    p = commands.add_parser("predict", help="classify image files with a checkpoint")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help=checkpoint_help)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files to classify")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, mps, cuda or cuda:N")
    p.add_argument(
        "--json", action="store_true", help="print a JSON list of {image, label, probability, probabilities}"
    )
    p.set_defaults(handler=cmd_predict)


def add_scoring_commands(commands: argparse._SubParsersAction) -> None:
    """`score` and `export`: a model on many new images; a model for other runtimes."""
    from visionflow.config import ExportFormat
    from visionflow.scoring import INPUTS_HELP, MODEL_HELP, ScoreConfig

    fields = ScoreConfig.model_fields
    p = commands.add_parser(
        "score", help="classify many image files into a table (resumable; unreadable files are rows with a status)"
    )
    p.add_argument("inputs", metavar="INPUTS", help=INPUTS_HELP)
    p.add_argument("--checkpoint", default=fields["checkpoint"].default, metavar="PATH|champion:SLOT", help=MODEL_HELP)
    table = fields["table"]
    table_help = f"{table.description} (default: {table.default})"
    p.add_argument("--table", default=table.default, metavar="FILE", help=table_help)
    add_output_argument(p)
    for flag, name in (("--top-k", "top_k"), ("--batch-size", "batch_size"), ("--shard-size", "shard_size")):
        help_text = f"{fields[name].description} (default: {fields[name].default})"
        p.add_argument(flag, type=positive_int, default=fields[name].default, metavar="N", help=help_text)
    p.add_argument("--workers", type=int, default=None, metavar="N", help=fields["num_workers"].description)
    p.add_argument("--device", default=fields["device"].default, help=fields["device"].description)
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.set_defaults(handler=cmd_score)

    p = commands.add_parser(
        "export", help="write a model as ONNX, TorchScript or safetensors with its spec, checked against the original"
    )
    p.add_argument("--checkpoint", required=True, metavar="PATH|champion:SLOT", help=MODEL_HELP)
    p.add_argument("--format", required=True, choices=get_args(ExportFormat), help="the export's format")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the model file and its model.json")
    p.add_argument(
        "--images",
        metavar="INPUTS",
        help=f"images for the parity check: {INPUTS_HELP} (default: the eval split of the model's run)",
    )
    add_output_argument(p)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(handler=cmd_export)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """`train`'s model, the weights it starts from and the recipe it trains with."""
    from visionflow.config import MODEL_NAMES, RECIPES, TIMM_PREFIX

    p.add_argument(
        "--model",
        metavar="NAME",
        help=f"{', '.join(MODEL_NAMES)}, a torchvision classification model (resnet50, convnext_tiny, ...) or "
        f"{TIMM_PREFIX}<timm model> (default: tudui)",
    )
    p.add_argument(
        "--weights",
        metavar="SOURCE",
        help="initial weights: none, imagenet (the model's pretrained weights, cached or downloaded), a .pt/.pth/"
        ".safetensors file, run:NAME or champion:SLOT (default: none)",
    )
    p.add_argument(
        "--freeze-epochs", type=int, metavar="N", help="head-only epochs first (default: from the recipe; finetune: 1)"
    )
    p.add_argument("--image-size", type=int, metavar="PX", help="model input size (default: the weights' own, else 32)")
    p.add_argument(
        "--recipe",
        metavar="NAME",
        help=f"{' or '.join(RECIPES)} (default: finetune with --weights, else default)",
    )


def add_train_command(commands: argparse._SubParsersAction) -> None:
    """`train`: the training flow, with the config fields it overrides."""
    from visionflow.config import Loader, OnLabelIssue

    p = commands.add_parser("train", help="run the training flow (cached steps, resumable with --run-name)")
    p.add_argument(
        "--config",
        metavar="FILE.yaml",
        help="YAML config (sections data, model, optim, training, output); flags override it",
    )
    p.add_argument("--dataset", metavar="SPEC", help="'sample', 'cifar10', or a folder (default: sample)")
    add_model_arguments(p)
    p.add_argument("--epochs", type=int, metavar="N", help="passes over the training split")
    p.add_argument("--batch-size", type=int, metavar="N", help="images per optimizer step")
    p.add_argument(
        "--loader",
        metavar="|".join(get_args(Loader)),
        help="decoded splits in RAM (memory) or decoded batch by batch from the files (stream); "
        "default auto: memory while they fit data.memory_budget_mb",
    )
    p.add_argument("--lr", type=float, metavar="F", help="peak learning rate (default: from the recipe)")
    p.add_argument("--device", metavar="auto|cpu|cuda|mps", help="training device (default: auto)")
    p.add_argument("--seed", type=int, metavar="N", help="seed for everything random (default: 0)")
    add_output_argument(p, config_may_set_it=True)
    p.add_argument(
        "--run-name", metavar="NAME", help="run directory name; an interrupted run with this name is resumed"
    )
    p.add_argument("--refresh", action="store_true", help="ignore cached results and recompute every step")
    p.add_argument("--label-issues", action="store_true", help="search suspected mislabelled train images first")
    p.add_argument(
        "--on-label-issue",
        choices=get_args(OnLabelIssue),
        help="implies --label-issues: only report the suspects (report, default) or also train without them",
    )
    p.add_argument(
        "--nproc-per-node",
        type=nproc_per_node,
        metavar="N|gpu",
        help="data-parallel ranks on this node through torchrun, 'gpu' = one per GPU (default: 1, one process)",
    )
    p.add_argument("--nnodes", type=int, metavar="N", help="nodes taking part (default: 1; more need --rdzv-endpoint)")
    p.add_argument(
        "--rdzv-endpoint", metavar="HOST:PORT", help="c10d rendezvous of several nodes (docs/guides/distributed.md)"
    )
    p.set_defaults(handler=cmd_train)


def add_sweep_command(commands: argparse._SubParsersAction) -> None:
    """`sweep`: many trainings of a search space, ranked."""
    from visionflow.config import Monitor, SweepMethod

    p = commands.add_parser(
        "sweep", help="train many configs of a search space on a Dask cluster (cached trials, a leaderboard)"
    )
    p.add_argument("--config", metavar="FILE.yaml", help="base YAML config every trial starts from")
    p.add_argument(
        "--space",
        required=True,
        metavar="FILE.yaml",
        help="dotted config fields -> values to try (optim.lr: [0.001, 0.003]) or ranges ({low, high, log: true})",
    )
    p.add_argument("--method", choices=get_args(SweepMethod), help="how trials are proposed (default: grid)")
    p.add_argument("--seed", type=int, metavar="N", help="seed of the random and optuna proposals (default: 0)")
    p.add_argument(
        "--max-trials", type=positive_int, metavar="N", help="trials at most (default: the whole grid, else 10)"
    )
    p.add_argument("--parallel", type=positive_int, metavar="K", help="trials at once (default: 2)")
    p.add_argument("--metric", choices=get_args(Monitor), help="ranks trials (default: training.monitor)")
    p.add_argument(
        "--dask-address", metavar="tcp://HOST:8786", help="an existing Dask scheduler (default: a local cluster)"
    )
    add_output_argument(p, config_may_set_it=True)
    p.add_argument(
        "--name", metavar="NAME", help="sweep name (default: from the space); trials are <name>-<nnn>-<hash>"
    )
    p.add_argument("--champion", metavar="SLOT", help="the best trial challenges this champion slot")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(handler=cmd_sweep)


def add_output_argument(p: argparse.ArgumentParser, config_may_set_it: bool = False) -> None:
    """--output, the root of run outputs; unset where a config file's output.output_dir may set it."""
    from visionflow.config import OutputConfig

    default = OutputConfig.model_fields["output_dir"].default
    p.add_argument(
        "--output",
        default=None if config_may_set_it else default,
        metavar="DIR",
        help=f"root of run outputs (default: {default})",
    )


def add_run_commands(commands: argparse._SubParsersAction) -> None:
    """`runs`, `diff`, `gc`: what is under an output directory."""
    p = commands.add_parser("runs", help="list the runs under an output directory")
    add_output_argument(p)
    p.add_argument("--json", action="store_true", help="print a JSON list of runs")
    p.set_defaults(handler=cmd_runs)

    p = commands.add_parser(
        "diff", help="what changed between two runs: files added, removed, changed, relabelled; config values"
    )
    p.add_argument("run_a", metavar="RUN_A", help="the earlier run: its directory or its name under --output")
    p.add_argument("run_b", metavar="RUN_B", help="the later run")
    add_output_argument(p)
    p.add_argument("--json", action="store_true", help="print the differences as JSON")
    p.set_defaults(handler=cmd_diff)

    from visionflow.retention import DEFAULT_KEEP_DAYS, DEFAULT_KEEP_LAST

    p = commands.add_parser(
        "gc",
        help="remove old runs and their orphaned cached results; never a champion's run or a running one",
        description="Remove run directories under <output>/runs that are neither among the newest N, nor younger "
        "than D days, nor a champion's run, nor running, and the cached task results only they referenced. "
        "Prints each removed path and the bytes freed (hard links counted once).",
    )
    add_output_argument(p)
    p.add_argument(
        "--keep-last",
        type=int,
        default=DEFAULT_KEEP_LAST,
        metavar="N",
        help=f"keep the newest N runs (default: {DEFAULT_KEEP_LAST})",
    )
    p.add_argument(
        "--keep-days",
        type=float,
        default=DEFAULT_KEEP_DAYS,
        metavar="D",
        help=f"keep runs younger than D days (default: {DEFAULT_KEEP_DAYS:g})",
    )
    p.add_argument("--dry-run", action="store_true", help="only print what would be removed")
    p.add_argument("--json", action="store_true", help="print the plan (kept, removed, freed bytes) as one JSON object")
    p.set_defaults(handler=cmd_gc)


def add_reproduce_server_commands(commands: argparse._SubParsersAction) -> None:
    """`reproduce` and `server`: rerun a run; the Prefect server in the background."""
    p = commands.add_parser(
        "reproduce",
        help="rerun a run from its manifest (caches bypassed) and compare weights",
        description="Rerun a run from its manifest, caches bypassed, into a new run directory. "
        "Exit status 0 when the weights are identical, 1 when they differ.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (<output>/runs/<run-name>)")
    p.add_argument("--json", action="store_true", help="print the comparison as one JSON object")
    p.set_defaults(handler=cmd_reproduce)

    p = commands.add_parser(
        "server",
        help="keep a Prefect server (API and UI) running in the background for the commands that run flows",
        description="Prefect's server on 127.0.0.1 in the background, its database and log in the Prefect home "
        "(PREFECT_HOME, default ~/.prefect). While it runs, `train` and `reproduce` use it (unless "
        "PREFECT_API_URL is set) instead of starting a temporary server each.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    action = actions.add_parser("start", help="start it, or say where it already runs; prints the UI URL")
    action.add_argument("--port", type=tcp_port, help=f"port on 127.0.0.1 (default: {DEFAULT_PORT})")
    action.set_defaults(handler=cmd_server_start)
    action = actions.add_parser("stop", help="stop it and wait until its process has exited")
    action.set_defaults(handler=cmd_server_stop)
    action = actions.add_parser(
        "status", help=f"say whether it runs and where; exit status 0 when it runs, {NOT_RUNNING_STATUS} when not"
    )
    action.set_defaults(handler=cmd_server_status)


def add_alerts_command(commands: argparse._SubParsersAction) -> None:
    """`alerts`: Prefect automations."""
    from flows.alerts import AUTOMATIONS_FILE, WEBHOOK_BLOCK, WEBHOOK_URL_ENV

    p = commands.add_parser(
        "alerts",
        help="Prefect automations: notify on failed runs, a missed nightly run and a new champion; retry crashed runs",
        description="Apply the automations of automations.yaml to the Prefect server (PREFECT_API_URL, else the "
        "running `visionflow server`). Applying again updates them in place.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    action = actions.add_parser("apply", help="create or update the automations and their notification block")
    action.add_argument(
        "--file", default=str(AUTOMATIONS_FILE), metavar="FILE.yaml", help="automations file (default: the repo's)"
    )
    action.add_argument(
        "--webhook-url",
        metavar="URL",
        help=f"POST each alert as JSON {{subject, body}} to URL, through a Custom Webhook block saved as "
        f"{WEBHOOK_BLOCK} (default: ${WEBHOOK_URL_ENV})",
    )
    action.add_argument(
        "--block",
        metavar="TYPE/NAME",
        help="send through an existing notification block instead, e.g. slack-webhook/team-alerts",
    )
    action.set_defaults(handler=cmd_alerts_apply)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand (one `add_..._command(s)` function per group)."""
    parser = argparse.ArgumentParser(prog="visionflow", description="Train, evaluate and serve image classifiers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (downloads, retries) to stderr")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for add_commands in (
        add_validate_command,
        add_model_commands,
        add_scoring_commands,
        add_train_command,
        add_sweep_command,
        add_run_commands,
        add_reproduce_server_commands,
        add_alerts_command,
    ):
        add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `visionflow` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    # Ctrl-C, SIGTERM (a process manager, `timeout`, a worker) and SIGHUP (the terminal closed) end
    # the command by unwinding the stack: a run records its interruption, exit handlers run (the
    # temporary server stops), exit status 130, 143, 129. During a flow run Prefect handles SIGTERM
    # first, then calls this handler.
    handle_stop_signals()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.handler(args)
    except VisionflowError as err:
        print_error(err)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout was closed early (`visionflow ... | head`): not an error worth a traceback.
        # Point stdout at devnull so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe
    except OSError as err:
        if not isinstance(err.filename, (str, bytes, os.PathLike)):
            raise
        print_error(path_error(err))  # a path the user gave, or one derived from it
        return 2


if __name__ == "__main__":
    sys.exit(main())
