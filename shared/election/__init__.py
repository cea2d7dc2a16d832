"""Leader election over a blob lease, in the manner of client-go's ``leaderelection``.

May import: config, domain, observability and storage (the lease adapter).
"""
