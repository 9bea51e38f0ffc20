"""The lakehouse room: Postgres ↔ Delta Lake. Lakehouse sync (Postgres changes → Delta history)
and synced tables (Delta → Postgres) over one type mapping (``lakehouse.types``). May import
``compute`` and ``storage``; the shell wires it."""
