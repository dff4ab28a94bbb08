"""Optional bridges to other tools. Each subpackage needs its own extra and imports its
tool only when called, so the rest of the project never depends on it."""
