"""Embedding speed of the default re-identification configuration, batch 32, on this CPU,
beside MobileNetV2 at 224 px (the usual configuration) measured in the same run.

    python -m benchmarks.embedding_speed [--model models/reid-xray-v4] [--images 320]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from pipeline.models.backbone import Preprocessing, build_backbone, quiet_tensorflow
from pipeline.models.reid import ReidModel, embed_images


def per_image_ms(run: object, images: list[np.ndarray], repeats: int = 3) -> float:
    run(images[:32])  # type: ignore[operator]  # warm-up: graph tracing, allocations
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run(images)  # type: ignore[operator]
        best = min(best, (time.perf_counter() - start) / len(images) * 1000.0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/reid-xray-v4"))
    parser.add_argument("--images", type=int, default=320)
    args = parser.parse_args()
    quiet_tensorflow()
    rng = np.random.default_rng(0)
    images = [rng.random((512, 512)).astype(np.float32) for _ in range(args.images)]
    model = ReidModel(args.model)
    ours = per_image_ms(model.embed, images)
    reference = build_backbone("mobilenet_v2", 1.0, 224, "none")
    prep = Preprocessing.for_backbone("mobilenet_v2", 224)
    theirs = per_image_ms(lambda batch: embed_images(reference, batch, prep), images)
    result = {
        "cpu_count": os.cpu_count(),
        "batch": 32,
        "images": args.images,
        "default_config": f"{model.config.backbone} alpha {model.config.alpha} "
        f"{model.config.size} px",
        "default_ms_per_image": round(ours, 2),
        "mobilenet_v2_224_ms_per_image": round(theirs, 2),
        "speedup_vs_224": round(theirs / ours, 2),
        "target_ms_per_image": 10.0,
        "meets_target": ours <= 10.0,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
