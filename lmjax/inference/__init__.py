"""Inference building blocks: logit filtering and sampling, beam search, sequence scoring.

`lmjax.generate.generate` is the one entry point for generation; `scoring.score_sequences` gives
per-token log-probabilities of given token sequences.
"""
