"""Push the report's DICOM objects (SR + SEG) back to a PACS by C-STORE (pynetdicom)."""

from __future__ import annotations

import io

import pydicom


class PacsPushError(RuntimeError):
    pass


def parse_target(target: str) -> tuple[str, str, int]:
    """`AET@host:port` -> (called AE title, host, port)."""
    aet, at, address = target.partition("@")
    host, colon, port = address.rpartition(":")
    if not (at and colon and aet and host and port.isdigit()):
        raise ValueError(f"PACS target must look like AET@host:port, got {target!r}")
    return aet, host, int(port)


def push(objects: dict[str, bytes], target: str, calling_aet: str = "CMRVL", timeout_s: float = 30.0) -> None:
    """C-STORE every object (name -> DICOM file bytes) in one association; raise if any is refused."""
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
        raise PacsPushError(f"PACS {target} refused or did not answer the association")
    try:
        refused = []
        for name, dataset in datasets.items():
            status = assoc.send_c_store(dataset)
            if not status or status.Status not in (0x0000, 0xB000, 0xB007, 0xB006):  # success or warning
                refused.append(f"{name} (status {getattr(status, 'Status', 'none')})")
        if refused:
            raise PacsPushError(f"PACS {target} did not store: {', '.join(refused)}")
    finally:
        assoc.release()
