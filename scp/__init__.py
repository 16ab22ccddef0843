"""The network edge: pynetdicom Storage and Verification SCP.

Nothing past this package sees a pynetdicom event: handlers turn events into the frozen
records of :mod:`scp.records` and hand them on.
"""
