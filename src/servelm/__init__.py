"""servelm: a self-hosted serverless LLM API."""

__version__ = "0.1.0"
