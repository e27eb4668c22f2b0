"""The web channel: an HTTP API with streaming replies, and a demo page."""
