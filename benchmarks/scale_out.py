"""Scale-out: two `medreid serve` processes (two ports, one worker each) sharing one PostgreSQL
database and one spool folder, each fed by its own storescu; beside one process alone, in the
same run. Prints the combined rate and the proof that no job was done twice.

    python -m benchmarks.scale_out [--images 1000] [--database postgresql+psycopg://...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, text

from benchmarks.ingest import make_files
from storage.db import make_engine, make_sessionmaker, upgrade
from storage.models import Instance, Job, Result
from support.service import RunningService, free_port, service_env, wait_for_queue


def run(base_url: str, files: list[Path], processes: int, models: Path) -> dict[str, Any]:
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    admin = make_engine(base_url)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = f"{base_url}{'&' if '?' in base_url else '?'}options=-csearch_path%3D{schema}"
    work = Path(tempfile.mkdtemp(prefix="medreid-scale-"))
    services: list[RunningService] = []
    try:
        upgrade(url)
        engine = make_engine(url)
        sessions = make_sessionmaker(engine)
        for n in range(processes):
            port = free_port()
            env = service_env(
                work,  # one spool folder for all: a worker may take any service's job
                url,
                port,
                MEDREID_MODELS_DIR=str(models),
                MEDREID_WORKERS_BATCH_SIZE="32",
                MEDREID_LOGGING_LEVEL="WARNING",
            )
            service = RunningService(workdir=work / f"service{n}", port=port, env=env)
            service.workdir.mkdir()
            service.start(timeout=120)
            services.append(service)
        time.sleep(15)  # the workers load their models
        share = [files[n::processes] for n in range(processes)]
        started = time.monotonic()
        senders = [
            subprocess.Popen(
                [
                    "storescu",
                    "-aet",
                    f"MOD{n}",
                    "-aec",
                    "MEDREID",
                    "127.0.0.1",
                    str(service.port),
                    *map(str, part),
                ],
                env={**os.environ, "TCP_NODELAY": "1"},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for n, (service, part) in enumerate(zip(services, share, strict=True))
        ]
        for sender in senders:
            sender.wait()
        wait_for_queue(sessions, timeout=1800)
        seconds = time.monotonic() - started
        with sessions.begin() as session:
            instances = session.scalar(select(func.count()).select_from(Instance))
            jobs = session.scalar(select(func.count()).select_from(Job))
            results = session.scalar(select(func.count()).select_from(Result))
            claimed_twice = session.scalar(
                select(func.count()).select_from(Job).where(Job.attempts > 1)
            )
            by_worker = dict(
                session.execute(select(Result.worker, func.count()).group_by(Result.worker)).all()
            )
        engine.dispose()
        return {
            "processes": processes,
            "images": len(files),
            "seconds": round(seconds, 1),
            "results_per_s": round(len(files) / seconds, 1),
            "instances": instances,
            "jobs": jobs,
            "results": results,
            "jobs_claimed_more_than_once": claimed_twice,
            "results_by_worker": by_worker,
        }
    finally:
        for service in services:
            service.stop()
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument(
        "--database",
        default=os.environ.get(
            "MEDREID_BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
    )
    parser.add_argument("--data", type=Path, default=Path("var/bench-data"))
    parser.add_argument("--models", type=Path, default=Path("models").resolve())
    args = parser.parse_args()
    files = make_files(args.data, max(args.images, 2000), 0, 0)["ct"][: args.images]
    report = [run(args.database, files, n, args.models) for n in (1, 2)]
    for row in report:
        print(json.dumps(row), flush=True)
    one, two = report
    print(
        f"two services: {two['results_per_s']} results/s against {one['results_per_s']} for one "
        f"({two['results_per_s'] / one['results_per_s']:.2f}x on the same two cores); "
        f"{two['results']} results for {two['jobs']} jobs, "
        f"{two['jobs_claimed_more_than_once']} claimed more than once"
    )


if __name__ == "__main__":
    main()
