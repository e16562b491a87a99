import os
import sys

# Workers spawned by tests/multiprocess.py import test modules by name.
sys.path.insert(0, os.path.dirname(__file__))
