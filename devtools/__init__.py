"""What the tests and the bench share beyond the service: a local Citus cluster
(``citus_cluster``) and the Citus build it runs on (``citus_build``).

Installed beside ``nexus`` by the project, and never imported by it
(tests/unit/test_import_direction.py checks that).
"""
