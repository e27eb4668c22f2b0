"""The Telegram channel, on python-telegram-bot (see adapter.py and docs/testing.md)."""
