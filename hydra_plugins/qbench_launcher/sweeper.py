"""``hydra/sweeper=qbench`` (conf/hydra/sweeper/qbench.yaml, the default in conf/config.yaml): Hydra's basic sweeper,
whose record of the sweep (``<sweep>/multirun.yaml``) is redacted.

Hydra writes the whole composed config there, command-line overrides included, before the first job: a secret
given on the command line (``method.description=$HF_TOKEN``) would be kept in clear. The sweeper's own copy of
the config is used for nothing else but the sweep folder's name, so it is replaced by a redacted copy; the
launcher and every job keep the real one.
"""
# No `from __future__ import annotations` here: Hydra loads plugin modules outside sys.modules.

from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from omegaconf import DictConfig, OmegaConf

from qbench.store.redaction import redact


def redacted_config(config: DictConfig) -> DictConfig:
    """A copy of ``config`` with every secret value (store.redact) replaced; interpolations stay as written."""
    return OmegaConf.create(redact(OmegaConf.to_container(config, resolve=False)))


class QbenchSweeper(BasicSweeper):
    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.config = redacted_config(config)
