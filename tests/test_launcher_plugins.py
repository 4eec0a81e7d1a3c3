"""qbench's own Hydra launchers are found however qbench is installed, including as an editable install, whose
import hook serves ``hydra_plugins.qbench_launcher`` without Hydra being able to list it."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# qbench and its plugins served by an import hook, as pip install -e does, with the checkout itself off sys.path
EDITABLE = textwrap.dedent("""
    import importlib.abc, importlib.util, sys
    from pathlib import Path
    repo = Path(sys.argv[1])
    roots = {"qbench": repo / "qbench", "hydra_plugins.qbench_launcher": repo / "hydra_plugins" / "qbench_launcher"}
    sys.path = [p for p in sys.path if p and Path(p).resolve() != repo]

    class Editable(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name in roots:
                return importlib.util.spec_from_file_location(name, roots[name] / "__init__.py",
                                                              submodule_search_locations=[str(roots[name])])
            return None

    sys.meta_path.insert(0, Editable())
    from qbench.run import cli
    assert Path(cli.__file__).resolve().parents[1] == roots["qbench"], cli.__file__
    cli.main(sys.argv[2:])
""")


@pytest.mark.parametrize("launcher, target", [
    ("parallel", "hydra_plugins.qbench_launcher.parallel_launcher.QbenchParallelLauncher"),
    ("slurm", "hydra_plugins.qbench_launcher.slurm_launcher.QbenchSlurmLauncher"),
])
def test_own_launcher_configs_load_from_an_editable_install(tmp_path, launcher, target):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run([sys.executable, "-c", EDITABLE, str(REPO), "-m", "model=tiny", "method=fp32",
                           f"hydra/launcher={launcher}", "--cfg", "hydra", "-p", "launcher._target_"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert target in proc.stdout.splitlines(), proc.stdout[-2000:]
