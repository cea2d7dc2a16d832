"""Configuration: the app settings and the election's timings, validated up front.

May import: the standard library and ``shared.errors`` only (the lowest layer).
"""
