"""Tests of the query interface (insession.query and its HTTP routes)."""
