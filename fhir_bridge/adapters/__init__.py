"""Adapters: the only modules that talk to httpx, Redis, the file system and JOSE libraries."""
