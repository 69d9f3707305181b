-- Version 15: drain and resume any node from any node's console (issue 19).
-- Nodes share only the database, so a request for another node is a row
-- here. The API that takes it inserts the row and NOTIFYs the channel
-- pulse_node_commands with the target node's id; that node's scheduler
-- (LISTENing, and polling as a fallback) asks its own master over the
-- control socket, as `pulsectl drain` there would, and acknowledges the
-- row with the outcome (done_at, outcome). A row is carried out once: only
-- the node's one scheduler takes it, and drain and resume are idempotent
-- should a scheduler die between carrying one out and acknowledging it.
-- Bounded: every node's scheduler deletes rows older than an hour.
CREATE TABLE pulse_node_commands (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    node_id        text NOT NULL,
    command        text NOT NULL CHECK (command IN ('drain', 'resume')),
    requested_by   text NOT NULL,   -- the API token's name
    requested_from text NOT NULL,   -- the node whose API took the request
    requested_at   timestamptz NOT NULL DEFAULT now(),
    done_at        timestamptz,
    outcome        jsonb,           -- {"state": "draining"} or {"error": "..."}
    CHECK ((done_at IS NULL) = (outcome IS NULL))
);

-- What a node's scheduler looks for: its requests not yet carried out.
CREATE INDEX pulse_node_commands_pending_idx ON pulse_node_commands (node_id, id)
    WHERE done_at IS NULL;
