"""How servelm runs: `serve --workers N`, `servelm worker`, start-up and drain."""
