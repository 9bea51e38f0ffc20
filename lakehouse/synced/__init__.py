"""Synced tables: a Delta table kept as a read-only Postgres table on a branch (Delta → Postgres).

``spec`` says what a synced table is; ``source`` reads Delta; ``changes`` turns a change data feed
into the net change per key; ``encode`` turns Arrow into COPY input; ``target`` is the Postgres
side; ``applier`` runs one sync; ``compute`` is the one door to a branch's compute; ``service``
keeps the definitions, runs continuous syncs and reports status.
"""
