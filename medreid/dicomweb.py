"""The PACS priors over DICOMweb, for a node given as a URL: QIDO-RS to search from study
down to instances, WADO-RS to fetch the few chosen, through dicomweb-client. The same
choice of priors, deadlines and errors as over DIMSE (medreid.pacs)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydicom import Dataset

from medreid.pacs import Exchange, PacsUnavailable, PriorImage, Slots, remaining
from medreid.priors_settings import PacsNode, PriorsSettings


class DicomWebClient:
    """Priors from one DICOMweb node."""

    def __init__(self, node: PacsNode, settings: PriorsSettings, lock_folder: Path) -> None:
        self.node = node
        self.settings = settings
        self.slots = Slots(lock_folder, settings.max_concurrent)

    @contextlib.contextmanager
    def search(self, deadline: float) -> Iterator[_WebSearch]:
        """A client whose every request ends within timeout_s and the deadline, without
        dicomweb-client's own retries (the worker has its schedule); any HTTP failure is a
        PacsUnavailable naming the node."""
        import requests
        from dicomweb_client.api import DICOMwebClient

        with self.slots.one(deadline, self.node.name):
            timeout = min(self.settings.timeout_s, remaining(deadline, self.node.name))
            client = DICOMwebClient(url=self.node.url, timeout=timeout)
            client.set_http_retry_params(retry=False)
            try:
                yield _WebSearch(self.node.name, client, deadline)
            except requests.HTTPError as exc:
                status = exc.response.status_code if exc.response is not None else "?"
                raise PacsUnavailable(f"{self.node.name}: HTTP {status}") from None
            except requests.Timeout:
                raise PacsUnavailable(f"{self.node.name}: no answer within {timeout} s") from None
            except requests.RequestException as exc:
                raise PacsUnavailable(f"{self.node.name}: {type(exc).__name__}") from None
            finally:
                client._session.close()

    def retrieve(
        self, images: list[PriorImage], *, deadline: float, exchange: Exchange
    ) -> list[Dataset]:
        if not images:
            return []
        exchange.requested += len(images)
        received = []
        with self.search(deadline) as search:
            for image in images:
                remaining(deadline, self.node.name)
                received.append(
                    search.client.retrieve_instance(
                        image.study_instance_uid, image.series_instance_uid, image.sop_instance_uid
                    )
                )
        exchange.received += len(received)
        return received


class _WebSearch:
    """QIDO-RS at each level; the DICOM JSON answers as datasets."""

    def __init__(self, node_name: str, client: Any, deadline: float) -> None:
        self.node_name, self.client, self.deadline = node_name, client, deadline

    def _datasets(self, answers: list[dict[str, Any]]) -> list[Dataset]:
        remaining(self.deadline, self.node_name)
        return [Dataset.from_json(answer) for answer in answers]

    def studies(self, patient_id: str, dates: str) -> list[Dataset]:
        filters = {"StudyDate": dates, **({"PatientID": patient_id} if patient_id else {})}
        return self._datasets(
            self.client.search_for_studies(
                search_filters=filters,
                fields=["PatientID", "StudyDate", "ModalitiesInStudy"],
                get_remaining=True,
            )
        )

    def series(self, patient_id: str, study_uid: str) -> list[Dataset]:
        return self._datasets(
            self.client.search_for_series(
                study_instance_uid=study_uid,
                fields=["Modality", "SeriesNumber"],
                get_remaining=True,
            )
        )

    def images(self, patient_id: str, study_uid: str, series_uid: str) -> list[Dataset]:
        return self._datasets(
            self.client.search_for_instances(
                study_instance_uid=study_uid,
                series_instance_uid=series_uid,
                fields=["InstanceNumber"],
                get_remaining=True,
            )
        )
