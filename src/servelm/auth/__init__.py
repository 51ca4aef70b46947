"""Who is calling: API keys, their digests and cache (``keys.py``), and revocation
that reaches every gateway at once (``revocation.py``)."""
