"""Console page and API latency on a database of 100,000 results and 100,000 audit events.

Each page is timed through the whole web stack (routing, authentication, the queries, the
audit event it writes, rendering) in-process, 20 times; beside it, the bare repository query
the page is built on, so the ratio says what the console adds. The bars: every page's p95 under
500 ms at this size; a CSV export of 10,000 audit rows at 10,000 rows/s or more.

    python -m benchmarks.console_pages [--results 100000] [--database-url URL]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from sqlalchemy import insert, text
from tqdm import tqdm

from console.app import ConsoleContext, create_app
from console.passwords import hash_password
from pipeline.runner import PipelineConfig
from storage.accounts import add_user
from storage.audit_trail import AuditFilter, query_audit
from storage.db import make_engine, make_sessionmaker, upgrade
from storage.models import AuditEvent, Instance, Job, Result
from storage.reports import dashboard, result_detail
from storage.results import ResultQuery, page_results
from support.dicom_factory import encode, make_dataset

TARGET_P95_MS = 500.0
TARGET_EXPORT_ROWS_PER_S = 10_000.0
EXPORT_ROWS = 10_000
REPEATS = 20
SENDERS = ["CT1", "CT2", "MR1", "DX1", "DX2", "PACS", "DERM"]
MODALITIES = ["CT", "CT", "MR", "DX", "DX", "CT", "DMS"]


def fill(url: str, spool: Path, results: int) -> None:
    """Instances, done jobs, results (2% mismatches) and audit events, in bulk."""
    pixels = (np.arange(256 * 256, dtype=np.uint16) * 13 % 4096).reshape(256, 256)
    (spool / "one.dcm").write_bytes(encode(make_dataset(pixels)))
    engine = make_engine(url)
    rng = np.random.default_rng(0)
    now = dt.datetime.now(dt.UTC)
    chunk = 5000
    with tqdm(total=results, desc="filling", unit="result") as bar:
        for start in range(0, results, chunk):
            ids = range(start + 1, min(start + chunk, results) + 1)
            ages = rng.uniform(0, 14 * 86400, len(ids))
            instances, jobs, rows, events = [], [], [], []
            for n, age in zip(ids, ages, strict=True):
                sender = n % len(SENDERS)
                when = now - dt.timedelta(seconds=float(age))
                mismatch = n % 50 == 0
                instances.append(
                    {
                        "id": n,
                        "sop_instance_uid": f"1.2.9.{n}",
                        "version": 1,
                        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
                        "study_instance_uid": f"1.2.9.{n // 20}",
                        "series_instance_uid": f"1.2.9.{n // 5}.1",
                        "patient_id": f"P{n // 20:06d}",
                        "modality": MODALITIES[sender],
                        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                        "size_bytes": 131072,
                        "sha256": f"{n:064d}",
                        "spool_path": "one.dcm",
                        "calling_ae": SENDERS[sender],
                        "peer_host": "10.0.0.1",
                        "received_at": when,
                        "state": "processed",
                    }
                )
                jobs.append(
                    {
                        "id": n,
                        "instance_id": n,
                        "state": "done",
                        "attempts": 1,
                        "created_at": when,
                        "finished_at": when,
                    }
                )
                rows.append(
                    {
                        "id": n,
                        "job_id": n,
                        "instance_id": n,
                        "status": "ok",
                        "parameters": {},
                        "timings_ms": {"models": 14.9},
                        "worker": "bench",
                        "created_at": when,
                        "predicted_modality": "ct",
                        "modality_scores": {"ct": 0.97, "xray": 0.03},
                        "modality_verdict": "agree",
                        "identity_verdict": "mismatch" if mismatch else "consistent",
                        "matched_patient_id": f"P{n // 20 + 1:06d}" if mismatch else None,
                        "top_matches": [{"patient_id": f"P{n // 20:06d}", "score": 0.8}],
                        "identity_threshold": 0.6,
                        "model_versions": {"compa": "compa-v1"},
                    }
                )
                events.append(
                    {
                        "occurred_at": when,
                        "event_code": "110104",
                        "event": "DICOM Instances Transferred",
                        "event_type": None,
                        "action": "C",
                        "outcome": 0,
                        "actor_ae": SENDERS[sender],
                        "actor_host": "10.0.0.1",
                        "patient_id": f"P{n // 20:06d}",
                        "study_instance_uid": f"1.2.9.{n // 20}",
                        "detail": {"instances": 1},
                    }
                )
            with engine.begin() as connection:
                connection.execute(insert(Instance), instances)
                connection.execute(insert(Job), jobs)
                connection.execute(insert(Result), rows)
                connection.execute(insert(AuditEvent), events)
            bar.update(len(ids))
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            for table in ("instances", "jobs", "results", "audit_events"):
                connection.execute(
                    text(f"SELECT setval('{table}_id_seq', (SELECT max(id) FROM {table}))")
                )
            connection.execute(text("ANALYZE"))
        else:
            connection.execute(text("ANALYZE"))
    engine.dispose()


def timed(call: Callable[[], Any]) -> dict[str, float]:
    call()  # warm
    samples = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000.0)
    return {
        "median_ms": round(float(np.median(samples)), 1),
        "p95_ms": round(float(np.percentile(samples, 95)), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=int, default=100_000)
    parser.add_argument("--database-url", help="an empty database (default: SQLite in a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        spool = Path(scratch) / "spool"
        spool.mkdir()
        url = args.database_url or f"sqlite:///{scratch}/console.sqlite3"
        upgrade(url)
        fill(url, spool, args.results)
        engine = make_engine(url)
        sessions = make_sessionmaker(engine)
        with sessions.begin() as session:
            add_user(session, username="bench", password_hash=hash_password("x" * 12), by="b")
        client = TestClient(
            create_app(
                ConsoleContext(sessions=sessions, spool_root=spool, pipeline=PipelineConfig())
            )
        )
        form = client.get("/login").text
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', form)
        assert csrf
        client.post(
            "/login",
            data={"username": "bench", "password": "x" * 12, "csrf_token": csrf.group(1)},
            follow_redirects=False,
        )
        now = dt.datetime.now(dt.UTC)
        middle = args.results // 2
        patient = f"P{middle // 20:06d}"

        def bare(fn: Callable[..., Any], **kwargs: Any) -> Callable[[], Any]:
            def run() -> Any:
                with sessions.begin() as session:
                    return fn(session, **kwargs)

            return run

        def page(path: str, **params: Any) -> Callable[[], Any]:
            def run() -> Any:
                answer = client.get(path, params=params)
                assert answer.status_code == 200, (path, answer.status_code)
                return answer

            return run

        local = now.astimezone().replace(hour=0, minute=0, second=0, microsecond=0)
        day = local.astimezone(dt.UTC)
        monday = (local - dt.timedelta(days=local.weekday())).astimezone(dt.UTC)
        cases = [
            (
                "dashboard",
                page("/"),
                bare(dashboard, now=now, day_start=day, week_start=monday),
            ),
            ("results, no filter", page("/results"), bare(page_results, where=ResultQuery())),
            (
                "results, mismatches",
                page("/results", verdict="mismatch"),
                bare(page_results, where=ResultQuery(verdict="mismatch")),
            ),
            (
                "results, one patient",
                page("/results", patient=patient),
                bare(page_results, where=ResultQuery(patient=patient)),
            ),
            (
                "results, one sender and day",
                page("/results", ae="CT1", received_from=now.date().isoformat()),
                bare(page_results, where=ResultQuery(ae="CT1", received_from=day)),
            ),
            (
                "result detail with image",
                page(f"/results/{middle}"),
                bare(result_detail, result_id=middle),
            ),
            (
                "API results, 1000",
                page("/api/v1/results", limit=1000),
                bare(page_results, where=ResultQuery(limit=1000)),
            ),
            ("audit page", page("/audit"), bare(query_audit, where=AuditFilter(limit=500))),
            (
                "audit CSV, 10000 rows",
                page("/api/v1/audit.csv", limit=EXPORT_ROWS),
                bare(query_audit, where=AuditFilter(limit=EXPORT_ROWS)),
            ),
        ]
        report = []
        for name, through_console, bare_query in tqdm(cases, desc="timing", unit="page"):
            console = timed(through_console)
            query = timed(bare_query)
            row: dict[str, Any] = {
                "page": name,
                **console,
                "bare_query_median_ms": query["median_ms"],
                "ratio_to_bare_query": round(console["median_ms"] / query["median_ms"], 2),
            }
            if "CSV" in name:
                rate = EXPORT_ROWS / (console["median_ms"] / 1000.0)
                row.update(rows_per_s=round(rate), target_rows_per_s=TARGET_EXPORT_ROWS_PER_S)
                row["met"] = rate >= TARGET_EXPORT_ROWS_PER_S
            else:
                row.update(target_p95_ms=TARGET_P95_MS, met=console["p95_ms"] <= TARGET_P95_MS)
            report.append(row)
        engine.dispose()
    print(
        json.dumps(
            {
                "results": args.results,
                "backend": url.split(":", 1)[0],
                "pages": report,
                "all_met": all(r["met"] for r in report),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
