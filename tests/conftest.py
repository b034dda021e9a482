"""Root fixtures: the loopback test servers (tests/servers.py) for every test."""

pytest_plugins = ["tests.servers", "tests.redis_server"]
