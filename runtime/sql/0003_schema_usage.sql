-- Every role may reach the pgml schema, as the functions PostgresML users call live there:
-- the model-free functions become callable, and a client can read the datasets it loads
-- (pgml.load_dataset makes the caller their owner). The registry's tables stay the proxy
-- role's: USAGE on a schema grants nothing on the objects in it.
GRANT USAGE ON SCHEMA pgml TO PUBLIC;
