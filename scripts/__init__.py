"""Small scripts that make pictures and demos for the docs."""
