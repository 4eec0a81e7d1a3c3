"""qbench's Hydra launcher plugins. Hydra only instantiates launchers defined under the ``hydra_plugins``
namespace package, so qbench's launchers live here: SLURM (slurm_launcher.py; the SLURM logic it relies on, job
states and error rows for jobs that ended without a result, is in qbench/run/slurm.py), the parallel one that stops
with the sweep (parallel_launcher.py), and the sweeper that redacts multirun.yaml (sweeper.py)."""
