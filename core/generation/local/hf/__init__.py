"""The seam to transformers' private continuous-batching internals.

Everything in Parley that relies on names transformers does not promise to keep lives
here, one module per patch, each saying which private names it uses:

- ``attention.py``: per-request attention over the packed batch (``parley_varlen``);
- ``scheduler.py``: the newcomers-first batch schedule;
- ``sampler.py``: per-request top-p without sorting the vocabulary;
- ``repetition.py``: per-request repetition penalty and no-repeat n-gram;

The rest of the local backend reaches transformers only through these modules and the
public ``from_pretrained`` / ``generate`` / ``init_continuous_batching`` API.
"""
