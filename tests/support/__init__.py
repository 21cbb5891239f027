"""Helpers the tests share: in-memory links and networks, the in-process cluster, fault
proxies, a hostile peer, sample messages, and the application processes' entry points."""
