"""``hydra/launcher=slurm`` (conf/hydra/launcher/slurm.yaml): one SLURM job per cell (a job array), through hydra-submitit-launcher.

What it adds to hydra-submitit-launcher's SlurmLauncher, each because a shared cluster does it to a sweep:
- cells already done are not submitted (a rerun of a 40-cell sweep for 2 failed cells queues 2 jobs, not 40);
- a job that ends without a result (scancel, past its time limit, pre-empted, node failure, out of its memory)
  becomes an error row of its own class (cancelled, timeout, preempted, node_fail, oom), the sweep goes on,
  and ``run.rerun_failed=true`` redoes it. The stock launcher raises on the first such job and the sweep dies;
- the submitting process may die (SIGKILL, a closed ssh session) while its jobs go on running: every cell's job
  id is kept in ``<cell>/.attempt/slurm.json``, and the next start waits for a job that is still alive instead
  of submitting the cell again; a job that does start twice waits on the cell's lock and finds it done;
- the job's environment: sbatch exports the submitting shell's environment, and the variables a cell needs
  (offline switches, QBENCH_DATA, QBENCH_CACHE, PYTHONPATH) are also exported by the job script itself, for
  clusters whose sbatch exports nothing; secrets are never written into the job script, and the job logs
  qbench keeps are scrubbed of any secret value of the submitting environment once the job ends.
"""
# No `from __future__ import annotations` here: Hydra loads plugin modules outside sys.modules, where a dataclass
# with string annotations cannot resolve them.

import logging
import os
import shlex
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import OmegaConf, open_dict, read_write

from qbench.run import slurm
from qbench.store.layout import JOB_RECORD, attempt_file, cell_id

log = logging.getLogger("qbench")

# Exported by the job script (names and values; never a secret): what a cell needs to find its code and data
JOB_ENV = ("PYTHONPATH", "QBENCH_COMMAND", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
           "GPTQMODEL_OFFLINE", "HF_HOME", "QBENCH_DATA", "QBENCH_CACHE")


@dataclass
class QbenchSlurmConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.qbench_launcher.slurm_launcher.QbenchSlurmLauncher"
    poll_s: float = 15.0  # seconds between scheduler queries while the sweep waits for its jobs
    lost_after_s: float = 600.0  # a job the scheduler no longer knows, with no result after this long: "lost"


# Hydra imports every module under hydra_plugins when it starts: this makes `qbench_slurm` a launcher config
ConfigStore.instance().store(group="hydra/launcher", name="qbench_slurm", node=QbenchSlurmConf, provider="qbench")


def _ignore_usr2(signum: int, frame: Any) -> None:
    log.warning("SLURM: the job's time limit is near; the cell runs on until SLURM stops it")


class QbenchSlurmLauncher(SlurmLauncher):
    def __init__(self, **params: Any) -> None:
        self.poll_s = float(params.pop("poll_s", 15.0))
        self.lost_after_s = float(params.pop("lost_after_s", 600.0))
        super().__init__(**params)

    # ------------------------------------------------------------------------------------------ in the job
    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        # submitit answers SIGUSR2 (sent signal_delay_s before the time limit) by checkpointing and requeueing,
        # or else by raising inside whatever runs. A cell is not resumable: it runs on until SLURM stops it,
        # and the row then says timeout.
        signal.signal(signal.SIGUSR2, _ignore_usr2)
        os.environ[slurm.OWN_ALLOCATION] = "1"  # this job's CPUs and GPUs are the cell's slot (qbench/run/slots.py)
        return super().__call__(*args, **kwargs)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        return None  # no requeue on time-out: a half-measured cell cannot resume

    # ------------------------------------------------------------------------------------------ submitting
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        cells = [self._cell(list(o)) for o in job_overrides]
        returns: Dict[int, JobReturn] = {}
        todo = []
        for i, cell in enumerate(cells):
            done = _done(cell)
            if done:
                log.info("%s: skipped, already %s", cell["id"], done)
                returns[i] = _job_return(cell["overrides"], f"skipped:{done}")
            else:
                todo.append(i)
        previous = {i: _read_json(attempt_file(cells[i]["dir"], JOB_RECORD)) for i in todo}
        alive = slurm.job_states([p["job_id"] for p in previous.values() if p])
        waiting: Dict[int, Tuple[str, Any]] = {}
        for i in todo:
            prev = previous[i]
            if prev and slurm.is_live((alive.get(prev["job_id"]) or {}).get("state")):
                log.info("%s: SLURM job %s of an earlier start still holds this cell; waiting for it",
                         cells[i]["id"], prev["job_id"])
                waiting[i] = (prev["job_id"], _job_handle(prev))
        submit = [i for i in todo if i not in waiting]
        if submit:
            waiting.update(self._submit(cells, submit, initial_job_idx))
        self._wait(cells, waiting, returns)
        return [returns[i] for i in range(len(cells))]

    def _cell(self, overrides: List[str]) -> Dict[str, Any]:
        assert self.hydra_context is not None and self.config is not None
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with read_write(cfg), open_dict(cfg):
            del cfg["hydra"]  # as Hydra's run_job does: hydra.* needs a job's runtime to resolve
        cfg_dict = OmegaConf.to_container(cfg, resolve=True)
        cid = cell_id(cfg)
        return {"id": cid, "overrides": overrides, "config": cfg_dict,
                "dir": Path(cfg.run.runs_dir) / cfg.run.sweep / cid,
                "force": bool(cfg.run.force), "rerun_failed": bool(cfg.run.rerun_failed)}

    def _executor(self) -> Any:
        import submitit

        params = dict(self.params)
        folder = params.pop("submitit_folder")
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm",
                                         slurm_max_num_timeout=params.pop("max_num_timeout", 0))
        params["setup"] = _job_env_lines() + list(params.get("setup") or [])
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
        return executor

    def _submit(self, cells: List[Dict[str, Any]], idxs: List[int], first_idx: int) -> Dict[int, Tuple[str, Any]]:
        from hydra.core.singleton import Singleton

        from qbench.store.jsonio import now_iso, write_json_atomic

        executor = self._executor()
        params = []
        for i in idxs:
            log.info("\t#%d : %s", first_idx + i, " ".join(filter_overrides(cells[i]["overrides"])))
            params.append((cells[i]["overrides"], "hydra.sweep.dir", first_idx + i, f"job_id_for_{first_idx + i}",
                           Singleton.get_state()))
        jobs = executor.map_array(self, *zip(*params))
        out = {}
        for i, job in zip(idxs, jobs):
            record = {"job_id": job.job_id, "folder": str(self.params["submitit_folder"]), "submitted_at": now_iso()}
            write_json_atomic(attempt_file(cells[i]["dir"], JOB_RECORD), record)
            out[i] = (job.job_id, job)
        log.info("submitted %d cell(s) as SLURM job array %s", len(jobs), jobs[0].job_id.split("_")[0])
        return out

    def _wait(self, cells: List[Dict[str, Any]], waiting: Dict[int, Tuple[str, Any]],
              returns: Dict[int, JobReturn]) -> None:
        """Poll the scheduler until every job has ended, settling each cell as its job ends."""
        unknown_since: Dict[int, float] = {}
        while waiting:
            states = slurm.job_states(job_id for job_id, _ in waiting.values())
            for i, (job_id, job) in list(waiting.items()):
                info = states.get(job_id)
                state = (info or {}).get("state")
                finished = job.paths.result_pickle.exists() and not slurm.is_live(state)
                if info is None and not finished:  # not (yet, or no longer) known to the scheduler
                    if time.time() - unknown_since.setdefault(i, time.time()) < self.lost_after_s:
                        continue
                elif slurm.is_live(state) and not finished:
                    continue
                status = slurm.settle(cells[i], job_id, info, job)
                returns[i] = _job_return(cells[i]["overrides"], status)
                del waiting[i]
            if waiting:
                time.sleep(self.poll_s)


def _done(cell: Dict[str, Any]) -> Optional[str]:
    from qbench.store.rerun import should_skip

    return should_skip(cell["dir"], cell["force"], cell["rerun_failed"])


def _job_env_lines() -> List[str]:
    from qbench.store.redaction import redact

    return [redact(f"export {k}={shlex.quote(os.environ[k])}") for k in JOB_ENV if k in os.environ]


def _job_handle(record: Dict[str, Any]) -> Any:
    from submitit.slurm.slurm import SlurmJob

    return SlurmJob(folder=record["folder"], job_id=record["job_id"])


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    from qbench.store.jsonio import read_json

    data = read_json(path)
    return data if isinstance(data, dict) and data.get("job_id") else None


def _job_return(overrides: List[str], status: str) -> JobReturn:
    ret = JobReturn(overrides=overrides, status=JobStatus.COMPLETED)
    ret.return_value = status
    return ret
