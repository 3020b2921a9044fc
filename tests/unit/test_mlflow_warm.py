"""tasks.tracking.mlflow_connection.warm_client: the MLflow client built in the background is the one the connection
uses (store created once, usable from the flow's thread), and a failed warm-up surfaces the normal error."""

from __future__ import annotations

import threading

import pytest

from tasks.tracking import mlflow_connection
from tasks.tracking.mlflow_connection import Connection, warm_client
from tasks.tracking.mlflow_pipeline import PipelineTracking


def test_the_connection_takes_the_warm_client_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    fut = warm_client(uri)
    assert warm_client(uri) is fut  # one build per URI while it is pending
    client = fut.result(timeout=120)
    assert (tmp_path / "mlflow.db").is_file()  # the store was created (and migrated) by the warm-up
    assert threading.current_thread() is threading.main_thread()
    conn = Connection(uri, "kimivl")
    assert conn.client is client
    assert uri not in mlflow_connection._WARM  # taken: a later connection builds its own
    assert Connection(uri, "kimivl").client is not client
    exp = conn.experiment_id()  # usable from this thread (the flow's), not only the builder's
    assert client.get_experiment(exp).name == "kimivl"


def test_a_failed_warm_up_surfaces_the_usual_error(tmp_path):
    (tmp_path / "afile").write_text("not a directory")
    uri = f"sqlite:///{tmp_path / 'afile' / 'mlflow.db'}"  # the store's parent is a regular file
    fut = warm_client(uri)
    with pytest.raises(FileExistsError) as warm:
        fut.result(timeout=120)
    # the connection does not hand out the failed future's result: it builds its own client, so the
    # error is raised where the flow first touches MLflow, with MLflow's own message
    with pytest.raises(FileExistsError) as direct:
        Connection(uri, "kimivl").client  # noqa: B018
    assert str(direct.value) == str(warm.value) and "afile" in str(direct.value)
    assert uri not in mlflow_connection._WARM


def test_pipeline_tracking_works_on_a_warm_client(tmp_path):
    from tasks.recipe import load_recipe

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    warm_client(uri)
    recipe = load_recipe("params.yaml")
    tr = PipelineTracking(uri, local_dir=tmp_path / "tracking", out_root=tmp_path)
    run_id = tr.start_pipeline(recipe)
    assert run_id is not None
    tr.parent.flush(force=True)
    run = tr.conn.client.get_run(run_id)
    assert run.data.tags["kimivl.recipe"] == recipe.name and tr.parent.pending() == 0
