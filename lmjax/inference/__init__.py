"""Inference: generation, logit filtering and sampling, beam search, sequence scoring.

`generate.generate` is the one entry point for generation (token ids in, token ids out);
`complete` turns text prompts into completion records with a tokenizer; `scoring.score_sequences`
gives per-token log-probabilities of given token sequences.
"""
