"""Local stand-ins for the demo and the tests: a CA, an identity provider, a mail server.

They serve `mailwarden-proxy demo` and the test suite only; production code never
imports this package.
"""
