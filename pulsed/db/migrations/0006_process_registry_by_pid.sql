-- Version 6: a row of the process registry is one process, keyed by its pid.
--
-- A reload runs two generations side by side until the old one leaves: the
-- old worker 1 finishing its job next to the new worker 1, two schedulers,
-- two api children. Keyed by (node_id, role, idx), a heartbeat listing both
-- proposed the same key twice and PostgreSQL refused the whole statement
-- ("ON CONFLICT DO UPDATE command cannot affect row a second time"): the
-- scheduler crashed on every reload. Both processes are real and both are
-- listed now. A node still running the previous version fails its registry
-- heartbeat against this key until it is upgraded too.
ALTER TABLE pulse_processes DROP CONSTRAINT pulse_processes_pkey;
ALTER TABLE pulse_processes ADD PRIMARY KEY (node_id, role, idx, pid);
