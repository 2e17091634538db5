"""The bundled presets (TOML), installed as dedup.configs."""
