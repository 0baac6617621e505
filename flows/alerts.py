"""`visionflow alerts apply`: the automations of automations.yaml on a Prefect server: the alerts,
each sending its notifications through one Prefect notification block, and the automatic retry
of crashed runs.

Through Prefect's public client API, not `prefect automation create --from-file`: that command
needs the block's id written in the file and creates a second copy of every automation when it
is run again. Here the file names no block, the block is given when applying, and applying
again updates each automation of the same name in place (so it keeps its id and history).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from uuid import UUID

from visionflow.errors import ConfigError, field_problem

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.events.schemas.automations import AutomationCore

AUTOMATIONS_FILE = Path(__file__).resolve().parents[1] / "automations.yaml"
WEBHOOK_BLOCK = "visionflow-alerts"  # the Custom Webhook block `apply --webhook-url` saves
WEBHOOK_URL_ENV = "VISIONFLOW_ALERTS_WEBHOOK_URL"  # --webhook-url's default
# The webhook's JSON body: Prefect substitutes {{subject}} and {{body}}, rendered by the automation.
WEBHOOK_JSON = {"subject": "{{subject}}", "body": "{{body}}"}
NOTIFY_ACTION = "send-notification"


def load_automations(path: Path | str, block_document_id: UUID) -> list[AutomationCore]:
    """The automations of a file like automations.yaml, validated by Prefect's own model, with
    every send-notification action sending through the block `block_document_id`."""
    import yaml
    from prefect.events.schemas.automations import AutomationCore
    from pydantic import ValidationError

    try:
        document = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"Cannot read automations file '{path}': {err}") from err
    entries = document.get("automations") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"Automations file '{path}' has no `automations:` list")
    automations = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConfigError(f"Entry {index} of `automations:` in '{path}' is not a mapping")
        name = entry.get("name", f"entry {index}")
        actions = [
            {**action, "block_document_id": block_document_id}
            if isinstance(action, dict) and action.get("type") == NOTIFY_ACTION
            else action
            for action in entry.get("actions") or []
        ]
        try:
            automation = AutomationCore.model_validate({**entry, "actions": actions})
        except ValidationError as err:
            problem = field_problem(err, "automation")
            raise ConfigError(
                f"Automation '{name}' in '{path}' is not a Prefect automation: {problem.field}: {problem.message}"
            ) from err
        automations.append(automation)
    names = [automation.name for automation in automations]
    if len(set(names)) != len(names):
        raise ConfigError(f"Automations file '{path}' repeats a name: {names}")
    return automations


def save_webhook_block(url: str) -> UUID:
    """Save (or overwrite) the Custom Webhook block `visionflow-alerts` that POSTs
    {"subject": ..., "body": ...} as JSON to `url`; returns its block document id."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"Webhook URL '{url}' is not an http:// or https:// URL")
    block = CustomWebhookNotificationBlock(name=WEBHOOK_BLOCK, url=url, method="POST", json_data=WEBHOOK_JSON)
    return block.save(WEBHOOK_BLOCK, overwrite=True)


def find_block(client: SyncPrefectClient, reference: str) -> UUID:
    """The id of the block document `TYPE-SLUG/NAME` (e.g. slack-webhook/team-alerts)."""
    from prefect.exceptions import ObjectNotFound

    slug, _, name = reference.partition("/")
    if not slug or not name:
        raise ConfigError(f"Block '{reference}' is not TYPE/NAME, e.g. slack-webhook/team-alerts")
    try:
        return client.read_block_document_by_name(name, slug).id
    except ObjectNotFound:
        raise ConfigError(
            f"No block '{reference}' on the Prefect server: create it first (Prefect UI, Blocks)"
        ) from None


@dataclass(frozen=True)
class Applied:
    name: str
    automation_id: UUID
    action: Literal["created", "updated"]


def apply_automations(client: SyncPrefectClient, automations: list[AutomationCore]) -> list[Applied]:
    """Create each automation, or update the oldest one of the same name in place and delete any
    later copies (e.g. from `prefect automation create` run twice)."""
    from prefect.client.schemas.sorting import AutomationSort
    from prefect.events.filters import AutomationFilter, AutomationFilterName

    applied = []
    for automation in automations:
        same_name = AutomationFilter(name=AutomationFilterName(any_=[automation.name]))
        *copies, oldest = client.read_automations(automations=same_name, sort=AutomationSort.CREATED_DESC) or [None]
        if oldest is None:
            applied.append(Applied(automation.name, client.create_automation(automation), "created"))
            continue
        client.update_automation(oldest.id, automation)
        for copy in copies:
            client.delete_automation(copy.id)
        applied.append(Applied(automation.name, oldest.id, "updated"))
    return applied
