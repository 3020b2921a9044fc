"""Data contracts: one Great Expectations suite per dataset kind, and validate-and-quarantine.

- ``derive.py``: each record -> one row of flat derived columns (what the suites check); no GX import.
- ``specs.py``: per-kind content form, media kind and bounds (plain data; overridable); no GX import.
- ``suites.py``: ``build_suite(kind)`` -> ``gx.ExpectationSuite`` (common base + the kind's rules).
- ``validate.py``: ``validate_records(rows, kind) -> ContractResult`` on a cached ephemeral GX context.

The pipeline step that applies them to a dataset directory is ``tasks/data/validate.py`` (``run_validate``).
Importing this package is cheap; Great Expectations (~4 s) loads with ``suites``/``validate``.
"""
