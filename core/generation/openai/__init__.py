"""OpenAI-compatible HTTP: ``client.py`` (``generation.backend = "openai"``, any
OpenAI-compatible server) and ``server.py`` (serves any generator over that API)."""
