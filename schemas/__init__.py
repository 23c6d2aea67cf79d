"""The JSON schemas of every file the pipeline reads or writes, shipped in the wheel as ``pipeline.json_schemas``."""
