"""vaenode: a DICOM quality-gate node that flags anomalous images with a variational autoencoder."""

__version__ = "0.1.0"
