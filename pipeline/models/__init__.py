"""The models: COMPA (modality from pixels) and per-modality re-identification embedders.

TensorFlow / Keras load lazily, inside the functions that need them, so the service and the
tests that do not touch a model never pay for the import.
"""
