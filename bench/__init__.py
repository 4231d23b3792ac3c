"""Benchmarks: mailwarden against a direct XOAUTH2 client and against emailproxy (see README)."""
