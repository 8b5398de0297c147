"""Push the report's DICOM objects (SR + SEG + PDF) back to a PACS by C-STORE (pynetdicom).

Every push is logged with the study id and the peer's answer: the association result (a
rejection with its A-ASSOCIATE-RJ result, source and reason) and the DIMSE status of each object."""

from __future__ import annotations

import io
import logging

log = logging.getLogger(__name__)

# C-STORE statuses that mean the object is stored: success and the three warnings (coercion,
# elements discarded, data set does not match the SOP class).
STORED = (0x0000, 0xB000, 0xB006, 0xB007)


class PacsPushError(RuntimeError):
    pass


def parse_target(target: str) -> tuple[str, str, int]:
    """`AET@host:port` or `AET@[v6 address]:port` (brackets as in URLs) -> (called AE title, host, port)."""
    aet, at, address = target.partition("@")
    host, colon, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        bracketed = ":" in host
    else:
        bracketed = ":" not in host  # an unbracketed IPv6 address is ambiguous (where does the port start?)
    if not (at and colon and aet.strip() and len(aet) <= 16 and "\\" not in aet and host and bracketed
            and port.isdigit() and 0 < int(port) <= 65535):
        raise ValueError(f"PACS target must look like AET@host:port or AET@[ipv6]:port "
                         f"(AE title of 1-16 characters, port 1-65535), got {target!r}")
    return aet, host, int(port)


def _rejection(assoc) -> str:
    """Why the association was not established, in the peer's words where it gave any."""
    if assoc.is_rejected:
        rj = assoc.acceptor.primitive
        return f"association rejected: {rj.result_str}, source {rj.source_str}, reason {rj.reason_str}"
    # pynetdicom reports a refused TCP connection as an abort too: both read the same here.
    return "no association: connection refused, aborted or not answered"


def push(objects: dict[str, bytes], target: str, calling_aet: str = "CMRVL", timeout_s: float = 30.0,
         study_id: str = "") -> dict[str, int | None]:
    """C-STORE every object (name -> DICOM file bytes) in one association; returns name -> DIMSE
    status; raises PacsPushError if the association fails or any object is not stored."""
    import pydicom
    from pynetdicom import AE

    called_aet, host, port = parse_target(target)
    datasets = {name: pydicom.dcmread(io.BytesIO(data)) for name, data in objects.items()}
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    for sop_class in {str(ds.SOPClassUID) for ds in datasets.values()}:
        ae.add_requested_context(sop_class, [str(ds.file_meta.TransferSyntaxUID) for ds in datasets.values()
                                             if str(ds.SOPClassUID) == sop_class][0])
    assoc = ae.associate(host, port, ae_title=called_aet)
    if not assoc.is_established:
        reason = _rejection(assoc)
        log.warning("study %s: PACS push to %s failed: %s", study_id, target, reason)
        raise PacsPushError(f"PACS {target}: {reason}")
    statuses: dict[str, int | None] = {}
    try:
        for name, dataset in datasets.items():
            status = assoc.send_c_store(dataset)
            statuses[name] = int(status.Status) if "Status" in status else None  # empty: no answer
    finally:
        assoc.release()
    answers = {name: "no answer" if s is None else f"status 0x{s:04X}" for name, s in statuses.items()}
    refused = [f"{name} ({answers[name]})" for name, s in statuses.items() if s not in STORED]
    log.log(logging.WARNING if refused else logging.INFO, "study %s: PACS push to %s, association accepted: %s",
            study_id, target, ", ".join(f"{name} {answer}" for name, answer in answers.items()))
    if refused:
        raise PacsPushError(f"PACS {target} did not store: {', '.join(refused)}")
    return statuses
