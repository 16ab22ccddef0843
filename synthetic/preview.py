"""A picture of a generated hospital for people: per modality, patients by visits."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from synthetic.hospital import SynthOptions, plan, render_series, to_png


def preview(options: SynthOptions, destination: Path, patients: int = 5, tile: int = 128) -> Path:
    """A picture for people: per modality, a grid of patients (rows) x visits (columns)."""
    items = [i for i in plan(options) if i.patient.index < patients]
    visits = options.visits
    label_w, gap = 140, 24
    panel_w = label_w + visits * tile
    panel_h = gap + patients * tile
    canvas = np.full(
        (panel_h * math.ceil(len(options.modalities) / 2), panel_w * 2, 3), 255, np.uint8
    )
    for m_index, modality in enumerate(options.modalities):
        ox = (m_index % 2) * panel_w
        oy = (m_index // 2) * panel_h
        cv2.putText(
            canvas,
            modality,
            (ox + 8, oy + 17),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.55,
            (0, 0, 0),
            1,
            cv2.LINE_AA,
        )
        for item in (i for i in items if i.modality == modality):
            image = render_series(options.seed, item, options.slices)[0]
            png = to_png(modality, image)
            if png.ndim == 2:
                png = cv2.cvtColor(png, cv2.COLOR_GRAY2BGR)
            x = ox + label_w + item.visit * tile
            y = oy + gap + item.patient.index * tile
            canvas[y : y + tile, x : x + tile] = cv2.resize(
                png, (tile, tile), interpolation=cv2.INTER_AREA
            )
            if item.visit == 0:
                cv2.putText(
                    canvas,
                    item.patient.patient_id,
                    (ox + 6, y + tile // 2),
                    cv2.FONT_HERSHEY_SIMPLEX,
                    0.4,
                    (0, 0, 0),
                    1,
                    cv2.LINE_AA,
                )
    destination.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(destination), canvas)
    return destination
