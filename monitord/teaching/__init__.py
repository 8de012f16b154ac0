"""Teaching by example, in one place: banks of labelled embeddings (``bank``), kNN scores
(``knn``), a rule's taught false alarms and the reference sounds that guard its recall
(``suppress``, ``references``), teaching a bank from recordings or an event's window (``teach``),
and "not this" / "yes, this" on an alert (``feedback``). What teaching needs of the daemon comes
through ``port.TeachingPort``."""
