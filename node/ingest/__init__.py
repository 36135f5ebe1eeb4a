"""Ingest: the C-STORE SCP (thin handlers) and durable instance storage."""
