"""Scaling-law tooling: FLOP and parameter accounting, IsoFLOP design, fits, plots."""
