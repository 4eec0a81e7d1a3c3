"""The run stage: expand a sweep, preflight every cell, launch each in its own process (locally or on SLURM),
run one cell start to end, and summarise the sweep."""
