"""``distlion.lightning`` is ``distlion.integrations.lightning``, kept under its former name so that
existing imports keep working."""

import sys

from distlion.integrations import lightning as _integration

sys.modules[__name__] = _integration
