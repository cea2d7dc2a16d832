"""The adapters to Azure Storage: the only modules that import the Azure SDKs.

Clients, retries, the ``$batch`` codec, and one repository per table (completions, ledger,
parked messages) and queue. Azure's exceptions are translated here into ``shared.errors``'
``StorageError`` family; nothing above this layer sees an SDK exception type.
"""
