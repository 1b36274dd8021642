"""SLURM: which batch job this process belongs to, its rank, and requeueing it.

"A SLURM job" here is what Lightning's SLURMEnvironment manages: tasks started by srun (directly
or by the submitit launcher) in a job whose name is not `bash` or `interactive`.
"""
from __future__ import annotations

import logging
import os
import subprocess

log = logging.getLogger(__name__)


def slurm_job_id() -> str | None:
    """The SLURM job id ("<array job>_<task>" in a job array), stable across requeues; None outside a job."""
    from lightning.fabric.plugins.environments import SLURMEnvironment  # imported here: seconds to import

    if not SLURMEnvironment.detect():
        return None
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]


def slurm_rank() -> int:
    """This task's global rank in its SLURM job (0 outside one)."""
    return int(os.environ.get("SLURM_PROCID", 0)) if slurm_job_id() else 0


def requeue_slurm_job() -> None:
    """Put this job back in the queue (`scontrol requeue`, as Lightning's auto-requeue does); it
    restarts with the same job id, hence the same run dir, and resumes from its last.ckpt."""
    job_id = slurm_job_id()
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        log.warning("could not requeue SLURM job %s: %s", job_id, error)
        return
    if result.returncode:
        log.warning("scontrol requeue %s failed (exit %d): %s", job_id, result.returncode, result.stderr.strip())
    else:
        log.info("requeued SLURM job %s", job_id)
