"""Load tests of vidgen-serve: the Locust file, a runner that starts the local service, and reports."""
