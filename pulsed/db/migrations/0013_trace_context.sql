-- Version 13: a job carries its enqueuer's trace context (issue 18).
--
-- trace_context: the W3C Trace Context headers ({"traceparent": ...,
-- "tracestate": ...}) current where the job was enqueued, when the
-- application traces with OpenTelemetry; NULL otherwise. The worker's
-- span for each attempt continues that trace (pulsed.contrib.otel).
-- A nullable column without a default: a catalog change only, no rewrite
-- of the jobs table and a lock held for an instant, however large it is.
ALTER TABLE pulse_jobs ADD COLUMN trace_context jsonb;
