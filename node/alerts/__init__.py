"""Alerts: tell people at once when a series is flagged (``[alerts]``)."""
