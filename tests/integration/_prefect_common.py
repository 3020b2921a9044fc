"""Reading back from the Prefect API what a flow run recorded: the helpers that the flow tests and the
deployment tests share. Prefect is imported inside the functions, not at import time: importing this module
must not make Prefect read its settings before ``flows.prefect_common`` has set its defaults."""

from __future__ import annotations


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _artifact(key: str, flow_run_id) -> str:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with _client() as c:
        arts = c.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
            )
        )
    assert len(arts) == 1, f"artifact {key!r} of flow run {flow_run_id}: {arts}"
    assert arts[0].type == "markdown"
    return str(arts[0].data)
