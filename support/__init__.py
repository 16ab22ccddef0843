"""Helpers that the tests and the benchmarks share: DICOM datasets made to order, and
`medreid serve` run as a real process with senders to feed it."""
