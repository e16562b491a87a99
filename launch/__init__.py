"""Runnable jobs (run from the repository root with ``python -m launch.train``, ``torchrun -m``) and their configs."""
