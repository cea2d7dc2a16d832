"""Offline validation of infra/ (Bicep): parsed-AST assertions, checkov, settings agreement."""
