"""The in-process backend (``generation.backend = "local"``): a model in this process.

- ``generator.py``: :class:`LocalGenerator`, the service the engine talks to;
- ``models.py`` (which model, loaded how), ``prompt.py`` (chat -> token ids that fit),
  ``decoding.py`` (token ids -> text, stop strings);
- ``ticket.py``: one request's passage to the model thread and back;
- ``sequential.py`` (one at a time) and ``batching.py`` + ``fair_queue.py``
  (continuous batching): the two schedulers; ``runner.py``: the model step;
- ``hf/``: the only code that touches transformers' private internals.
"""
