"""Helpers the tests share, by concern; a test imports each from the module that owns it:

- ``rpc``: credentials, clients, rich errors, paged lists, page tokens to forge;
- ``servers``: server configuration, in-process servers and maintenance, health;
- ``databases``: a test's own databases on the backend under test, rows read and held;
- ``processes``: the nexus command and ``nexus serve`` as subprocesses, the postmaster;
- ``vectors``: float32 vectors, distances, memories created through the API;
- ``waiting``: bounded polling.

Plain functions and classes, no fixtures (those are in conftest.py), and no name
starting with ``test`` for pytest to collect.
"""
