"""HTTP only: the app factory, thin routers, the one error renderer, middleware,
the connection guard, and the web console (``console/``)."""
