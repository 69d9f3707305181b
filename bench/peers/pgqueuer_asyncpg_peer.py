"""PgQueuer on its asyncpg driver (the driver its docs lead with); otherwise
identical to pgqueuer_peer.py (same schema, batch_size, worker model)."""

from __future__ import annotations

from peers import driver
from peers.pgqueuer_peer import PgqueuerAdapter


class PgqueuerAsyncpgAdapter(PgqueuerAdapter):
    name = "pgqueuer-asyncpg"
    lib = "asyncpg"


if __name__ == "__main__":
    driver.main(PgqueuerAsyncpgAdapter)
