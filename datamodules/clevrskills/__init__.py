"""ClevrSkills' released trajectory format -> our HDF5 schema (``make import-clevrskills``)."""
