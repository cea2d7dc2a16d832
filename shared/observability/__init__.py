"""Telemetry: spans, metrics and log fields, taking plain values (counts, durations, ids).

May import: ``shared.config`` (for its settings); never the domain or anything above it.
"""
