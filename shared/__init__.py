"""The ledger app's package: leader-elected commits of completion messages (see docs/design.md)."""
