"""The proxy's configuration: one typed model, two file formats (native YAML, emailproxy INI)."""
