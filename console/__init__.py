"""The web console: pages and a JSON API over results, alerts and audit; they change nothing
but a reviewer's decision on an alert.

An edge like ``scp/``: it reads ``storage/`` and reuses ``pipeline/`` stages for thumbnails;
nothing below it imports it."""
