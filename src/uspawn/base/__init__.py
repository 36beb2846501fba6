"""Lowest layer: errors and exit codes, the text sanitiser, the argv parser, test
fault switches. Stdlib only; imports nothing else of uspawn."""
