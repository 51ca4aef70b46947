"""`servelm bench`: the load generator and its multi-turn conversations."""
