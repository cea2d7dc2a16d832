"""The pure core: the message contract, money, the model types, and every rule and planner.

No I/O and no Azure: the standard library, pydantic and ``shared.config`` only (enforced by the
import-linter contracts in ``pyproject.toml``). Everything here runs in microseconds in tests.
"""
