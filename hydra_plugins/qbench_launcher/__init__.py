"""qbench's Hydra launcher plugins. Hydra only instantiates launchers defined under the ``hydra_plugins``
namespace package, so qbench's SLURM launcher lives here (slurm_launcher.py); the SLURM logic it relies on
(job states, error rows for jobs that ended without a result) is in qbench/run/slurm.py."""
