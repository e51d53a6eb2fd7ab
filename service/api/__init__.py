"""HTTP layer: routers in ``routes/``, dependency aliases in ``deps``, ASGI middleware."""
