-- 0002: indexes for the operator's views across tenants: the metrics'
-- oldest queued and in-doubt email, and the in-doubt rules, list one state
-- of every tenant in ID order.
CREATE INDEX sendonce_emails_state_id ON sendonce_emails (state, id);
