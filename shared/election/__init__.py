"""Leader election over a lease, in the manner of client-go's ``leaderelection``.

May import: config, domain and observability. The lease comes through the ``LeaseLock`` port
(``lock.py``); its Azure adapter lives in storage (``shared.storage.azure_leases``) and is wired
in by the layers above.
"""
