"""Wire formats: each protocol's request parsing, response encoding and error body, no I/O."""
