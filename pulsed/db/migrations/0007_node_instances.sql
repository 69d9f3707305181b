-- Version 7: one running pulsed per node id.
--
-- Two daemons with the same daemon.node_id (a copied config, a cloned VM)
-- shared lease owner names: the second to start released the first's
-- running jobs as its "previous incarnation", a worker's death could
-- release the other daemon's job (same pid in another PID namespace), and
-- the two fought over the process registry. Each master start claims its
-- node id here with a random instance id; the scheduler heartbeats the row.
-- A start finds the row held by a live daemon (a recent heartbeat, or a
-- master pid still alive on the same host) and refuses to run.
CREATE TABLE pulse_node_instances (
    node_id      text PRIMARY KEY,
    instance     text NOT NULL,          -- random, one per master start
    host         text NOT NULL,          -- boot id + PID namespace: where the pid means one process
    master_pid   integer NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);
