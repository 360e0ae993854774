"""Speculative decoding without a draft model: drafters that look up what came before
(``ngram``, ``suffix_tree``) and the per-request policy that decides how much to draft
(``proposer``). Pure Python: the engine core runs them between steps."""
