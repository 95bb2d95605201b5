"""HTTP serving: the FastAPI app, its routers, auth and metrics."""
