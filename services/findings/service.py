"""FindingsService: images + masks -> visual inputs -> one VLM question per catalog task."""

from __future__ import annotations

import grpc

from cmrvl.v1 import stages_pb2, stages_pb2_grpc
from services.runtime.errors import StageError, grpc_errors
from services.runtime.server import ServiceSpec
from services.runtime.settings import Settings
from services.runtime.storage import ObjectStore

STAGE_PREFIX = "{study_id}/findings/"


class FindingsServicer(stages_pb2_grpc.FindingsServiceServicer):
    def __init__(self, store: ObjectStore, settings: Settings):
        self.store, self.settings = store, settings

    @grpc_errors
    def GenerateFindings(self, request, context):
        if not self.settings.vlm_base_url:
            # No model server and no embedded weights on this machine: say so; the gateway
            # then delivers the measurements as a partial report.
            raise StageError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "no vision-language model configured (set CMRVL_VLM_BASE_URL to an OpenAI-compatible server)",
            )
        raise StageError(grpc.StatusCode.UNIMPLEMENTED, "VLM findings are not implemented yet")


def service_spec(settings: Settings) -> ServiceSpec:
    store = ObjectStore(settings)
    return ServiceSpec(
        names=[stages_pb2.DESCRIPTOR.services_by_name["FindingsService"].full_name],
        register=lambda server: stages_pb2_grpc.add_FindingsServiceServicer_to_server(
            FindingsServicer(store, settings), server),
        tokens=frozenset({settings.internal_token} - {""}),
    )
