"""Pure, typed processing stages and the runner that composes them.

Nothing here imports ``scp`` or pynetdicom: records arrive as plain data.
"""
