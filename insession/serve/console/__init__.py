"""The browser console at `/console` (issue 16): pages, their live feeds, vendored static files."""

from insession.serve.console.routes import router

__all__ = ["router"]
