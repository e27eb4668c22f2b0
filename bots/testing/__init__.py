"""Fake platform servers on loopback, for testing bots with the real platform clients.

See docs/testing.md. Nothing here is imported by Parley itself.
"""
