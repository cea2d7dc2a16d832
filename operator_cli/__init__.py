"""The operator CLI (local tool, not deployed): enqueue, dead letters, ledger reads."""
