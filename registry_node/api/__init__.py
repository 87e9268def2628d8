"""The node's OCI HTTP API (aiohttp): thin handlers over ``registry.Registry``."""
