"""Local tooling, not deployed: Azurite launcher, the scale-out simulator and the demo."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
"""The repository root (where ``host.json``, ``function_app.py`` and ``node_modules`` are)."""
