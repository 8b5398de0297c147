"""Gateway process: StudyService + the workflow that drives the stages."""

from __future__ import annotations

import logging
import threading

from cmrvl.v1 import study_pb2, study_pb2_grpc
from services.gateway.records import RecordStore
from services.gateway.report import ReportBuilder
from services.gateway.servicer import StudyServicer
from services.gateway.workflow import Workflow
from services.runtime.server import ServiceSpec
from services.runtime.settings import SettingsError, Settings
from services.runtime.storage import ObjectStore

log = logging.getLogger(__name__)


def _warm_up_report() -> None:
    try:
        ReportBuilder.warm_up()
    except Exception:  # only costs the first study its start-up time; never stops the gateway
        log.exception("report warm-up failed")


def _start(workflow: Workflow) -> None:
    threading.Thread(target=_warm_up_report, name="report-warm-up", daemon=True).start()
    workflow.start()


def service_spec(settings: Settings) -> ServiceSpec:
    if not settings.accepted_tokens and not settings.tls_client_ca_file:
        raise SettingsError("the gateway needs CMRVL_AUTH_TOKENS (bearer tokens) or CMRVL_TLS_CLIENT_CA_FILE (mTLS)")
    store = ObjectStore(settings)
    store.ensure_buckets()
    records = RecordStore(store)
    records.check_write_conditions()
    workflow = Workflow(settings, records, ReportBuilder(store, settings.pacs_target, settings.pacs_calling_aet))
    servicer = StudyServicer(settings, store, records, workflow)
    return ServiceSpec(
        names=[study_pb2.DESCRIPTOR.services_by_name["StudyService"].full_name],
        register=lambda server: study_pb2_grpc.add_StudyServiceServicer_to_server(servicer, server),
        tokens=settings.accepted_tokens,
        on_start=lambda: _start(workflow),
        on_stop=workflow.stop,
    )
