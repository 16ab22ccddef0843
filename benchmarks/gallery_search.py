"""Top-5 gallery search latency and memory at 10k, 100k and 1M enrolled embeddings
(128 dimensions, three per patient), single query, this machine.

    python -m benchmarks.gallery_search
"""

from __future__ import annotations

import json
import time

import numpy as np

from pipeline.gallery import GalleryIndex


def main() -> None:
    rng = np.random.default_rng(0)
    report = []
    for size in (10_000, 100_000, 1_000_000):
        index = GalleryIndex(dim=128)
        index.add(
            [f"P{i // 3}" for i in range(size)], rng.standard_normal((size, 128)).astype(np.float32)
        )
        timings = []
        for _ in range(30):
            query = rng.standard_normal(128).astype(np.float32)
            start = time.perf_counter()
            index.search(query, 5)
            timings.append((time.perf_counter() - start) * 1000.0)
        report.append(
            {
                "embeddings": size,
                "median_ms": round(float(np.median(timings)), 2),
                "p95_ms": round(float(np.percentile(timings, 95)), 2),
                "index_mb": round(index.vectors.nbytes / 1e6, 1),
                "target_ms": 50.0,
            }
        )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
