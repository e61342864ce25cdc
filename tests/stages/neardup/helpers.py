"""Running the near-duplicate steps (and decontamination) on a copy of the ingested demo run,
and reading what they decided by the planted ids of ``curate/demo/data.py``."""

from __future__ import annotations

import orjson

from curate.core.folder import RunFolder
from curate.stages.decontaminate.config import DecontaminateConfig
from curate.stages.decontaminate.stage import DecontaminateStage
from curate.stages.neardup.config import NearDupConfig
from curate.stages.neardup.groups import NearDupGroupsStage
from curate.stages.neardup.signatures import SignaturesStage
from curate.stages.neardup.stage import NearDupStage
from tests.conftest import run_stages


def neardup_stages(cfg: NearDupConfig, decontaminate: DecontaminateConfig | None = None):
    stages = [SignaturesStage(cfg)]
    excluded: tuple[str, ...] = ()
    if decontaminate is not None:
        stages.append(DecontaminateStage(decontaminate))
        excluded = ("decontaminate",)
    stages += [NearDupGroupsStage(cfg, excluded), NearDupStage(cfg, ("filter", *excluded))]
    return stages


def with_settings(cfg: NearDupConfig, **changes) -> NearDupConfig:
    """``cfg`` with ``changes``, validated (``model_copy(update=...)`` would accept any name)."""
    return NearDupConfig.model_validate({**cfg.model_dump(), **changes})


def run_neardup(run, cfg: NearDupConfig | None = None, decontaminate=None) -> dict:
    return run_stages(run, *neardup_stages(cfg or NearDupConfig(), decontaminate))


GROUPING_OUTPUTS = (
    "neardup_groups",
    "neardup",
    "ledger/neardup",
    "_done/neardup_groups",
    "_done/neardup",
)


def drop_grouping(path) -> None:
    """Remove a run's grouping and ledger steps (outputs and markers), so they run again."""
    import shutil

    for folder in GROUPING_OUTPUTS:
        shutil.rmtree(path / folder, ignore_errors=True)


def planted_ids(run: RunFolder) -> dict[str, str]:
    """sample_id -> the annotation's ``id`` (``nd:resized``, ``leak:text``, ...)."""
    rows = run.read("samples").select(["sample_id", "extra"]).to_pylist()
    return {r["sample_id"]: str(orjson.loads(r["extra"] or "{}").get("id")) for r in rows}


def ledger_by_id(run: RunFolder, stage: str) -> dict[str, dict]:
    """The stage's ledger rows keyed by planted id."""
    ids = planted_ids(run)
    return {ids[r["sample_id"]]: r for r in run.ledger(stage).to_pylist()}
