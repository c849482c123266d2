"""One module per DVC stage (`python -m pipeline.stages.<name>`): read config, call the library, write outputs."""
