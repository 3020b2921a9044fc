"""Tracking, one owner: params, metrics, tags, artifacts, lineage and the run tree.

- ``base``: the ``Tracker`` protocol (one run), ``NullTracker``, ``RunTracking`` (the flows' backend with
  typed hooks);
- ``secrets``: the one rule for credentials (redact keys, scrub values) every tracker applies;
- ``local``: memory, JSONL and tee trackers; ``LocalTracking`` (the ``tracking: local`` backend);
- ``mlflow_names`` (MLflow's naming and size rules), ``mlflow_connection`` (client + back-off, warm start),
  ``mlflow_spool`` (undelivered records), ``mlflow_run`` (``MlflowTracker``: one run), ``mlflow_pipeline``
  (the parent/nested run tree), ``mlflow_plots``, ``mlflow_flow`` (``MlflowRunTracking``: the flows'
  backend), ``mlflow_after`` (replaying a spool, comparing two runs).
"""
