"""``distlion.dcp`` is ``distlion.integrations.dcp``, kept under its former name so that
existing imports keep working."""

import sys

from distlion.integrations import dcp as _integration

sys.modules[__name__] = _integration
