"""``distlion.deepspeed`` is ``distlion.integrations.deepspeed``, kept under its former name so that
existing imports keep working."""

import sys

from distlion.integrations import deepspeed as _integration

sys.modules[__name__] = _integration
