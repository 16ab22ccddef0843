"""The administrators' web console: read-only pages and a JSON API over results and audit.

An edge like ``scp/``: it reads ``storage/`` and reuses ``pipeline/`` stages for thumbnails;
nothing below it imports it."""
