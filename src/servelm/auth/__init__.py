"""Who is calling: API keys, their digests and cache (``keys.py``), revocation that
reaches every gateway at once (``revocation.py``), and the web console's sessions
(``sessions.py``)."""
