"""The synthetic hospital: generated patients with anatomy that stays theirs across visits,
written as DICOM files and a manifest, for training, tests, benchmarks and the demo."""
