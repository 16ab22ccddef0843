"""SQL storage: models, engine and repositories, split by what they own (instances, jobs,
results, gallery, audit trail, accounts, reports).

Each repository function takes ``session`` keyword-only and never commits: the caller owns
the transaction (``with Session.begin() as session: ...``)."""
