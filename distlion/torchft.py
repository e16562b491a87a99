"""``distlion.torchft`` is ``distlion.integrations.torchft``: DistLion across torchft replica groups."""

import sys

from distlion.integrations import torchft as _integration

sys.modules[__name__] = _integration
