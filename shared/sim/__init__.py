"""Local tooling: Azurite launcher, the scale-out simulator and the demo (not deployed)."""
