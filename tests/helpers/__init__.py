"""Helpers shared by tests: real peers (Orthanc, the node) and test data builders."""
