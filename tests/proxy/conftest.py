from tests.proxy.harness import harness  # noqa: F401 - one harness per test module
