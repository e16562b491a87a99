"""``distlion.accelerate`` is ``distlion.integrations.accelerate``, kept under its former name so that
existing imports keep working."""

import sys

from distlion.integrations import accelerate as _integration

sys.modules[__name__] = _integration
