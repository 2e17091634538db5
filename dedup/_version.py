"""The package version, in a module of its own: modules low in the layers read it without
importing the package's face (which reaches the pipeline)."""

__version__ = "0.1.0"
