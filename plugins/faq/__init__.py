"""The FAQ plugin: answers customer questions from a knowledge base (see docs/plugins.md)."""
