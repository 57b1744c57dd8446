"""pytest plugin: the real pgml-proxy in front of the test Postgres (owned by the proxy core)."""
