"""A training run's folder (`outdir`) and the rules for reusing one.

A run writes three files there: checkpoint.pt (the training checkpoint,
`fastlego.training_checkpoint`), metrics.jsonl (one JSON record per logged step) and config.json
(the settings, the network spec, the dataset). A run never overwrites another: a folder that
holds a run is refused before any work (`RunFolderInUse`) unless the settings say what to do
with it: `resume="auto"` continues it (its metrics are kept, less records of steps after its
checkpoint), `overwrite=True` replaces it (metrics start empty, its checkpoint is removed); a
run resumed from another folder's checkpoint needs a folder without a run (or `overwrite=True`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional

if TYPE_CHECKING:  # only for annotations: fastlego.training imports this module
    from .training import TrainConfig

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.json"
RUN_FILES = (CHECKPOINT_NAME, METRICS_NAME, CONFIG_NAME)


class RunFolderInUse(ValueError):
    """`outdir` holds another training run and neither resume nor overwrite says what to do."""


def existing_run_files(outdir: str) -> List[str]:
    """The files of a training run (checkpoint.pt, metrics.jsonl, config.json) present in outdir."""
    return [name for name in RUN_FILES if os.path.exists(os.path.join(outdir, name))]


@dataclass(frozen=True)
class RunPlan:
    """What a run does with its outdir (`plan_run`'s decision)."""

    resume_path: Optional[str]   # the checkpoint to continue from, if any
    continues_outdir: bool       # True: that checkpoint is outdir's own (its metrics are kept)


def plan_run(cfg: TrainConfig) -> RunPlan:
    """What this run does with `outdir`, decided before any work: continue its run (resume='auto'
    or its own checkpoint), start in an empty folder, or replace its run (overwrite=True). A folder
    that holds another run is never written to otherwise: RunFolderInUse says what to pass."""
    outdir = cfg.outdir
    own = os.path.join(outdir, CHECKPOINT_NAME)
    found = existing_run_files(outdir)
    fix = ("pass --resume auto (API: resume='auto') to continue that run, a fresh --outdir to keep it and "
           f"train another, or --overwrite (API: overwrite=True) to replace it")
    if cfg.resume == "auto":
        if os.path.exists(own):
            return RunPlan(own, True)
        if found and not cfg.overwrite:
            raise RunFolderInUse(
                f"{outdir!r} holds {', '.join(found)} of an earlier run but no {CHECKPOINT_NAME}, so --resume auto "
                f"has nothing to continue: pass --overwrite (API: overwrite=True) to start afresh there (its "
                f"metrics are discarded), or a fresh --outdir")
        return RunPlan(None, False)
    if cfg.resume:
        if not os.path.exists(cfg.resume):
            raise FileNotFoundError(f"checkpoint {cfg.resume!r} (--resume) does not exist")
        if os.path.exists(own) and os.path.samefile(cfg.resume, own):
            if cfg.overwrite:
                raise ValueError(f"overwrite=True would delete {own}, the run this call resumes from: drop "
                                 f"--overwrite to continue it (or use --resume auto)")
            return RunPlan(own, True)
        if found and not cfg.overwrite:
            raise RunFolderInUse(f"{outdir!r} already holds another training run ({', '.join(found)}), and this "
                                 f"run resumes from a different checkpoint, {cfg.resume!r}; refusing to mix the two. "
                                 f"Pass a fresh --outdir to continue {cfg.resume!r} there, --resume auto to continue "
                                 f"{outdir!r}'s own run, or --overwrite (API: overwrite=True) to replace it")
        return RunPlan(cfg.resume, False)
    if found and not cfg.overwrite:
        raise RunFolderInUse(f"{outdir!r} already holds a training run ({', '.join(found)}); refusing to overwrite "
                             f"it: {fix}")
    return RunPlan(None, False)


def start_metrics(cfg: TrainConfig, plan: RunPlan, step: int) -> None:
    """Rank 0, as the run starts: a continued run keeps its metrics.jsonl, less records of steps
    after its checkpoint (those steps are redone); any other run starts an empty one (and, with
    overwrite, removes the replaced run's checkpoint, so that it cannot be resumed by mistake)."""
    metrics = os.path.join(cfg.outdir, METRICS_NAME)
    if plan.continues_outdir:
        if not os.path.exists(metrics):
            return
        with open(metrics) as f:
            lines = f.readlines()

        def later(line: str) -> bool:
            try:
                return int(json.loads(line)["step"]) > step
            except (ValueError, KeyError, TypeError):
                return False

        kept = [line for line in lines if not later(line)]
        if len(kept) != len(lines):
            tmp = f"{metrics}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, metrics)
        return
    own = os.path.join(cfg.outdir, CHECKPOINT_NAME)
    if cfg.overwrite and os.path.exists(own) and not (plan.resume_path and os.path.samefile(plan.resume_path, own)):
        os.remove(own)
    open(metrics, "w").close()
