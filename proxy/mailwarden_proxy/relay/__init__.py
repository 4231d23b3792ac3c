"""The asyncio side: listeners, per-connection sessions driving a protocol core, splice."""
