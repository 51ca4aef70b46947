"""Work without a connection: a durable job queue on the database servelm already
uses, with two doors and the chat walk's money rules.

- ``store``: the rows (jobs, lines, files), created and read.
- ``queue``: claims with leases (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, a
  conditional UPDATE on SQLite), a line's ending in its settlement's transaction,
  a job's ending, cancel, expiry and retention, webhook scheduling.
- ``walk``: queued work through ``serving.ChatService``: held at submission (async)
  or when a line starts (batch), settled once with the line's output row.
- ``runner``: claims and runs lines on capacity live requests leave, ends jobs,
  renews leases, expires and purges, sends webhooks, feeds ``/metrics``.
- ``service``: Segmind's async API and OpenAI's Files and Batches, for the routers
  in ``servelm.api.jobs``; ``views``: the shapes clients see.
- ``webhooks``: Standard Webhooks signatures, delivery with retries and backoff.
"""
