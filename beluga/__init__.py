"""Beluga: a KV-cache store on a shared (CXL) memory pool. Imports nothing from testbed."""
