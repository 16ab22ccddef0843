"""Datasets: the synthetic hospital, the dataset-layout reader, offline augmentation."""
