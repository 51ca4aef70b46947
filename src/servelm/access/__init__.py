"""Who is calling, and how much they may: API keys, their digests and cache
(``keys.py``), revocation and changed limits that reach every gateway at once
(``revocation.py``), the web console's sessions (``sessions.py``), and rate limits
(``limits/``: requests, tokens and requests in flight per key and per account, in
this process or across gateways through Redis)."""
