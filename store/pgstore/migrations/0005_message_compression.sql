-- 0005: compress stored messages with lz4 where the server has it.
-- A message is kilobytes of MIME, so PostgreSQL compresses it into TOAST
-- on every admission; with pglz, the default, that compression was a large
-- share of the server's CPU per admission. lz4 compresses several times
-- faster at a similar ratio. It changes how new values are written only:
-- stored messages stay as they are and read as before. A server built
-- without lz4 (or older than PostgreSQL 14, which has no per-column
-- compression) keeps its default.
DO $$
BEGIN
	EXECUTE 'ALTER TABLE sendonce_emails ALTER COLUMN data SET COMPRESSION lz4';
EXCEPTION WHEN feature_not_supported OR syntax_error OR invalid_parameter_value THEN
	RAISE NOTICE 'sendonce: lz4 compression unavailable (%); messages keep the server''s default compression', SQLERRM;
END $$;
