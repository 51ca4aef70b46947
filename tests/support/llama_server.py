"""A standalone llama.cpp HTTP server (xllamacpp's own) in its own process.

Tests and benchmarks use it as a *separate* OpenAI-compatible engine on loopback, the
way vLLM or llama.cpp's server run beside servelm in production::

    python -m tests.support.llama_server MODEL.gguf --port 8101 [--slots 4]

It prints ``READY http://127.0.0.1:PORT`` once the model is loaded and serves until
killed.
"""

from __future__ import annotations

import argparse
import threading


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import xllamacpp

    p = xllamacpp.CommonParams()
    p.model.path = args.model
    p.hostnames = [args.host]
    p.port = args.port
    p.n_parallel = args.slots
    p.kv_unified = True
    p.n_ctx = args.ctx
    p.cpuparams.n_threads = args.threads
    p.cpuparams_batch.n_threads = args.threads
    p.verbosity = -1
    p.warmup = False
    server = xllamacpp.Server(p)
    print(f"READY {server.listening_address}", flush=True)
    threading.Event().wait()  # serve until the process is killed


if __name__ == "__main__":
    main()
