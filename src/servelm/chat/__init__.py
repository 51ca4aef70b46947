"""The chat walk: its orchestration, wire models, prompt preparation, input limits and media."""
