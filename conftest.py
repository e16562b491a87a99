"""pytest's configuration at the repository root.

Being here, this file puts the repository root on ``sys.path`` (pytest's rootdir
conftest), so tests import ``launch.*`` and ``benchmarks.*`` as packages, the way
``python -m launch.train`` runs them. Each test module's folder (``tests/``) goes on the
path as well, which lets spawned workers import test modules by name.
"""
