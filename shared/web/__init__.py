"""The HTTP read API and the live status page.

May import every layer below it (they read through the repositories, never raw tables).
"""
