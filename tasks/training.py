"""Training task: fit the model on the validated data, checkpointing into the run directory,
holding the device's slots (Prefect global concurrency limits `device:cpu`, `device:cuda:N`,
`device:mps`: visionflow.train.device_limits) while it trains."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from prefect import get_run_logger
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.client.schemas.responses import GlobalConcurrencyLimitResponse
from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
from prefect.concurrency.sync import concurrency
from prefect.context import TaskRunContext
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from tasks.artifacts import PrefectProgressCallback
from tasks.caching import FileRef, TaskOutput, cached_task, written_files
from tasks.data import DatasetRef, Normalization, ValidatedData, by_exclusions, by_fingerprint
from tasks.names import run_name
from tasks.prefect_compat import slots_taken
from visionflow.config import PipelineConfig, flatten, free_fields, world_size
from visionflow.manifest import TimingRecord
from visionflow.runs import BEST_CHECKPOINT_PATH, LAST_CHECKPOINT_PATH
from visionflow.steps import train_run
from visionflow.train.device_limits import LEASE_SECONDS, DeviceClaim, device_claim
from visionflow.train.records import FitResult

POLL_SECONDS = 1.0  # how often a training waiting for its device checks whether the slots came free


class TrainOutput(TaskOutput):
    fit: FitResult

    @property
    def best_checkpoint(self) -> FileRef:
        return self.files[BEST_CHECKPOINT_PATH]

    def used_config(self, config: PipelineConfig) -> PipelineConfig:
        """`config` (resolved) with the normalization, loader, precision and memory format this training used."""
        data = config.data.model_copy(
            update={"mean": self.fit.spec.mean, "std": self.fit.spec.std, "loader": self.fit.loader}
        )
        training = config.training.model_copy(
            update={"precision": self.fit.precision, "channels_last": self.fit.channels_last}
        )
        return config.model_copy(update={"data": data, "training": training})

    def timing(self, total_seconds: float, trained_here: bool) -> TimingRecord:
        """The manifest's timing of a flow run that took `total_seconds`; `trained_here`: this training
        ran in that flow run (not cached), so its epochs' phases belong to it."""
        fit = self.fit
        trained = fit.phase_seconds if trained_here and fit.timed_epochs else {}
        return TimingRecord(
            train_seconds=fit.train_seconds,
            train_images_per_second=fit.train_images_per_second,
            total_seconds=total_seconds,
            seconds_per_epoch={phase: seconds / fit.timed_epochs for phase, seconds in trained.items()},
            other_seconds=total_seconds - sum(trained.values()),
        )


def by_training_fields(config: PipelineConfig) -> dict[str, Any]:
    """What training depends on: the config's fields (dotted) but those free to differ for a cached
    result (`free_fields("cache")` says why for each), and the world size instead of how it is spelt
    (nproc_per_node 'gpu' counted on this machine)."""
    free = free_fields("cache")
    fields = {name: value for name, value in flatten(config.model_dump(mode="json")).items() if name not in free}
    fields["training.distributed.world_size"] = world_size(config.training.distributed)
    return fields


class _LogStream:
    """A text stream that forwards each line to a logger."""

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def write(self, text: str) -> None:
        for line in text.splitlines():
            if line.strip():
                self.logger.info(line)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def device_limit(client: SyncPrefectClient, name: str, slots: int, logger: Any) -> GlobalConcurrencyLimitResponse:
    """The global concurrency limit `name`, created with `slots` when it does not exist yet. Two
    runs may create it at the same moment: the server keeps one (unique name), the other reads it."""
    try:
        return client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        pass
    try:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
        logger.info("created concurrency limit %s with %d slots", name, slots)
    except ObjectAlreadyExists:
        pass
    return client.read_global_concurrency_limit_by_name(name)


@contextmanager
def device_slots(claim: DeviceClaim, logger: Any) -> Iterator[None]:
    """Hold `claim.occupy` slots of each of the claim's device limits (created on first use) while
    the block runs, released on exit (an exception's included). The slots are leased
    (LEASE_SECONDS, renewed in the background): a holder killed with kill -9 frees them when its
    lease runs out. The log records each side as it happens: a device found busy is one line per
    busy limit, "waiting for device:cpu (2 of 2 slots busy)", then a check every POLL_SECONDS; the
    slots taken, "took 1 slot(s) of device:cpu at once" or "... after waiting 3.2 s"; and
    "releasing 1 slot(s) of device:cpu" before they are released (so no other run's "took" line
    can come before it); slots are requested once they are free, never
    queued inside Prefect: its acquisition service retries a refused request until it succeeds and
    the process waits for it at exit, so Ctrl-C or SIGTERM of a waiting run would hang until the
    device came free. A disabled limit (`prefect gcl disable`) is not waited for."""
    context = TaskRunContext.get()
    holder = ConcurrencyLeaseHolder(type="task_run", id=context.task_run.id) if context else None
    names = ", ".join(claim.names)
    with ExitStack() as held:
        with get_client(sync_client=True) as client:
            limits = [device_limit(client, name, claim.slots, logger) for name in claim.names]
            occupy = max(1, min(claim.occupy, *(limit.limit for limit in limits)))  # more than a limit is refused
            waited_since = None  # time.monotonic() when the device was first found busy
            while True:
                busy = [limit for limit in limits if limit.active and limit.active_slots + occupy > limit.limit]
                if busy and waited_since is None:
                    for limit in busy:
                        logger.info("waiting for %s (%d of %d slots busy)", limit.name, limit.active_slots, limit.limit)
                    waited_since = time.monotonic()
                if not busy:
                    take = concurrency(
                        list(claim.names), occupy, max_retries=0, lease_duration=LEASE_SECONDS, holder=holder
                    )
                    try:
                        held.enter_context(take)
                        break
                    except ConcurrencySlotAcquisitionError as error:
                        if not slots_taken(error):  # taken by another training since the check: wait again
                            raise
                time.sleep(POLL_SECONDS)
                limits = [client.read_global_concurrency_limit_by_name(name) for name in claim.names]
        how = "at once" if waited_since is None else f"after waiting {time.monotonic() - waited_since:.1f} s"
        logger.info(
            "took %d slot(s) of %s %s (lease %.0f s, renewed while training)", occupy, names, how, LEASE_SECONDS
        )
        yield
        logger.info("releasing %d slot(s) of %s", occupy, names)


@cached_task(
    "normalization",
    dataset=by_fingerprint,
    validated=by_exclusions,
    config=by_training_fields,
    task_run_name=run_name("train {config.model.name} on {dataset_name}"),
)
def train_model(
    dataset: DatasetRef,
    validated: ValidatedData,
    config: PipelineConfig,
    normalization: Normalization,
    run_dir: str,
    resume_from: str | None = None,
) -> TrainOutput:
    """Train with checkpoints (last.pt every epoch, best.pt), TensorBoard curves and a progress
    artifact, holding the device's slots (a cached training never gets here: it takes none)."""
    logger = get_run_logger()
    if resume_from:
        logger.info("resuming from %s", resume_from)
    config = config.model_copy(update={"data": normalization.apply(config.data)})
    claim = device_claim(config.training)
    with device_slots(claim, logger), written_files(run_dir, LAST_CHECKPOINT_PATH, BEST_CHECKPOINT_PATH) as files:
        result = train_run(
            run_dir,
            validated.apply(dataset),
            config,
            resume_from,
            callbacks=[PrefectProgressCallback(config.training.epochs)],
            progress_stream=_LogStream(logger),
        )  # epoch lines once, in the run log
    return TrainOutput(fit=result, files=files)
