"""A fleet of engine replicas behind one model: health, ejection and routing.

``spec`` (what the models file says), ``replicas`` (each replica's live state and
connection pool), ``health`` (active probes), ``routing`` (which replica a request
tries first, and in what order it fails over). ``OpenAIUpstreamEngine`` uses them.
"""
