"""End-to-end tests: the real worker (App) + simulated platform, LastInfoSec, OpenCTI worker, all
on the real RabbitMQ. The harness itself lives in tests/helpers.py."""
