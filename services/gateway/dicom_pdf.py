"""The PDF draft as a DICOM Encapsulated PDF instance in the source study (issue 16), so that a
PACS viewer shows the report, contours and volume curves without SEG support.

    ds = build_encapsulated_pdf(pdf_bytes, sr, segs=[...], run=study_id)

pydicom builds it (highdicom has no Encapsulated Document class). Modules of the Encapsulated PDF
IOD (PS3.3 A.45.1): Patient, General Study, Patient Study (copied element for element from the
SR, which carries the source's own values, `copy_study_attributes`), Encapsulated Document
Series (Modality DOC), General Equipment + SC Equipment (the platform, conversion type WSD),
Encapsulated Document (the PDF, its MIME type, title, the SR and SEGs it was made with as
SourceInstanceSequence), SOP Common. UIDs are derived like the SR's: the series from the run and
study, the instance also from the PDF's digest, so a retried report stage stores the same
instance again and a new run gets its own series. Burned In Annotation is YES: the page names
the patient.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian

from services.preprocess.reader import quiet_pydicom
from services.segmentation.dicom_seg import MANUFACTURER, copy_study_attributes, derived_uid

ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
PDF_SERIES_NUMBER = 9003  # SEG 9001, SR 9002
DOCUMENT_TITLE = "CMR-VL draft report (machine generated)"
# LOINC 18748-4 "Diagnostic imaging report": what the document is (CID 7020 / the SR's title).
_REPORT_CONCEPT = ("18748-4", "LN", "Diagnostic imaging report")


@quiet_pydicom()  # the source's invalid UIDs are listed once (source_conformance), not warned per element
def build_encapsulated_pdf(pdf: bytes, study: Dataset, sources: Sequence[Dataset] = (), run: str = "",
                           title: str = DOCUMENT_TITLE) -> Dataset:
    """An Encapsulated PDF dataset (with file meta) in the study of `study` (the run's SR).

    sources: the objects the document was made from (SR, SEGs), referenced in the document."""
    if not pdf.startswith(b"%PDF-"):
        raise ValueError("not a PDF document (it does not start with %PDF-)")
    study_uid = str(study.StudyInstanceUID)
    ds = Dataset()
    copy_study_attributes(ds, study)
    # As the SR has them (from the source): the character set of the copied names, and the
    # patient/study references a PACS compares across the study's objects.
    for keyword in ("SpecificCharacterSet", "ReferencedPatientSequence", "ReferencedStudySequence"):
        if keyword in study:
            ds[keyword] = copy.deepcopy(study[keyword])
    ds.SOPClassUID = ENCAPSULATED_PDF_STORAGE
    ds.SeriesInstanceUID = derived_uid("pdf-series", run, study_uid)
    ds.SOPInstanceUID = derived_uid("pdf", run, study_uid, hashlib.sha256(pdf).hexdigest())
    ds.Modality = "DOC"
    ds.SeriesNumber = PDF_SERIES_NUMBER
    ds.SeriesDescription = "CMR-VL draft report (PDF)"
    ds.Manufacturer = MANUFACTURER
    ds.ConversionType = "WSD"  # workstation: a document the platform made, not a scanned one
    ds.InstanceNumber = 1
    # The run's time: the SR's content date/time, so every object of the run says the same.
    ds.ContentDate = study.get("ContentDate", "")
    ds.ContentTime = study.get("ContentTime", "")
    ds.AcquisitionDateTime = f"{ds.ContentDate}{ds.ContentTime}" if ds.ContentDate else ""
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = title
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = _REPORT_CONCEPT
    ds.ConceptNameCodeSequence = DicomSequence([concept])
    references = []
    for source in sources:
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
        references.append(ref)
    if references:
        ds.SourceInstanceSequence = DicomSequence(references)
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")  # OB: even length, padded
    ds.EncapsulatedDocumentLength = len(pdf)  # the PDF without the pad byte

    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    return ds


def read_encapsulated_pdf(ds: Dataset) -> bytes:
    """The PDF document of an Encapsulated PDF dataset (without its pad byte)."""
    data = bytes(ds.EncapsulatedDocument)
    length = ds.get("EncapsulatedDocumentLength")
    return data[:length] if length else data.rstrip(b"\0")


__all__ = ["DOCUMENT_TITLE", "ENCAPSULATED_PDF_STORAGE", "PDF_SERIES_NUMBER", "build_encapsulated_pdf",
           "read_encapsulated_pdf"]
