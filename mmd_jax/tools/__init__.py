"""Tools above the run object: --mode=aot (aot.py), --mode=print_sharding (cli.py) and their
tables (report.py). They lower and report the run's own step programs (mmd_jax/runs)."""
