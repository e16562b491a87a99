"""``distlion.unwrap``, now in ``distlion.integrations.common``; this module keeps existing imports working."""

from distlion.integrations.common import unwrap  # noqa: F401
