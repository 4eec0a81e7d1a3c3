"""result.json's typed sections (filled in below)."""
from __future__ import annotations

SCHEMA_VERSION = 1  # changes when a field of result.json changes meaning
