"""HTTP layer: app factory, thin routers, error rendering, middleware."""
