"""Test support: a local Redis server, an upstream stub and the real proxy as a subprocess."""
