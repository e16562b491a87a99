"""``distlion.transformers`` is ``distlion.integrations.transformers``, kept under its former name so that
existing imports keep working."""

import sys

from distlion.integrations import transformers as _integration

sys.modules[__name__] = _integration
