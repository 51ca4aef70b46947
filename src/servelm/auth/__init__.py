"""Who is calling: API keys, their digests, cache and revocation."""
