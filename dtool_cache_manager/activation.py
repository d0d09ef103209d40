"""placeholder"""
from dtoolcore.storagebroker import DiskStorageBroker  # noqa: F401
