"""Shared helpers for the test suites (real HAProxy processes, free ports)."""
