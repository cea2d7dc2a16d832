"""Custom checkov checks for infra/ (loaded with ``--external-checks-dir infra/checkov``)."""
