"""The worker: assemble queued series (DICOM to arrays), route them to a model, score, report."""
