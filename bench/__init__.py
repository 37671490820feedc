"""Load generation for Nexus: ``python -m bench`` (``make bench``), kept out of the service package.

Modules, imported one way (``__main__`` → suites → ``targets`` / ``workload`` → ``core``):
``core`` (timed scenarios, pgbench, CPU counters, the report), ``targets`` (the
bench's own throwaway servers and databases), ``workload`` (bench data, RPC
scenarios, pgbench scripts of the same SQL), and one module per suite:
``interactions``, ``memory``, ``cluster``.
"""
